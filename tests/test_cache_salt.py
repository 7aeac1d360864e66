"""vLLM's cache_salt: requests share cached KV only with requests of the same salt, so that one
tenant cannot learn another's prompts from its cached tokens: device prefix blocks, a session's turns
in the store (the same session id under another salt is another conversation), and the store's
anonymous prefixes (each salt's found only by its requests, also after a restart and on other replicas)."""

import pytest

from cachedattention import LLM, SamplingParams
from cachedattention.errors import InvalidRequest

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
PROMPT = [(7 * i + 3) % 250 for i in range(60)]


def _cached(llm, prompt, salt=None, session=None):
    item = {"prompt_token_ids": prompt, **({"cache_salt": salt} if salt is not None else {})}
    return llm.generate(item, GREEDY, session_id=session)[0].metrics.cached_tokens


def test_device_prefix_blocks_are_shared_only_within_a_salt(tiny_dirs):
    llm = LLM(model=str(tiny_dirs["llama"][0]))
    assert sum(_cached(llm, PROMPT, "tenant-a").values()) == 0
    assert _cached(llm, PROMPT, "tenant-a")["device"] > 0
    assert sum(_cached(llm, PROMPT, "tenant-b").values()) == 0  # (the same tokens, another salt)
    assert sum(_cached(llm, PROMPT).values()) == 0  # (nor without one)
    assert _cached(llm, PROMPT)["device"] > 0
    assert _cached(llm, PROMPT, "tenant-b")["device"] > 0
    llm.engine.pages.check_integrity()


def test_a_session_of_another_salt_is_another_conversation(tiny_dirs, tmp_path):
    llm = LLM(model=str(tiny_dirs["llama"][0]), store_dir=str(tmp_path / "kv"), enable_prefix_caching=False)
    first = llm.generate({"prompt_token_ids": PROMPT, "cache_salt": "a"}, GREEDY, session_id="s")[0]
    turn2 = PROMPT + first.token_ids + [7, 8, 9]
    assert sum(_cached(llm, turn2, "b", "s").values()) == 0  # (another tenant naming the same session)
    assert sum(_cached(llm, turn2, None, "s").values()) == 0
    assert _cached(llm, turn2, "a", "s")["host"] >= len(PROMPT)
    with pytest.raises(InvalidRequest, match="U\\+001E"):
        llm.generate(PROMPT, GREEDY, session_id="s\x1eb")
    store = llm.engine.store.store
    assert llm.forget_session("s", cache_salt="b")  # (its own turn of "s" under salt b)
    assert llm.forget_session("s", cache_salt="a") and not llm.forget_session("s", cache_salt="a")
    assert llm.forget_session("s")  # (the unsalted turn's)
    assert not store.records
    store.check_integrity()


def test_anonymous_prefixes_are_reused_only_within_a_salt_and_after_a_restart(tiny_dirs, tmp_path):
    path, kv = str(tiny_dirs["llama"][0]), str(tmp_path / "kv")
    llm = LLM(model=path, store_dir=kv, enable_prefix_caching=False)
    store = llm.engine.store.store
    assert sum(_cached(llm, PROMPT, "a").values()) == 0
    store.flush()
    assert sum(_cached(llm, PROMPT).values()) == 0  # (tenant a's prefix, unsalted)
    store.flush()
    assert sum(_cached(llm, PROMPT, "b").values()) == 0  # (and another salt's)
    store.flush()
    assert _cached(llm, PROMPT, "a")["host"] >= 48  # (its own)
    assert _cached(llm, PROMPT)["host"] >= 48 and _cached(llm, PROMPT, "b")["host"] >= 48
    store.check_integrity()
    llm.close()
    again = LLM(model=path, store_dir=kv, enable_prefix_caching=False)  # the index rebuilt from disk
    assert _cached(again, PROMPT, "a")["disk"] >= 48
    assert sum(_cached(again, PROMPT, "c").values()) == 0
    again.engine.store.store.check_integrity()
    with pytest.raises(InvalidRequest, match="cache_salt"):
        again.generate({"prompt_token_ids": PROMPT, "cache_salt": ""}, GREEDY)
