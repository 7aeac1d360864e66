"""A full disk under the store: every answer stays right, nothing is left half-written, the host tier
keeps serving, and once there is room again new turns reach the disk and survive a restart.

The disk is filled for real, by the kernel: the child process lowers RLIMIT_FSIZE, so that any write
growing a file (a segment, the SQLite index or its journal) past a few KiB fails with EFBIG, as
it would with ENOSPC on a full file system.
"""

import json
import logging
import sqlite3
import subprocess
import sys

import pytest
import torch

from cachedattention import LLM, CacheConfig, SamplingParams
from cachedattention.store.disk import DiskTier
from cachedattention.store.segment import KVLayout, SegmentKV
from cachedattention.store.write_pause import DiskWritesPaused, WritePause

PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

CHILD = r"""
import json, resource, signal, sys
from pathlib import Path
from cachedattention import LLM, CacheConfig, SamplingParams

path, store, host_bytes = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
llm = LLM(model=path, enable_store=True, cache=CacheConfig(enable_prefix_cache=False), store_dir=str(store),
          host_bytes=host_bytes)
convs = {s: [(13 * s + 7 * i) % 250 + 3 for i in range(40)] for s in range(3)}
turns = []

def turn(s, t):
    out = llm.generate([convs[s]], params, session_id=f"s{s}")[0]
    turns.append({"session": s, "prompt": convs[s], "tokens": out.token_ids, "cached": out.metrics.cached_tokens,
                  "disk_full": full})
    convs[s] = convs[s] + out.token_ids + [(5 * t + s) % 250 + 3] * 4

full = False
turn(0, 0)  # session 0's first turn reaches the disk
llm.engine.store.store.flush()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # the disk is full from here on
full = True
for t in range(3):
    for s in (1, 2):
        turn(s, t)
llm.engine.store.store.flush()
llm.engine.store.check_integrity()
tmp_files = sorted(p.name for p in (store / "segments").glob("*.tmp"))
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again
llm.engine.store.store.disk.writes.resume()  # no need to wait out the pause
full = False
for s in (1, 2):
    turn(s, 3)
llm.close()
print(json.dumps({"turns": turns, "tmp_files": tmp_files, "convs": convs, "stats": llm.stats()}))
"""


def _run_child(path, store, host_bytes: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(store), str(host_bytes)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr  # every failure was handled, none escaped to a thread's top
    assert proc.stderr.count("a disk write failed") == 1 and "disk writes work again" in proc.stderr  # told once
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _files_match_rows(store) -> bool:
    rows = {r[0] for r in sqlite3.connect(str(store / "index.db")).execute("SELECT seg_id FROM segments")}
    return rows == {p.stem for p in (store / "segments").glob("*.kv")}


@pytest.mark.slow
@pytest.mark.parametrize("host_bytes", [8 << 20, 70_000])  # roomy; or so small that it demotes while full
def test_a_full_disk_loses_no_answer(host_bytes, tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    store = tmp_path / "store"
    out = _run_child(path, store, host_bytes)
    reference = LLM(model=str(path), cache=CacheConfig(enable_prefix_cache=False))
    for t in out["turns"]:  # every answer equals a plain engine's
        assert t["tokens"] == reference.generate([t["prompt"]], PARAMS)[0].token_ids, t
    assert out["tmp_files"] == []  # no half-written segment left taking space
    assert out["stats"]["corrupt_segments"] == 0 and _files_match_rows(store)
    if host_bytes > 1 << 20:  # the host tier kept serving every later turn while the disk was full
        full_later = [t for t in out["turns"] if t["disk_full"] and len(t["prompt"]) > 40]
        assert len(full_later) == 4 and all(t["cached"]["host"] >= 40 for t in full_later)

    # a restart: the sessions saved once there was room come back from disk, and are right
    llm = LLM(model=str(path), enable_store=True, cache=CacheConfig(enable_prefix_cache=False), store_dir=str(store))
    for s in (0, 1, 2):
        conv = out["convs"][str(s)]
        got = llm.generate([conv], PARAMS, session_id=f"s{s}")[0]
        assert got.token_ids == reference.generate([conv], PARAMS)[0].token_ids
        if host_bytes > 1 << 20 or s == 0:  # (a small host lost some of 1 and 2's history while full)
            assert got.metrics.cached_tokens["disk"] >= len(conv) - 4 - 6, (s, got.metrics.cached_tokens)
    llm.engine.store.check_integrity()
    llm.close()


class _RefusingIndex:
    """The SQLite connection, refusing statements that start with `refuse` (as a full disk would)."""

    def __init__(self, db, refuse: str) -> None:
        self.db, self.refuse = db, refuse

    def execute(self, sql, *args):
        if sql.startswith(self.refuse):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def close(self):
        self.db.close()


def _disk(tmp_path, clock=None) -> DiskTier:
    disk = DiskTier(str(tmp_path), 1 << 20, "fp", KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32))
    if clock is not None:
        disk.writes = WritePause(seconds=5.0, clock=clock)
    return disk


def _kv() -> SegmentKV:
    return SegmentKV(torch.ones(2, 3, 1, 4), torch.ones(2, 3, 1, 4))


def test_an_index_refusing_the_row_leaves_no_file_and_pauses_writes(tmp_path, caplog):
    now = [0.0]
    disk = _disk(tmp_path, clock=lambda: now[0])
    real = disk._db
    disk._db = _RefusingIndex(real, "INSERT")  # the file is written and renamed; then the row fails
    with caplog.at_level(logging.WARNING), pytest.raises(OSError, match="index refused"):
        disk.put("a", _kv())
    assert not disk.contains("a") and list((tmp_path / "segments").iterdir()) == []
    disk._db = real
    with pytest.raises(DiskWritesPaused):  # paused: refused at once, nothing tried
        disk.put("b", _kv())
    assert list((tmp_path / "segments").iterdir()) == []
    now[0] = 6.0  # the pause is over: the next write is tried, works, and says so
    with caplog.at_level(logging.WARNING):
        disk.put("b", _kv())
    assert disk.contains("b") and "disk writes work again" in caplog.text
    assert caplog.text.count("a disk write failed") == 1
    disk.check_integrity()
    disk.close()


def test_a_row_the_index_cannot_delete_is_ignored_then_deleted_once_writes_work(tmp_path):
    disk = _disk(tmp_path)
    disk.put("a", _kv())
    real = disk._db
    disk._db = _RefusingIndex(real, "DELETE")
    disk.remove("a")  # never raises: the file goes, the row waits
    assert not disk.contains("a") and not disk.path("a").exists()
    disk.check_integrity()  # the stale row is not taken for a missing file
    disk._db = real
    disk.put("b", _kv())  # a write works: the stale row is deleted after it
    assert [r[0] for r in real.execute("SELECT seg_id FROM segments")] == ["b"]
    disk.check_integrity()
    disk.close()
