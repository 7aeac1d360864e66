"""Penalties, logit bias, min_tokens and logprobs: the sampler against transformers' own logits
processors and a hand-computed formula, and the engine's logprobs against the reference model."""

from __future__ import annotations

import pytest
import torch

from cachedattention import LLM, SamplingParams
from cachedattention.sampling import adjust_logits, sample_batch, token_logprob
from tests.util import rel_err


def _row(seed: int = 0, vocab: int = 50) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    row, prompt, output = _row(), [3, 7, 7, 11], [11, 20, 4]
    ours = adjust_logits(row, SamplingParams(repetition_penalty=1.3), prompt, output)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), row[None].clone())[0]
    torch.testing.assert_close(ours, ref)
    assert not torch.equal(ours, row)  # the penalty changed something (tokens 3, 4, 7, 11, 20)


def test_a_tiny_repetition_penalty_samples_among_the_seen_tokens_it_lifts_past_float32_range():
    """logit / 1e-300 overflows float32: those tokens become the likeliest (the largest finite logit),
    and sampling picks among them instead of failing on NaN probabilities (which aborted the step,
    and every request in it)."""
    row = _row(3)
    seen = [i for i in range(50) if row[i] > 0][:3]
    params = SamplingParams(temperature=0.5, repetition_penalty=1e-300, seed=0)
    adjusted = adjust_logits(row, params, seen, [])
    assert torch.isfinite(adjusted).all() and all(adjusted[i] == torch.finfo(torch.float32).max for i in seen)
    picks = {sample_batch(row[None], [params], [torch.Generator().manual_seed(k)], [(seen, [])])[0] for k in range(20)}
    assert picks <= set(seen) and len(picks) > 1


def test_a_tiny_repetition_penalty_never_brings_back_a_token_ruled_out():
    """Found by a review: -inf (EOS held back by min_tokens, a token outside allowed_token_ids) times
    a penalty of 1e-300 (0 in float32) was NaN: sampling failed, greedy picked the banned EOS."""
    row = _row(4)
    for params in (SamplingParams(temperature=0, repetition_penalty=1e-300, min_tokens=4, eos_token_ids=(2,)),
                   SamplingParams(temperature=0.7, seed=3, repetition_penalty=1e-300, min_tokens=4, eos_token_ids=(2,)),
                   SamplingParams(temperature=0.7, seed=3, repetition_penalty=1e-300, allowed_token_ids=[5, 6])):
        adjusted = adjust_logits(row, params, [1, 2, 3, 9], [])
        assert not adjusted.isnan().any()
        token = sample_batch(row[None], [params], [torch.Generator().manual_seed(0)], [([1, 2, 3, 9], [])])[0]
        assert token != 2 and (not params.allowed_token_ids or token in (5, 6))
    logit_zero = row.clone()
    logit_zero[9] = 0.0
    huge = adjust_logits(logit_zero, SamplingParams(repetition_penalty=1e39), [9], [])  # (offline: no upper bound)
    assert huge[9] == 0.0


def test_presence_and_frequency_penalties_follow_openai_formula():
    row, output = _row(1), [5, 5, 5, 9]
    ours = adjust_logits(row, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [5, 6], output)
    expected = row.clone()
    expected[5] -= 0.25 * 3 + 0.5
    expected[9] -= 0.25 * 1 + 0.5
    torch.testing.assert_close(ours, expected)  # the prompt's tokens (6) are not penalised
    assert torch.equal(row, _row(1))  # the engine's logits are left alone (logprobs read them)


def test_logit_bias_and_min_tokens():
    row = _row(2)
    params = SamplingParams(logit_bias={4: 100.0, 8: -100}, min_tokens=2, stop_token_ids=(6,), eos_token_ids=(2,))
    early = adjust_logits(row, params, [1], [4])
    assert early[4] == row[4] + 100 and early[8] == row[8] - 100
    assert early[2] == float("-inf") and early[6] == float("-inf")
    late = adjust_logits(row, params, [1], [4, 4])  # min_tokens reached: EOS and stop tokens allowed again
    assert late[2] == row[2] and late[6] == row[6]


def test_sample_batch_applies_adjustments_only_to_rows_that_ask():
    logits = torch.stack([_row(3), _row(3)])
    top = int(logits[0].argmax())
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={top: -100})]
    plain, biased = sample_batch(logits, params, [None, None], [([], []), ([], [])])
    assert plain == top and biased != top
    assert biased == int(logits[1].clone().index_fill_(0, torch.tensor([top]), -1e9).argmax())


def test_token_logprob_rank_and_alternatives():
    row = _row(4)
    lp = torch.log_softmax(row, -1)
    order = lp.argsort(descending=True).tolist()
    got = token_logprob(row, order[2], 3)
    assert got.token_id == order[2] and got.rank == 3
    assert got.logprob == pytest.approx(float(lp[order[2]]), abs=1e-6)
    assert [t for t, _ in got.top] == order[:3]
    assert got.top[0][1] == pytest.approx(float(lp[order[0]]), abs=1e-6)
    assert token_logprob(row, order[0], 0).top == ()


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(presence_penalty=10**400), "presence_penalty"),
        (dict(frequency_penalty="1"), "frequency_penalty"),
        (dict(min_tokens=9, max_tokens=8), "min_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(logprobs=-1), "logprobs"),  # the most a request may ask for is the engine's max_logprobs
        (dict(logprobs=True), "logprobs"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(logit_bias={3: float("inf")}), "logit_bias"),
        (dict(logit_bias={"3": 1.0}), "logit_bias"),
        (dict(stop_token_ids=(-1,)), "stop_token_ids"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(allowed_token_ids=[1, -2]), "allowed_token_ids"),
        (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    ],
)
def test_bad_sampling_params_are_refused_by_name(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**kwargs)


def test_engine_logprobs_match_transformers(tiny_dirs):
    path, hf = tiny_dirs["llama"]
    llm = LLM(model=str(path))
    prompt = [1, 17, 33, 5, 90, 200, 41]
    out = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3))[0]
    assert len(out.logprobs) == len(out.token_ids) == 5
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + out.token_ids])).logits[0].float(), -1)
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_id == token and lp.rank == 1  # greedy picks the most likely token
        assert rel_err(torch.tensor([lp.logprob]), row[token : token + 1]) < 1e-4
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()
    assert llm.generate([prompt], SamplingParams(max_tokens=2))[0].logprobs is None  # only when asked


def test_prompt_logprobs_match_transformers_over_chunked_prefill_and_skip_cached_prefixes(tiny_dirs, tmp_path):
    """Each prompt token's log-probability given the tokens before it, computed in chunks of 16
    beside another prompt; a prompt whose prefix is cached (device and store) still computes it all."""
    from cachedattention import SchedulerConfig

    path, hf = tiny_dirs["llama"]
    llm = LLM(model=str(path), scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4),
              enable_store=True, store_dir=str(tmp_path), host_bytes=1 << 26)  # fmt: skip
    prompt = [(7 * i + 3) % 250 + 1 for i in range(45)]
    other = [(11 * i + 5) % 250 + 1 for i in range(30)]
    plain = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    asked = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2)
    llm.generate([prompt], plain, session_id="s")  # the prompt's KV is now in the device cache and the store
    out, side = llm.generate([prompt, other], [asked, plain])
    assert side.prompt_logprobs is None and out.metrics.cached_tokens == {"device": 0, "host": 0, "disk": 0, "remote": 0}
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j, lp in enumerate(out.prompt_logprobs[1:], start=1):
        row = ref[j - 1]
        assert lp.token_id == prompt[j] and rel_err(torch.tensor([lp.logprob]), row[prompt[j] : prompt[j] + 1]) < 1e-4
        assert lp.rank == int((row > row[prompt[j]]).sum()) + 1
        assert [t for t, _ in lp.top] == row.topk(2).indices.tolist()
    assert out.token_ids == llm.generate([prompt], plain)[0].token_ids  # the answer is unchanged
    again = llm.generate([prompt], plain, session_id="s")[0]  # the session's KV still serves a plain turn
    assert sum(again.metrics.cached_tokens.values()) > 0


def test_prompt_logprobs_survive_preemption(tiny_dirs):
    """A pool too small for both: the newer request (asking for prompt logprobs) is preempted and
    recomputed, and still lists each prompt token once, with the same values."""
    from cachedattention import SchedulerConfig
    from cachedattention.config import CacheConfig

    path, _ = tiny_dirs["llama"]
    asking = [(7 * i + 3) % 250 + 1 for i in range(60)]
    other = [(11 * i + 5) % 250 + 1 for i in range(60)]
    asked = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, prompt_logprobs=1)
    alone = LLM(model=str(path)).generate([asking], asked)[0]
    llm = LLM(model=str(path), cache=CacheConfig(num_pages=9, enable_prefix_cache=False), max_model_len=144,
              scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4))  # fmt: skip
    _, out = llm.generate([other, asking], [SamplingParams(max_tokens=60, temperature=0, ignore_eos=True), asked])
    assert llm.engine.scheduler.num_preemptions > 0
    assert [e.token_id for e in out.prompt_logprobs[1:]] == asking[1:] and out.token_ids == alone.token_ids
    assert [e.logprob for e in out.prompt_logprobs[1:]] == pytest.approx([e.logprob for e in alone.prompt_logprobs[1:]],
                                                                        abs=1e-5)  # fmt: skip


def test_engine_penalties_change_greedy_output_and_min_tokens_holds_eos(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path))
    prompt = [1, 17, 33, 5, 90]
    plain = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
    assert len(set(plain)) < len(plain)  # a random tiny model repeats itself: something to penalise
    fresh = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                  presence_penalty=2.0, frequency_penalty=2.0))[0].token_ids  # fmt: skip
    assert fresh != plain
    # EOS forced by the bias, held off by min_tokens until three tokens came before it (as vLLM)
    eos = SamplingParams(max_tokens=8, temperature=0, logit_bias={2: 100.0}, min_tokens=3)
    out = llm.generate([prompt], eos)[0]
    assert out.token_ids[-1] == 2 and len(out.token_ids) == 4 and out.finish_reason == "stop"
    assert 2 not in out.token_ids[:3]
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([prompt], SamplingParams(logit_bias={10_000: 1.0}))
    with pytest.raises(ValueError, match="stop_token_ids"):  # min_tokens would index the logits with it
        llm.generate([prompt], SamplingParams(stop_token_ids=(10_000,), min_tokens=2))


def test_a_stop_string_before_min_tokens_is_kept(embedded_llm):
    """As vLLM: stop strings count from the min_tokens-th token on; an earlier one stays in the text."""
    llm = embedded_llm
    prompt = "The days of the week are Monday, Tuesday, Wednesday,"
    free = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    stop = ","
    first = free.text.find(stop)
    assert 0 <= first and free.text.count(stop) >= 2, free.text  # a list: commas early and later
    early = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=(stop,)))[0]
    assert early.text == free.text[:first] and early.finish_reason == "stop"
    # min_tokens past the first comma's token: the text keeps it and stops at a later one
    upto = next(i for i in range(1, 13) if stop in llm.tokenizer.decode(free.token_ids[:i]))
    # with a longer stop string beside it: each is looked for only where it could end past min_tokens
    stops = (stop, "a stop string far longer than the text before min_tokens")
    late = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=stops,
                                                 min_tokens=upto + 1))[0]  # fmt: skip
    assert late.finish_reason == "stop" and len(late.text) > first
    assert free.text.startswith(late.text) and free.text[len(late.text)] == stop
    # a stop string at the very start leaves no text at all
    at_start = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop=(free.text[:2],)))[0]
    assert at_start.text == "" and at_start.finish_reason == "stop"


def test_generate_takes_one_sampling_params_per_prompt(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path))
    prompts = [[1, 17, 33], [1, 40, 41, 42]]
    each = [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=1)]  # fmt: skip
    outs = llm.generate(prompts, each)
    assert [len(o.token_ids) for o in outs] == [3, 5] and outs[0].logprobs is None and len(outs[1].logprobs) == 5
    assert [o.token_ids for o in outs] == [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, each)]
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(prompts, each[:1])
    with pytest.raises(ValueError, match="logit_bias"):  # the second prompt is refused: the first is withdrawn
        llm.generate(prompts, [each[0], SamplingParams(logit_bias={10_000: 1.0})])
    assert not llm.engine.has_unfinished()


def test_chat_runs_a_list_of_conversations_together(embedded_llm):
    llm = embedded_llm
    convs = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Name a fruit."}]]
    each = [SamplingParams(max_tokens=4, temperature=0), SamplingParams(max_tokens=6, temperature=0)]
    outs = llm.chat(convs, each, session_id=["c1", "c2"])
    assert [o.text for o in outs] == [llm.chat(c, sp)[0].text for c, sp in zip(convs, each)]
    assert [o.session_id for o in outs] == ["c1", "c2"]
    with pytest.raises(ValueError, match="distinct session ids"):
        llm.chat(convs, each, session_id=["same", "same"])
    with pytest.raises(ValueError, match="role"):  # the second conversation is bad: nothing runs
        llm.chat([convs[0], [{"role": "wizard", "content": "hi"}]])
    assert not llm.engine.has_unfinished()


def test_min_p_and_allowed_token_ids_shape_the_draw():
    from cachedattention.sampling import make_generator

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, min_p=0.4, seed=1)  # keeps p >= 0.2: tokens 0 and 1
    gen = make_generator(params, "cpu")
    drawn = {sample_batch(logits[None], [params], [gen], [((), ())])[0] for _ in range(300)}
    assert drawn == {0, 1}
    allowed = SamplingParams(temperature=0, allowed_token_ids=[2, 3])
    assert sample_batch(logits[None], [allowed], [None], [((), ())]) == [2]  # the most likely of the allowed
    sampled = SamplingParams(temperature=1.0, allowed_token_ids=[1, 3], seed=2)
    gen = make_generator(sampled, "cpu")
    assert {sample_batch(logits[None], [sampled], [gen], [((), ())])[0] for _ in range(200)} == {1, 3}


def test_include_stop_str_in_output_and_truncate_prompt_tokens(embedded_llm):
    llm = embedded_llm
    prompt = "The days of the week are Monday, Tuesday, Wednesday,"
    free = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    stop = free.text[3:6]
    cut = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop=stop))[0]
    kept = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop=stop,
                                                 include_stop_str_in_output=True))[0]  # fmt: skip
    assert kept.finish_reason == cut.finish_reason == "stop"
    assert kept.text == cut.text + stop and free.text.startswith(kept.text)
    ids = llm.tokenizer.encode(prompt)
    short = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, truncate_prompt_tokens=5))[0]
    assert short.prompt_token_ids == ids[-5:]
    with pytest.raises(ValueError, match="truncate_prompt_tokens") as e:
        llm.generate([prompt], SamplingParams(max_tokens=2, truncate_prompt_tokens=5), session_id="s")
    assert e.value.param == "truncate_prompt_tokens"
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate([prompt], SamplingParams(max_tokens=2, allowed_token_ids=[10**7]))


def test_the_token_that_stops_an_answer_is_not_in_its_text(embedded_llm):
    """As vLLM: an EOS or stop token ends the answer (it is in token_ids) but not its text, whatever
    skip_special_tokens says, unless include_stop_str_in_output."""
    llm = embedded_llm
    prompt = "The days of the week are Monday, Tuesday, Wednesday,"
    free = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    word = free.token_ids[2]
    before = llm.tokenizer.decode(free.token_ids[:2])
    stopped = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(word,)))[0]
    assert stopped.token_ids == free.token_ids[:3] and stopped.text == before
    kept = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(word,),
                                                 include_stop_str_in_output=True))[0]  # fmt: skip
    assert kept.text == llm.tokenizer.decode(free.token_ids[:3])
    end = llm.tokenizer.eos_token_id
    forced = SamplingParams(max_tokens=4, temperature=0, logit_bias={end: 100.0}, skip_special_tokens=False)
    out = llm.generate([prompt], forced)[0]
    assert out.token_ids == [end] and out.finish_reason == "stop" and out.text == ""


def test_bad_words_never_appear_as_their_tokens(chat_model_dir):
    from dataclasses import replace

    from cachedattention.sampling import _bad_word_ends

    assert _bad_word_ends([(7,), (1, 2, 3)], [9, 1, 2]) == [7, 3] and _bad_word_ends([(1, 2, 3)], [2]) == []
    llm = LLM(str(chat_model_dir))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    free = llm.generate(["The weather today is"], params)[0]
    tok = llm.engine.tokenizer
    words = [w for w in (tok.decode(free.token_ids[i : i + 2]).strip() for i in range(0, 10, 2)) if w][:3]
    assert words  # words the unconstrained answer writes
    kept_out = llm.engine._bad_words_ids(words)
    answer = llm.generate(["The weather today is"], replace(params, bad_words=words))[0].token_ids
    for word in kept_out:
        n = len(word)
        assert all(tuple(answer[i : i + n]) != word for i in range(len(answer) - n + 1)), (word, answer)
    assert answer != free.token_ids
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=[" "])
    with pytest.raises(ValueError, match="bad_words_ids out of the vocabulary"):  # refused, not a failed step
        llm.engine.add_request([5, 6], replace(params, bad_words_ids=((10**6,),)))
