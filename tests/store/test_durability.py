"""Restart, corruption, kill -9 and budgets: never wrong, at worst slower."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachedattention import LLM, CacheConfig, SamplingParams

PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
NO_DEVICE = CacheConfig(enable_prefix_cache=False)


def disk_llm(path, store, **kw):
    return LLM(model=str(path), enable_store=True, cache=NO_DEVICE, store_dir=str(store), host_bytes=0, **kw)


def first_turn(path, store, conv, session="s"):
    llm = disk_llm(path, store)
    out = llm.generate([conv], PARAMS, session_id=session)[0]
    llm.close()
    return conv + out.token_ids + [7, 8, 9]


def segment_files(store: Path) -> list[Path]:
    return sorted((store / "segments").glob("*.kv"))


def test_new_engine_serves_old_session_from_disk(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    conv = first_turn(path, tmp_path / "st", list(range(5, 50)))
    # a roomy host tier this time: the restart still has to come from disk
    llm = LLM(model=str(path), enable_store=True, cache=NO_DEVICE, store_dir=str(tmp_path / "st"))
    out = llm.generate([conv], PARAMS, session_id="s")[0]
    assert out.metrics.cached_tokens["disk"] == len(conv) - 4  # everything but the new user tokens
    assert out.token_ids == LLM(model=str(path)).generate([conv], PARAMS)[0].token_ids
    llm.engine.store.check_integrity()


def corrupt_flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))


def corrupt_truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-64])


def corrupt_fingerprint(f: Path) -> None:
    data = f.read_bytes()
    i = data.index(b'"fingerprint": "') + len(b'"fingerprint": "')
    f.write_bytes(data[:i] + (b"0" if data[i : i + 1] != b"0" else b"1") + data[i + 1 :])


@pytest.mark.parametrize("damage", [corrupt_flip, corrupt_truncate, corrupt_fingerprint, Path.unlink])
def test_damaged_segment_is_a_miss_with_the_same_output(damage, tiny_dirs, tmp_path, caplog):
    path, _ = tiny_dirs["qwen2"]
    store = tmp_path / "st"
    conv = first_turn(path, store, list(range(5, 50)))
    files = segment_files(store)
    assert len(files) == 1
    damage(files[0])
    caplog.set_level(logging.WARNING)
    llm = disk_llm(path, store)
    out = llm.generate([conv], PARAMS, session_id="s")[0]
    assert out.token_ids == LLM(model=str(path)).generate([conv], PARAMS)[0].token_ids
    assert out.metrics.cached_tokens["disk"] == 0
    assert any("store" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    llm.engine.store.check_integrity()
    # the turn was saved afresh: the next one hits again
    llm.engine.store.store.flush()
    again = llm.generate([conv + out.token_ids + [3]], PARAMS, session_id="s")[0]
    assert again.metrics.cached_tokens["disk"] > 0


def test_a_seeded_turn_whose_load_fails_midway_draws_as_without_the_store(tiny_dirs, tmp_path):
    """A flipped byte found mid-load (a layer's checksum): the turn is recomputed, and its seeded
    draws are those the seed gives without the store (the failed step's row is never sampled: the
    request's random state does not move for a token it never keeps)."""
    path, _ = tiny_dirs["llama"]
    store = tmp_path / "st"
    conv = first_turn(path, store, list(range(5, 50)))
    corrupt_flip(segment_files(store)[0])
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=1234, ignore_eos=True)
    llm = disk_llm(path, store)
    got = llm.generate([conv], seeded, session_id="s")[0]
    assert got.token_ids == LLM(model=str(path), cache=NO_DEVICE).generate([conv], seeded)[0].token_ids
    assert llm.engine.store.store.stats.corrupt_segments == 1
    llm.engine.store.check_integrity()


def test_budgets_are_never_exceeded(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    per_token = 2 * 3 * 2 * 16 * 4  # layers * kv heads * head dim * fp32, K and V
    llm = LLM(model=str(path), enable_store=True, cache=NO_DEVICE, store_dir=str(tmp_path / "st"),
              host_bytes=120 * per_token, disk_bytes=400 * per_token)
    store = llm.engine.store.store
    convs = {f"s{i}": list(range(i + 3, i + 40)) for i in range(8)}
    for _ in range(3):
        for sid, conv in convs.items():
            out = llm.generate([conv], PARAMS, session_id=sid)[0]
            convs[sid] = conv + out.token_ids + [1, 2]
            store.flush()
            store.check_integrity()
            assert store.host.used_bytes() <= store.host.budget
            assert store.disk.used_bytes() <= store.disk.budget
    s = llm.stats()
    assert s["host_evictions"] > 0 and s["disk_evictions"] > 0


KILL_SCRIPT = r"""
import sys
from cachedattention import LLM, CacheConfig, SamplingParams
llm = LLM(model=sys.argv[1], enable_store=True, cache=CacheConfig(enable_prefix_cache=False),
          store_dir=sys.argv[2], host_bytes=0)
store = llm.engine.store.store
p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
for i in range(10_000):
    conv = [3 + i % 200] + list(range(5, 60))
    llm.generate([conv], p, session_id=f"s{i}")
    store.flush()
    print(f"saved s{i}", flush=True)
"""


@pytest.mark.slow
def test_sigkill_while_saving_loses_at_most_the_turn_in_flight(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    store = tmp_path / "st"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(path), str(store)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    saved = []
    deadline = time.monotonic() + 120
    while len(saved) < 6 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("saved"):
            saved.append(line.split()[1])
    time.sleep(0.013)  # land somewhere inside a later turn's save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(saved) >= 6
    llm = disk_llm(path, store)
    st = llm.engine.store.store
    st.check_integrity()  # every index row has its file, sizes match, budgets hold
    for rec in st.records.values():  # no record names a segment that is not there
        assert all(st.disk.contains(s.seg_id) for s in rec.spans)
    assert not list((store / "segments").glob("*.tmp"))
    for sid in saved:
        i = int(sid[1:])
        conv = [3 + i % 200] + list(range(5, 60))
        out = llm.generate([conv + [1]], PARAMS, session_id=sid)[0]
        assert out.metrics.cached_tokens["disk"] == len(conv)  # the whole stored prompt, verified token by token


NO_CLOSE_SCRIPT = r"""
import sys
from cachedattention import LLM, CacheConfig, SamplingParams
llm = LLM(model=sys.argv[1], enable_store=True, cache=CacheConfig(enable_prefix_cache=False),
          store_dir=sys.argv[2], write_through=False)  # write-back: only a flush at exit puts it on disk
p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
out = llm.generate([list(range(5, 60))], p, session_id="s")[0]
out = llm.generate([list(range(5, 60)) + out.token_ids + [1, 2]], p, session_id="s")[0]  # a layer-wise load
print("cached", out.metrics.cached_tokens["host"], flush=True)
# no llm.close(): the interpreter exits with the store's threads running
"""


@pytest.mark.slow
def test_a_script_that_never_closes_exits_cleanly_and_keeps_its_sessions(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    store = tmp_path / "st"
    for _ in range(3):  # the abort at exit this guards against was intermittent
        proc = subprocess.run([sys.executable, "-c", NO_CLOSE_SCRIPT, str(path), str(store)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "cached" in proc.stdout and "terminate called" not in proc.stderr
    llm = disk_llm(path, store)
    conv = list(range(5, 60))
    out = llm.generate([conv], PARAMS, session_id="s")[0]
    assert out.metrics.cached_tokens["disk"] > len(conv) - 16  # flushed at exit, served after a restart
