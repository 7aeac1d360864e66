"""What the store's layer hooks capture: a sequence with a few rows of a big step gets a copy (its
view would keep the whole step's K/V alive), and a turn captured in steps shared with another
request's prefill chunks is served back equal to recompute."""

import torch

from cachedattention import LLM, CacheConfig, SamplingParams, SchedulerConfig
from cachedattention.store.connector import StepHooks, TurnState
from tests.util import capture_logits, rel_err


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _states(n: int) -> list[TurnState]:
    return [TurnState(key=f"s{i}", plan=None) for i in range(n)]


def test_few_rows_of_a_big_step_are_copied_and_the_rest_viewed():
    big, a, b = _states(3)
    hooks = StepHooks([], [(0, 40, big), (40, 1, a), (41, 2, b)])
    layers = [(torch.randn(43, 2, 4), torch.randn(43, 2, 4)) for _ in range(3)]
    for layer, (k, v) in enumerate(layers):
        hooks.save_layer(layer, k, v)
    for layer, (k, v) in enumerate(layers):
        ks, vs = big.chunks[0][0][layer], big.chunks[0][1][layer]
        assert _shares_storage(ks, k) and torch.equal(ks, k[:40]) and torch.equal(vs, v[:40])
        for state, rows in ((a, slice(40, 41)), (b, slice(41, 43))):
            ks, vs = state.chunks[0][0][layer], state.chunks[0][1][layer]
            assert torch.equal(ks, k[rows]) and torch.equal(vs, v[rows])
            assert not _shares_storage(ks, k) and not _shares_storage(vs, v)


def test_a_step_of_small_sequences_only_keeps_views():
    states = _states(3)
    hooks = StepHooks([], [(i, 1, s) for i, s in enumerate(states)])  # three decoders: nothing to spare
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    hooks.save_layer(0, k, v)
    assert all(_shares_storage(s.chunks[0][0][0], k) for s in states)


def test_turns_captured_beside_other_prefills_equal_recompute(tiny_dirs, monkeypatch):
    """A short session decodes while a long prompt prefills in 24-token chunks beside it (so its
    captured rows are copies); its next turn, served from host, equals recompute."""
    path, _ = tiny_dirs["llama"]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    small_steps = SchedulerConfig(max_num_batched_tokens=24, max_num_seqs=4)
    no_device = CacheConfig(enable_prefix_cache=False)
    llm = LLM(model=str(path), enable_store=True, cache=no_device, scheduler=small_steps)
    ref = LLM(model=str(path), cache=no_device, scheduler=small_steps)
    short, long = list(range(5, 15)), list(range(20, 140))
    first = llm.generate([short, long], params, session_id=["short", "long"])
    llm.engine.store.store.flush()
    turn2 = short + first[0].token_ids + [7, 8, 9]
    seen = capture_logits(monkeypatch)
    got = llm.generate([turn2], params, session_id="short")[0]
    got_logits = seen[0]
    monkeypatch.undo()
    seen = capture_logits(monkeypatch)
    want = ref.generate([turn2], params)[0]
    assert got.metrics.cached_tokens["host"] >= len(short) + 5  # the decoded tokens came back too
    assert got.token_ids == want.token_ids
    assert rel_err(got_logits, seen[0]) <= 1e-4
    llm.engine.store.check_integrity()
