"""What a script written for vLLM's offline API calls: `sampling_params=`, `use_tqdm`, `lora_request`,
`priority`, `chat` returning a list, `stop_reason`, `num_cached_tokens`, `get_tokenizer`,
`reset_prefix_cache`, and SamplingParams' vLLM fields (a default of 16 tokens, `max_tokens=None`,
`top_k=-1`, `clone`, `structured_outputs` / `guided_decoding`, `detokenize`, `extra_args`)."""

import json
import shutil

import pytest
import torch

from cachedattention import LLM, GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from cachedattention.errors import InvalidRequest
from cachedattention.llm_args import engine_dtype
from cachedattention.model.loader import load_tokenizer

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
IDS = [5, 9, 13, 17, 21]
HI = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def llm(chat_model_dir):
    return LLM(model=str(chat_model_dir), max_model_len=64)


class Bar:
    """A tqdm-like progress bar that records what it was told."""

    made: list["Bar"] = []

    def __init__(self, total, **kw):
        self.total, self.done, self.closed = total, 0, False
        Bar.made.append(self)

    def update(self, n):
        self.done += n

    def close(self):
        self.closed = True


def test_sampling_params_by_vllms_keyword_or_ours_not_both(llm):
    want = llm.generate(IDS, GREEDY)[0].token_ids
    assert llm.generate(IDS, sampling_params=GREEDY)[0].token_ids == want
    assert llm.generate(IDS, params=GREEDY)[0].token_ids == want
    with pytest.raises(ValueError, match="not both"):
        llm.generate(IDS, sampling_params=GREEDY, params=GREEDY)
    assert llm.chat(HI, sampling_params=GREEDY)[0].token_ids == llm.chat(HI, GREEDY)[0].token_ids


def test_chat_returns_a_list_as_vllm(llm):
    outs = llm.chat(HI, GREEDY)
    assert isinstance(outs, list) and len(outs) == 1 and len(outs[0].token_ids) == 6
    both = llm.chat([HI, HI], GREEDY)
    assert [o.token_ids for o in both] == [outs[0].token_ids] * 2
    with pytest.raises(ValueError, match="chat_template_content_format must be one of auto, string, openai"):
        llm.chat(HI, GREEDY, chat_template_content_format="parts")
    assert llm.chat(HI, GREEDY, chat_template_content_format="string")[0].token_ids == outs[0].token_ids
    with pytest.raises(ValueError, match="failed to render"):  # its template adds the content to a string
        llm.chat(HI, GREEDY, chat_template_content_format="openai")


def test_a_progress_bar_counts_the_prompts_or_none(llm):
    Bar.made.clear()
    params = [GREEDY, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, n=2)]
    llm.generate([IDS, IDS[:3]], params, use_tqdm=Bar)
    (bar,) = Bar.made
    assert (bar.total, bar.done, bar.closed) == (2, 2, True)  # (the n=2 prompt counted once, when both ended)
    llm.generate(IDS, GREEDY, use_tqdm=False)
    llm.chat(HI, GREEDY, use_tqdm=Bar)
    assert len(Bar.made) == 2 and Bar.made[1].done == 1
    with pytest.raises(ValueError, match="use_tqdm must be"):  # (was a TypeError: 'str' object is not callable)
        llm.chat(HI, GREEDY, use_tqdm="x")
    assert not llm.engine.has_unfinished()


def test_vllms_third_positional_argument_is_use_tqdm(llm, capsys):
    out = llm.generate(IDS, GREEDY, False)[0]  # (vLLM's generate(prompts, sampling_params, use_tqdm))
    assert out.token_ids and "Processed prompts" not in capsys.readouterr().err
    llm.chat(HI, GREEDY, True)
    assert "Processed prompts" in capsys.readouterr().err
    assert llm.chat(HI, GREEDY, False)[0].text and "Processed prompts" not in capsys.readouterr().err


def test_a_lora_request_of_another_type_is_refused_and_priority_is_one_per_prompt(llm, chat_model_dir):
    with pytest.raises(ValueError, match="must be a LoRARequest"):  # (adapters themselves: tests/test_lora.py)
        llm.generate(IDS, GREEDY, lora_request=object())
    with pytest.raises(ValueError, match="must be a LoRARequest"):
        llm.chat(HI, GREEDY, lora_request=object())
    with pytest.raises(ValueError, match="one integer per prompt"):
        llm.generate([IDS, IDS], GREEDY, priority=[1])
    with pytest.raises(InvalidRequest, match="priority scheduling policy"):  # (as vLLM, under FCFS)
        llm.generate([IDS, IDS], GREEDY, priority=[1, 0])
    ranked = LLM(model=str(chat_model_dir), scheduling_policy="priority", max_num_seqs=1)
    outs = ranked.generate([IDS, IDS[:4]], GREEDY, priority=[1, 0])
    assert outs[1].metrics.first_token_s < outs[0].metrics.first_token_s  # (one at a time: the lower first)


def test_stop_reason_names_the_stop_token_or_string(llm):
    free = llm.generate(IDS, GREEDY)[0]
    assert free.finish_reason == "length" and free.stop_reason is None and free.outputs[0].stop_reason is None
    token = free.token_ids[2]
    by_token = llm.generate(IDS, SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[token]))[0]
    assert by_token.finish_reason == "stop" and by_token.stop_reason == token == by_token.outputs[0].stop_reason
    text = llm.generate("Hello there", GREEDY)[0].text
    stop = text.strip()[2:5]
    by_string = llm.generate("Hello there", SamplingParams(max_tokens=6, temperature=0, stop=[stop]))[0]
    assert by_string.stop_reason == stop and by_string.outputs[0].stop_reason == stop


def test_dtype_may_be_a_torch_dtype_or_a_name_in_any_case(chat_model_dir):
    """As vLLM's LLM(dtype=...): torch.float32 as "float32", "HALF" as "half"; float64 is refused."""
    assert LLM(model=str(chat_model_dir), dtype=torch.float32).config.dtype == "float32"
    for dtype, ours in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16"), ("HALF", "float16"), ("Auto", "float16")):
        assert engine_dtype(dtype, "cuda", None) == ours
    with pytest.raises(ValueError, match="dtype must be one of .*got torch.float64"):
        LLM(model=str(chat_model_dir), dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype must be a name .* or a torch dtype, got int"):
        LLM(model=str(chat_model_dir), dtype=32)


def test_stop_reason_of_the_generation_configs_other_end_ids(chat_model_dir, tmp_path):
    """As vLLM: only the tokenizer's own EOS leaves stop_reason None; generation_config.json's other
    end ids (Llama 3.1's <|eom_id|>) are stop tokens there, so an answer they end names its id."""
    model = tmp_path / "model"
    shutil.copytree(chat_model_dir, model)
    own = load_tokenizer(str(chat_model_dir), 49152).eos_token_id
    other = 0 if own != 0 else 1
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [own, other]}))
    llm = LLM(model=str(model))

    def ended_by(token: int, **kw) -> object:
        out = llm.generate(IDS, SamplingParams(max_tokens=4, temperature=0, logit_bias={token: 100}, **kw))[0]
        assert out.token_ids == [token] and out.finish_reason == "stop"
        return out.stop_reason

    assert ended_by(other) == other
    assert ended_by(own) is None
    assert ended_by(own, ignore_eos=True, stop_token_ids=[own]) == own  # (no EOS then: a stop token)


def test_cached_tokens_tokenizer_and_resetting_the_prefix_cache(llm):
    llm.reset_prefix_cache()
    prompt = list(range(100, 140))
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 0
    again = llm.generate(prompt, GREEDY)[0]
    assert again.num_cached_tokens == again.metrics.num_cached_tokens > 0  # (the device prefix cache's blocks)
    assert llm.reset_prefix_cache() is True
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 0
    assert llm.get_tokenizer() is llm.tokenizer is not None


def test_sampling_params_take_vllms_values():
    assert SamplingParams().max_tokens == 16  # (vLLM's default)
    assert SamplingParams(top_k=-1) == SamplingParams(top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)
    p = SamplingParams(max_tokens=7, stop=["x"], extra_args={"mine": 1})
    assert p.clone() == p and p.clone() is not p and p.clone().extra_args == {"mine": 1}
    with pytest.raises(ValueError, match="extra_args"):
        SamplingParams(extra_args=[1])


def test_max_tokens_none_runs_to_the_end_of_the_window(llm):
    out = llm.generate(IDS, SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(IDS) + len(out.token_ids) == 64


class StructuredOutputs:
    """Shaped as vLLM's StructuredOutputsParams (its fields as attributes, unset ones None)."""

    def __init__(self, **given):
        for name in ("json", "regex", "choice", "grammar", "json_object", "structural_tag", "whitespace_pattern"):
            setattr(self, name, given.pop(name, None))
        self.disable_any_whitespace, self.backend = given.pop("disable_any_whitespace", False), None
        assert not given


def test_structured_outputs_read_into_the_guided_fields(llm):
    choices = ["yes", "no", "maybe"]
    p = SamplingParams(max_tokens=8, temperature=0, structured_outputs=StructuredOutputs(choice=choices))
    assert p.choice == tuple(choices) and p.guided_field == "choice" and p == SamplingParams(
        max_tokens=8, temperature=0, choice=choices)
    assert llm.generate("Answer:", p)[0].text in choices
    assert SamplingParams(guided_decoding={"regex": "[0-9]+"}).regex == "[0-9]+"
    assert SamplingParams(guided_decoding=GuidedDecodingParams(regex="[0-9]+")).regex == "[0-9]+"
    ours = SamplingParams(max_tokens=8, temperature=0, structured_outputs=StructuredOutputsParams(choice=choices))
    assert ours == p
    with pytest.raises(ValueError, match="disable_any_whitespace is not supported"):
        SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True, disable_any_whitespace=True))
    assert SamplingParams(structured_outputs={"json": {"type": "object"}}).json_schema == '{"type": "object"}'
    with pytest.raises(ValueError, match="cannot both be given"):
        SamplingParams(structured_outputs={"regex": "a"}, guided_decoding={"regex": "a"})
    with pytest.raises(ValueError, match="cannot both be given"):
        SamplingParams(structured_outputs={"regex": "a"}, regex="b")
    with pytest.raises(ValueError, match="whitespace_pattern is not supported"):
        SamplingParams(structured_outputs=StructuredOutputs(json={}, whitespace_pattern=" "))


def test_structured_outputs_naming_no_constraint_are_refused():
    """As vLLM's StructuredOutputsParams: one kind of constraint, exactly; a dict's misspelt key is
    named (it would leave the answer unconstrained)."""
    for empty in (StructuredOutputsParams, GuidedDecodingParams):
        with pytest.raises(ValueError, match="none are specified"):
            empty()
    with pytest.raises(ValueError, match="multiple are specified: regex, choice"):
        StructuredOutputsParams(regex="a", choice=["b"])
    for name in ("structured_outputs", "guided_decoding"):
        for nothing in ({}, {"json_object": False}, StructuredOutputs(), StructuredOutputs(json_object=False)):
            with pytest.raises(ValueError, match=f"{name}: You must use one kind .* none are specified"):
                SamplingParams(**{name: nothing})
        with pytest.raises(ValueError, match=f"{name} has unknown key.* 'choices': its keys are .*choice"):
            SamplingParams(**{name: {"choices": ["yes", "no"]}})
    with pytest.raises(ValueError, match="'jsn'"):
        SamplingParams(structured_outputs={"jsn": {"type": "integer"}, "json_object": None})


def test_detokenize_false_gives_token_ids_only(llm):
    want = llm.generate("Hello there", GREEDY)[0]
    out = llm.generate("Hello there", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, detokenize=False))[0]
    assert out.token_ids == want.token_ids and want.text and out.text == "" == out.outputs[0].text
    # as vLLM: no logprob entry's decoded_token either (those of a detokenized request have them)
    asked = dict(max_tokens=3, temperature=0, logprobs=2, prompt_logprobs=1)
    plain, texted = llm.generate(["Hello there"] * 2, [SamplingParams(**asked, detokenize=False), SamplingParams(**asked)])
    for out, decoded in ((plain, False), (texted, True)):
        entries = [*out.outputs[0].logprobs, *out.prompt_logprobs[1:]]
        assert entries and all((lp.decoded_token is not None) == decoded for e in entries for lp in e.values())
    with pytest.raises(ValueError, match="detokenize=False"):
        SamplingParams(stop=["x"], detokenize=False)


def test_logprobs_read_as_vllms_dicts_of_logprob(llm):
    out = llm.generate("Hello there", SamplingParams(max_tokens=4, temperature=0, logprobs=3, prompt_logprobs=2))[0]
    tok = llm.get_tokenizer()
    for token, entry in zip(out.token_ids, out.outputs[0].logprobs):
        assert entry[token].rank == 1 and entry[token].logprob == entry.logprob  # (greedy: its own is the top)
        assert len(entry) == 3 and [lp.rank for lp in entry.values()] == [1, 2, 3]
        assert all(lp.decoded_token == tok.decode([t], skip_special_tokens=False) for t, lp in entry.items())
        ranked = sorted(entry.items(), key=lambda item: -item[1].logprob)
        assert [t for t, _ in ranked] == [t for t, _ in entry.top]
    assert out.prompt_logprobs[0] is None
    second = out.prompt_logprobs[1]
    assert out.prompt_token_ids[1] in second and 2 <= len(second) <= 3
    assert second[out.prompt_token_ids[1]].decoded_token == tok.decode([out.prompt_token_ids[1]], skip_special_tokens=False)
