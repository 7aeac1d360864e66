"""The embedded SmolLM2 over a 3-turn chat: turns served from host and from disk == recompute."""

import pytest

from cachedattention import LLM, CacheConfig, SamplingParams
from tests.util import capture_logits, rel_err

TURNS = ["Name three colors.", "Which of them is the warmest?", "Write one sentence about it."]


def chat(llm, session, monkeypatch):
    params = SamplingParams(max_tokens=24, temperature=0)
    messages, outs, logits = [{"role": "system", "content": "You are brief."}], [], []
    for user in TURNS:
        messages.append({"role": "user", "content": user})
        seen = capture_logits(monkeypatch)
        out = llm.chat(messages, params, session_id=session)[0]
        monkeypatch.undo()
        logits.append(seen[0])
        outs.append(out)
        messages.append({"role": "assistant", "content": out.text})
        if llm.engine.store is not None:
            llm.engine.store.store.flush()
    return outs, logits


@pytest.mark.slow
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_embedded_multi_turn_chat_equals_recompute(tier, embedded_llm, tmp_path, monkeypatch):
    loaded = embedded_llm.engine.loaded
    base = LLM(loaded=loaded, cache=CacheConfig(enable_prefix_cache=False))
    kw = {"store_dir": str(tmp_path), "host_bytes": 0} if tier == "disk" else {}
    llm = LLM(loaded=loaded, enable_store=True, cache=CacheConfig(enable_prefix_cache=False), **kw)
    ref, ref_logits = chat(base, None, monkeypatch)
    got, got_logits = chat(llm, "chat-1", monkeypatch)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    for a, b in zip(got_logits, ref_logits):
        assert rel_err(a, b) <= 1e-4
    for prev, out in zip(got, got[1:]):  # at least the whole previous prompt is reused
        assert out.metrics.cached_tokens[tier] >= prev.metrics.prompt_tokens
    llm.engine.store.check_integrity()
    llm.close()
