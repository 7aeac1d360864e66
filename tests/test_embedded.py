"""The embedded SmolLM2-135M-Instruct through our engine == transformers loading the same GGUF."""

import pytest
import torch

from cachedattention import SamplingParams

PROMPTS = [
    [{"role": "user", "content": "Name three colors."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


@pytest.mark.slow
def test_embedded_greedy_matches_transformers_gguf(embedded_llm):
    from transformers import AutoModelForCausalLM

    from cachedattention.model.embedded import embedded_gguf_path

    path = embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=32, temperature=0)
    for messages in PROMPTS:
        ids = embedded_llm.tokenizer.encode_chat(messages)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=2)[0, len(ids):]
        out = embedded_llm.chat(messages, params)[0]
        assert out.token_ids == ref.tolist()
        assert len(out.token_ids) > 5


@pytest.mark.slow
def test_embedded_chat_text_and_stop_string(embedded_llm):
    out = embedded_llm.chat(PROMPTS[0], SamplingParams(max_tokens=32, temperature=0))[0]
    assert out.finish_reason == "stop" and "Red" in out.text
    cut = embedded_llm.chat(PROMPTS[0], SamplingParams(max_tokens=32, temperature=0, stop=("Blue",)))[0]
    assert cut.finish_reason == "stop" and cut.text.endswith("2. ") and "Blue" not in cut.text
    assert cut.metrics.ttft_s > 0 and cut.metrics.prompt_tokens == len(embedded_llm.tokenizer.encode_chat(PROMPTS[0]))


@pytest.mark.slow
def test_a_gguf_file_loads_with_its_blocks_and_matches_the_converted_folder(embedded_llm):
    """LLM(model="x.gguf") parses the file once for config, weights and blocks; it decodes from the
    blocks and gives the converted folder's tokens."""
    from cachedattention import LLM
    from cachedattention.model.embedded import embedded_gguf_path
    from cachedattention.model.layers import Linear

    llm = LLM(model=str(embedded_gguf_path()))
    linears = [m for m in llm.engine.model.modules() if isinstance(m, Linear)]
    assert len(linears) == 211 and all(m.quantized is not None for m in linears)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = [1, 504, 3456, 314, 260, 1345, 30]
    assert llm.generate([prompt], params)[0].token_ids == embedded_llm.generate([prompt], params)[0].token_ids


def cache_without_blocks(tmp_path, monkeypatch):
    """A cache folder under tmp_path holding the converted embedded model's files (links) but its
    blocks file; returns (the real folder, that one)."""
    from cachedattention.model.embedded import BLOCKS_FILE, cache_home, embedded_model_dir

    current = embedded_model_dir()
    monkeypatch.setenv("CACHEDATTENTION_HOME", str(tmp_path))
    folder = cache_home() / current.name
    folder.mkdir()
    for f in current.iterdir():
        if f.name != BLOCKS_FILE:
            (folder / f.name).symlink_to(f)
    return current, folder


def test_a_folder_converted_before_the_blocks_gets_them_and_keeps_its_weights(tmp_path, monkeypatch):
    """An older cache folder (no blocks file) gets one, without rewriting its weights: the store's
    model fingerprint (names, sizes and times of the weight files) stays the same."""
    from cachedattention.model.embedded import BLOCKS_FILE, embedded_model_dir
    from cachedattention.model.weights_id import weights_id as _weights_id

    current, old = cache_without_blocks(tmp_path, monkeypatch)
    before = _weights_id(old)
    assert embedded_model_dir() == old
    assert (old / BLOCKS_FILE).is_file() and (old / "model.safetensors").is_symlink()
    assert _weights_id(old) == before == _weights_id(current)


@pytest.mark.slow
def test_a_damaged_blocks_file_in_the_cache_is_written_again(tmp_path, monkeypatch, caplog):
    """The converted folder is our own cache: a blocks file that cannot be read (a truncated write
    from outside, a bad disk) is rebuilt from the GGUF at the next load, and decoding reads blocks again."""
    from cachedattention.model.embedded import BLOCKS_FILE
    from cachedattention.model.layers import Linear
    from cachedattention.model.loader import load_model

    current, copy = cache_without_blocks(tmp_path, monkeypatch)
    good = (current / BLOCKS_FILE).read_bytes()
    (copy / BLOCKS_FILE).write_bytes(good[: len(good) // 3])  # cut short
    with caplog.at_level("WARNING"):
        model = load_model(None, "cpu", "float32").model
    assert "damaged" in caplog.text
    assert (copy / BLOCKS_FILE).read_bytes() == good
    assert all(m.quantized is not None for m in model.modules() if isinstance(m, Linear))
