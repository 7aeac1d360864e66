import os
from pathlib import Path

import pytest
import torch

# keep converted weights of the embedded model out of the user's home during tests
os.environ.setdefault("CACHEDATTENTION_HOME", os.path.join(os.path.expanduser("~"), ".cache", "cachedattention-test"))
torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def patient_remote_record_reads():
    """A remote record read that takes over 0.25 s pauses record reads for 5 s (a hung server must
    not hold the engine's thread); a Redis server not scheduled for that long on a loaded 2-core
    machine is not hung, and tests that count remote hits would miss by chance."""
    import cachedattention.store.remote as remote

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(remote, "RECORD_READ_TIMEOUT_S", 5.0)
        yield


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One saved tiny model per family, with its transformers reference."""
    from tests.tiny_models import make_tiny_model

    out = {}
    for kind in ("llama", "llama-linear", "llama-tied", "qwen2", "qwen3", "mistral", "mixtral", "qwen2-moe",
                 "qwen3-moe", "mistral-window", "qwen2-window", "gemma3", "gemma3-scaled", "phi3", "phi3-window", "smollm3", "llama-biases", "granite",
                 "ministral", "olmo2", "phi4-mini", "qwen2-yarn", "gemma", "gemma2", "olmo3", "exaone4", "ernie4_5", "seed_oss",
                 "helium", "glm", "glm4", "cohere", "cohere-qk-norm", "cohere2", "granitemoe", "granitemoeshared", "gpt_oss",
                 "glm4_moe"):
        path = tmp_path_factory.mktemp(kind)
        out[kind] = (path, make_tiny_model(kind, path))
    return out


@pytest.fixture(scope="session")
def embedded_llm():
    from cachedattention import LLM

    return LLM()


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with the embedded model's tokenizer and chat template (vocab 49152)."""
    import torch
    import transformers

    from cachedattention.model.embedded import embedded_model_dir

    path = tmp_path_factory.mktemp("tiny-chat")
    tok = transformers.AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    cfg = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.2,  # peaked logits: varied, prompt-dependent greedy text instead of one repeated token
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def thinking_model(chat_model_dir, tmp_path_factory):
    """The tiny chat model with <think> and </think> added to its tokenizer as single (plain) tokens,
    as Qwen3's and DeepSeek-R1's tokenizers have them, and two more rows in its embedding. Returns
    the folder and the two tags' ids."""
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("thinking-tags")
    shutil.copytree(chat_model_dir, path, dirs_exist_ok=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    tok.add_tokens(["<think>", "</think>"])
    tok.save_pretrained(path)
    state = load_file(str(path / "model.safetensors"))
    emb = state["model.embed_tokens.weight"]
    state["model.embed_tokens.weight"] = torch.cat([emb, emb[:2].flip(1)])
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = transformers.AutoConfig.from_pretrained(str(path))
    config.vocab_size = len(tok)
    config.save_pretrained(path)
    return path, tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
