"""Background tensor work runs in a thread that exits, so no extra OpenMP team outlives the job."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from cachedattention.store.fresh_thread import call_in_fresh_thread

# Run in a fresh interpreter: in the test process, other tests' threads may exit at any moment
# and move the count.
_CHECK = r"""
import os, queue, threading, time
import torch
from cachedattention.store.fresh_thread import call_in_fresh_thread

def threads():
    return len(os.listdir("/proc/self/task"))

def settled(target, wait_s):
    deadline = time.monotonic() + wait_s  # exiting threads leave /proc a moment after a join
    while threads() > target and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads()

def kernel():
    with torch.inference_mode():
        return float(torch.ones(1 << 21).mul_(2).sum())  # far above PyTorch's serial grain size

kernel()  # the main thread's own team exists from here on
before = threads()
assert call_in_fresh_thread(kernel) == 2.0 * (1 << 21)
after_fresh = settled(before, 10.0)  # (expected to settle: room for a loaded machine)
jobs, done = queue.Queue(), threading.Event()

def worker():
    while jobs.get() is not None:
        kernel()
        done.set()

t = threading.Thread(target=worker, daemon=True)
t.start()
jobs.put(1)
done.wait()
print(before, after_fresh, settled(before + 1, 1.0))  # (expected not to: a second is enough to see it)
jobs.put(None)
t.join()
"""


def test_returns_the_value_and_reraises_the_error():
    assert call_in_fresh_thread(lambda a, b: a + b, 2, 3) == 5
    assert call_in_fresh_thread(threading.current_thread) is not threading.current_thread()
    with pytest.raises(KeyError, match="boom"):
        call_in_fresh_thread(lambda: {}["boom"])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
                    reason="needs Linux /proc and a multi-threaded PyTorch")
@pytest.mark.slow
def test_no_openmp_team_outlives_the_job():
    out = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=120, check=True)
    before, after_fresh, with_live_worker = map(int, out.stdout.split())
    assert after_fresh == before  # the fresh thread's team went with it
    # the premise: a long-lived thread that once ran a parallel kernel keeps a team beside itself
    assert with_live_worker > before + 1
