"""N-gram speculation (vLLM's speculative_config, method "ngram"): the proposer, its config, and the
contract: a greedy answer (and a sampled one drawn from the same random state) is the same, token for
token (logprobs within float32's noise), with speculation on as off, whatever the proposals; the KV
the store and the prefix cache keep after a speculating step is that of the tokens kept, so a cached
turn still equals recompute."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cachedattention import LLM, CacheConfig, SamplingParams
from cachedattention.config import SpeculativeConfig
from cachedattention.engine.ngram import propose
from tests.util import generate_capturing, rel_err

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
# a prompt that repeats itself: an answer that goes on with it is proposed from it
LOOP = [5, 6, 7, 8, 9, 10, 11, 12] * 4


def test_the_latest_match_of_the_longest_suffix_gives_the_proposal():
    assert propose([1, 2, 3, 4, 5, 1, 2, 3], 3, 1, 3) == [4, 5, 1]
    assert propose([1, 2, 3, 9, 7, 2, 3, 8, 4, 2, 3], 2, 1, 2) == [8, 4]  # the latest of two matches
    assert propose([4, 2, 3, 9, 1, 3], 2, 1, 2) == [9, 1]  # [1, 3] never before: [3] does
    assert propose([4, 2, 3, 9, 1, 3], 2, 2, 2) == []  # (not below prompt_lookup_min)
    assert propose([7, 7, 7, 7, 7, 7], 3, 1, 3) == [7, 7, 7]  # a run: the latest match followed by k tokens
    assert propose([1, 2, 6, 1, 2, 5, 1, 2], 4, 2, 2) == [6, 1, 2, 5]  # the latest followed by 4 tokens
    assert propose([7, 7, 7, 7], 3, 1, 3) == [7]  # none followed by 3: the first, up to the end
    assert propose([1, 2], 0, 1, 3) == [] and propose([5], 3, 1, 3) == []


def test_vllm_s_config_fields_and_refusals():
    assert SpeculativeConfig.of(None) is None
    both = SpeculativeConfig.of({"method": "ngram", "num_speculative_tokens": 5})
    assert (both.prompt_lookup_min, both.prompt_lookup_max) == (5, 5)  # vLLM's default when neither is given
    one = SpeculativeConfig.of({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3})
    assert (one.prompt_lookup_min, one.prompt_lookup_max) == (3, 3)
    for bad, match in (({"method": "eagle"}, "not supported"), ({"model": "x"}, "'model' is not supported"),
                       ({"num_speculative_tokens": 0}, "1-32"),
                       ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "min <= max"),
                       ({"num_speculative_tokens": "4"}, "must be int")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.of(bad)
    with pytest.raises(ValueError, match="must be a dict"):
        SpeculativeConfig.of("ngram")


@pytest.mark.parametrize("kind", ["llama", "qwen3-moe", "mistral-window", "gemma2", "phi3"])
def test_greedy_answers_are_the_same_with_speculation(kind, tiny_dirs):
    """Fused C layers (llama), a mixture (qwen3-moe), a sliding window (mistral-window) and the
    per-operation path (gemma2's capped scores), several requests in one step: the same tokens,
    logprobs within 1e-4, and (llama) proposals both kept and dropped on the way."""
    path, _ = tiny_dirs[kind]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2)
    prompts = [LOOP, LOOP[3:] + [40, 41], list(range(20, 50))]
    base = LLM(model=str(path)).generate(prompts, params, use_tqdm=False)
    llm = LLM(model=str(path), speculative_config=NGRAM)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in base]
    for a, b in zip(got, base):
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) <= 1e-4
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
    counts = llm.engine.spec_counts
    assert counts["drafts"] > 0
    if kind == "llama":
        assert 0 < counts["accepted_tokens"] < counts["draft_tokens"], counts
    llm.engine.pages.check_integrity()
    assert not llm.engine.requests


@pytest.fixture(scope="module")
def loopy_chat_model(tmp_path_factory):
    """A 2-layer random Llama with the embedded model's tokenizer whose greedy answers repeat a word
    (its logits are flat: the proposals are kept), so that a stop string falls inside one."""
    import torch
    import transformers

    from cachedattention.model.embedded import embedded_model_dir

    path = tmp_path_factory.mktemp("loopy-chat")
    tok = transformers.AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   initializer_range=0.05, eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_answers_that_end_inside_a_proposal_end_as_without_it(tiny_dirs, loopy_chat_model):
    """A stop token, max_tokens, a stop string (with its text cut as without speculation) met among
    tokens the model wrote alike: the answer ends there, as it does one token at a time; so do
    history-reading processors (a penalty, min_tokens), applied over each speculated token's own history."""
    path, _ = tiny_dirs["llama"]
    base, llm = LLM(model=str(path)), LLM(model=str(path), speculative_config=NGRAM)
    free = base.generate([LOOP], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    cases = [SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[free.token_ids[12]], ignore_eos=True),
             SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
             # (mild: the loops, and the proposals kept, go on under them)
             SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, repetition_penalty=1.05),
             SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, frequency_penalty=0.05),
             SamplingParams(max_tokens=30, temperature=0, min_tokens=20, stop_token_ids=[free.token_ids[12]])]  # fmt: skip
    for params in cases:
        want = base.generate([LOOP], params, use_tqdm=False)[0]
        got = llm.generate([LOOP], params, use_tqdm=False)[0]
        assert (got.token_ids, got.finish_reason, got.stop_reason) == (want.token_ids, want.finish_reason,
                                                                       want.stop_reason)  # fmt: skip
    assert llm.engine.spec_counts["accepted_tokens"] > 0
    base, llm = LLM(model=str(loopy_chat_model)), LLM(model=str(loopy_chat_model), speculative_config=NGRAM)
    free = base.generate(["The cat sat. The cat sat."], SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)[0]
    stop = base.get_tokenizer().decode(free.token_ids[:6])  # (a word repeated: met at the 6th token, mid-proposal)
    for include in (False, True):
        params = SamplingParams(max_tokens=30, temperature=0, stop=[stop], include_stop_str_in_output=include)
        want = base.generate(["The cat sat. The cat sat."], params, use_tqdm=False)[0]
        got = llm.generate(["The cat sat. The cat sat."], params, use_tqdm=False)[0]
        assert (got.token_ids, got.text, got.stop_reason) == (want.token_ids, want.text, want.stop_reason)
        assert got.finish_reason == "stop"
    assert llm.engine.spec_counts["accepted_tokens"] > 0


SAMPLED = [SamplingParams(max_tokens=40, temperature=0.5, seed=3, ignore_eos=True, logprobs=1),
           SamplingParams(max_tokens=40, temperature=1.0, top_k=4, seed=5, ignore_eos=True),
           SamplingParams(max_tokens=40, temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=7,
                          ignore_eos=True),
           SamplingParams(max_tokens=40, temperature=0.6, ignore_eos=True)]  # (the engine's --seed generator)


def test_sampled_answers_are_the_ones_drawn_without_speculation(tiny_dirs):
    """A sampled answer draws its checked rows one by one up to the first that differs from the
    proposal: its random state moves once per token, so a seeded answer (and, alone, one drawn from
    the engine's --seed generator) is token for token the one drawn a token a step, and the same
    beside other requests. A proposed token is kept with the model's probability for it."""
    path, _ = tiny_dirs["llama"]
    prompts = [LOOP, LOOP[3:] + [40, 41], LOOP[1:], LOOP[2:]]
    base = LLM(model=str(path), seed=0)
    want = [base.generate([p], s, use_tqdm=False)[0] for p, s in zip(prompts, SAMPLED)]
    llm = LLM(model=str(path), seed=0, speculative_config=NGRAM)
    alone = [llm.generate([p], s, use_tqdm=False)[0] for p, s in zip(prompts, SAMPLED)]
    assert [o.token_ids for o in alone] == [o.token_ids for o in want]
    assert [(x.token_id, round(x.logprob, 4)) for x in alone[0].logprobs] == [
        (x.token_id, round(x.logprob, 4)) for x in want[0].logprobs]  # fmt: skip
    counts = llm.engine.spec_counts
    assert 0 < counts["accepted_tokens"] < counts["draft_tokens"], counts
    together = llm.generate(prompts[:3], SAMPLED[:3], use_tqdm=False)  # (seeded ones: their own generators)
    assert [o.token_ids for o in together] == [o.token_ids for o in want[:3]]
    llm.engine.pages.check_integrity()


def test_a_sampled_answer_that_ends_inside_a_proposal_draws_no_further(tiny_dirs):
    """Found by review: a sampled answer whose stop token was a kept proposed token drew the rows
    after it all the same, moving the engine's --seed generator, so the next unseeded request's
    answer differed from the one it has without speculation."""
    path, _ = tiny_dirs["llama"]
    base, llm = LLM(model=str(path), seed=0), LLM(model=str(path), seed=0, speculative_config=NGRAM)
    loop = base.generate([LOOP], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    prompt = LOOP + loop.token_ids + LOOP
    cold = SamplingParams(max_tokens=30, temperature=0.01, ignore_eos=True)
    free = base.generate([prompt], cold, use_tqdm=False)[0].token_ids
    after = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    for stop in dict.fromkeys(free[2:10]):
        for engine in (base, llm):
            engine.engine.rng.manual_seed(0)
        ended = [e.generate([prompt], replace(cold, stop_token_ids=[stop]), use_tqdm=False)[0] for e in (base, llm)]
        assert ended[0].token_ids == ended[1].token_ids and ended[1].finish_reason == "stop"
        assert torch.equal(base.engine.rng.get_state(), llm.engine.rng.get_state()), stop
        nxt = [e.generate([LOOP[1:]], after, use_tqdm=False)[0].token_ids for e in (base, llm)]
        assert nxt[0] == nxt[1]
    assert llm.engine.spec_counts["accepted_tokens"] > 0


def test_guided_answers_are_not_speculated(loopy_chat_model):
    llm = LLM(model=str(loopy_chat_model), speculative_config=NGRAM)
    guided = SamplingParams(max_tokens=20, temperature=0, regex="(ab)+c")
    assert llm.generate(["ab ab ab ab ab"], guided, use_tqdm=False)[0].text.startswith("ab")
    assert llm.engine.spec_counts["drafts"] == 0


def _alike_without_preempting(path, cache: CacheConfig, prompts: list, params) -> None:
    """The answers in a small pool with speculation as without it, no request preempted, proposals made."""
    want = LLM(model=str(path), cache=cache, max_model_len=80).generate(prompts, params, use_tqdm=False)
    llm = LLM(model=str(path), cache=cache, max_model_len=80, speculative_config=NGRAM)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert llm.engine.scheduler.num_preemptions == 0 and llm.engine.spec_counts["drafts"] > 0
    llm.engine.pages.check_integrity()


def test_a_full_pool_drops_proposals_rather_than_preempting(tiny_dirs):
    """Pages for speculated tokens are taken only when free: four requests in a pool that holds them
    with little room to spare never preempt one another for a proposal, and answer as without it."""
    path, _ = tiny_dirs["llama"]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    prompts = [LOOP[k:] for k in range(4)]  # 62 to 59 tokens each with their answers: 4 pages of 16 each
    small = CacheConfig(num_pages=4 * 4 + 1, enable_prefix_cache=False)  # one to spare: not for every proposal
    _alike_without_preempting(path, small, prompts, params)


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_a_speculated_turn_s_kv_serves_the_next_turn_as_recompute(tier, tiny_dirs, tmp_path, monkeypatch):
    """Turns answered with speculation (proposals kept and dropped) are saved with only the kept
    tokens' KV: each next turn, from the device prefix cache, host or disk, equals recomputing it."""
    path, _ = tiny_dirs["llama"]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    kw = {} if tier == "device" else {"cache": CacheConfig(enable_prefix_cache=False)}
    if tier == "disk":
        kw.update(store_dir=str(tmp_path / "store"), host_bytes=0)
    llm = LLM(model=str(path), enable_store=True, speculative_config=NGRAM, **kw)
    ref = LLM(model=str(path), cache=CacheConfig(enable_prefix_cache=False))
    conv = list(LOOP)
    for turn in range(3):
        got, seen = generate_capturing(llm, conv, params, monkeypatch, session_id="s")
        want, seen_ref = generate_capturing(ref, conv, params, monkeypatch)
        assert got.token_ids == want.token_ids
        assert rel_err(seen[0], seen_ref[0]) <= 1e-4  # (the first step's: the turn's prompt over its cached history)
        if turn:
            assert got.metrics.cached_tokens[tier] > 0
        conv = conv + got.token_ids + [13 + turn, 14 + turn]
        llm.engine.store.store.flush()
    counts = llm.engine.spec_counts
    assert 0 < counts["accepted_tokens"] < counts["draft_tokens"], counts
    llm.engine.store.check_integrity()
    llm.engine.pages.check_integrity()


def test_each_checked_row_sees_the_speculated_tokens_before_it(tiny_dirs):
    """The row after a speculated token is processed over a history holding it: a bad word (A, A)
    keeps A out of the row after a speculated A, so that row's token is its second best, and the
    proposal's second A is dropped."""
    import torch

    path, _ = tiny_dirs["llama"]
    engine = LLM(model=str(path), speculative_config=NGRAM).engine  # (4 tokens at most)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, bad_words_ids=[[7, 7]])
    engine.add_request([5, 6, 8, 9, 10, 11], params, request_id="r")
    engine.step()  # the prompt: the request now decodes
    req = engine.requests["r"]
    rows = torch.zeros(3, engine.spec.vocab_size)
    rows[:, 7], rows[:, 3] = 5.0, 4.0  # each row would write 7, else 3
    req.draft = [7, 7]
    out = engine._check_draft(req, rows)
    first = out.token_ids[0]

    def rows_of(row: torch.Tensor, n: int) -> torch.Tensor:
        return row[:1].expand(n, -1).clone()

    assert out.token_ids[1:] == [7, 3] and first != 7  # (the speculated 7, then 3: 7 after 7 is a bad word)
    assert req.num_computed == len(req.prompt_token_ids) + 2 and not req.draft
    assert req.spec_len == 2  # (one kept: next time it proposes what was kept and one more)
    rows[:, 7], rows[:, 3] = 4.0, 5.0  # each row would write 3: three 3s proposed, all kept
    req.draft = [3, 3, 3]
    assert engine._check_draft(req, rows_of(rows, 4)).token_ids[-4:] == [3, 3, 3, 3] and req.spec_len == 4


def test_a_server_with_speculation_answers_alike_and_counts_its_proposals_as_vllm(tiny_dirs):
    import httpx

    from cachedattention.config import EngineConfig
    from tests.server.conftest import start_server

    path, _ = tiny_dirs["llama"]
    server = start_server(EngineConfig(model=str(path), speculative=SpeculativeConfig.of(NGRAM)))
    try:
        body = {"prompt": LOOP, "max_tokens": 30, "temperature": 0, "ignore_eos": True, "logprobs": 1,
                "return_tokens_as_token_ids": True}  # (this model has no tokenizer: its tokens as ids)
        got = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        want = LLM(model=str(path)).generate([LOOP], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
        assert got["logprobs"]["tokens"] == [f"token_id:{t}" for t in want.token_ids]
        assert got["finish_reason"] == "length"
        metrics = httpx.get(f"{server.url}/metrics").text
        counts = server.app.state.engine_loop.engine.spec_counts
        assert counts["accepted_tokens"] > 0
        for name, key in (("drafts", "drafts"), ("draft_tokens", "draft_tokens"), ("accepted_tokens", "accepted_tokens")):
            assert f"vllm:spec_decode_num_{name}_total{{model_name=" in metrics
            line = next(x for x in metrics.splitlines() if x.startswith(f"vllm:spec_decode_num_{name}_total{{"))
            assert float(line.rsplit(" ", 1)[1]) == counts[key]
    finally:
        server.stop()


def test_a_proposal_leaves_the_page_a_later_decoder_needs(tiny_dirs, monkeypatch):
    """Two requests and one page to spare: the first one's proposal (a forced one: kept or not, its
    pages stay its request's) does not take the page the second needs for its next token, so nobody
    is preempted (found by a helper's review). (A request whose proposals are kept reaches its next
    page sooner, and may need it while the other still runs: that is its own token's page.)"""
    import cachedattention.engine.engine as engine_mod

    path, _ = tiny_dirs["llama"]
    monkeypatch.setattr(engine_mod, "propose", lambda tokens, k, lo, hi: [7] * k)
    prompts = [LOOP[:30], list(range(40, 72))]  # 2 pages each, the second's full
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)]  # fmt: skip
    _alike_without_preempting(path, CacheConfig(num_pages=5, enable_prefix_cache=False), prompts, params)
