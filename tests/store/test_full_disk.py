"""A full disk under the store: every answer stays right, nothing is left half-written, the host tier
keeps serving, and once there is room again new turns reach the disk and survive a restart.

The disk is filled for real, by the kernel: the child process lowers RLIMIT_FSIZE, so that any write
growing a file (a segment, the SQLite index or its journal) past a few KiB fails with EFBIG, as
it would with ENOSPC on a full file system.
"""

import json
import subprocess
import sys

from cachedattention import LLM, CacheConfig, SamplingParams

PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

CHILD = r"""
import json, resource, signal, sys
from pathlib import Path
from cachedattention import LLM, CacheConfig, SamplingParams

path, store = sys.argv[1], Path(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
llm = LLM(model=path, enable_store=True, cache=CacheConfig(enable_prefix_cache=False), store_dir=str(store),
          host_bytes=8 << 20)
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
full = False
for s in (1, 2):
    turn(s, 3)
llm.close()
print(json.dumps({"turns": turns, "tmp_files": tmp_files, "convs": convs, "stats": llm.stats()}))
"""


def test_a_full_disk_loses_no_answer_and_no_session_kept_in_host(tiny_dirs, tmp_path, caplog):
    path, _ = tiny_dirs["llama"]
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(store)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Traceback" not in proc.stderr  # every failure was handled, none escaped to a thread's top
    assert "to disk failed" in proc.stderr and "not written to disk" in proc.stderr  # and the user was told

    reference = LLM(model=str(path), cache=CacheConfig(enable_prefix_cache=False))
    for t in out["turns"]:  # every answer equals a plain engine's
        assert t["tokens"] == reference.generate([t["prompt"]], PARAMS)[0].token_ids, t
    full_later = [t for t in out["turns"] if t["disk_full"] and len(t["prompt"]) > 40]
    assert len(full_later) == 4 and all(t["cached"]["host"] >= 40 for t in full_later)  # host kept serving
    assert out["tmp_files"] == []  # no half-written segment left taking space
    assert out["stats"]["corrupt_segments"] == 0

    # a restart: the turns saved once there was room come back from disk, and are right
    llm = LLM(model=str(path), enable_store=True, cache=CacheConfig(enable_prefix_cache=False), store_dir=str(store))
    for s in (0, 1, 2):
        conv = out["convs"][str(s)]
        got = llm.generate([conv], PARAMS, session_id=f"s{s}")[0]
        assert got.token_ids == reference.generate([conv], PARAMS)[0].token_ids
        assert got.metrics.cached_tokens["disk"] >= len(conv) - 4 - 6, (s, got.metrics.cached_tokens)
    llm.engine.store.check_integrity()
    llm.close()
