"""Background tensor work runs in a thread that exits, so no extra OpenMP team outlives the job."""

import os
import queue
import threading
import time

import pytest
import torch

from cachedattention.store.fresh_thread import call_in_fresh_thread


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _settled_threads(target: int) -> int:
    """The thread count once exiting threads are gone (they leave /proc a moment after a join)."""
    for _ in range(100):
        if _threads() <= target:
            break
        time.sleep(0.01)
    return _threads()


def _parallel_kernel() -> float:
    with torch.inference_mode():
        return float(torch.ones(1 << 21).mul_(2).sum())  # far above PyTorch's serial grain size


def test_returns_the_value_and_reraises_the_error():
    assert call_in_fresh_thread(lambda a, b: a + b, 2, 3) == 5
    assert call_in_fresh_thread(threading.current_thread) is not threading.current_thread()
    with pytest.raises(KeyError, match="boom"):
        call_in_fresh_thread(lambda: {}["boom"])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
                    reason="needs Linux /proc and a multi-threaded PyTorch")
def test_no_openmp_team_outlives_the_job():
    _parallel_kernel()  # the main thread's own team exists from here on
    before = _threads()
    assert call_in_fresh_thread(_parallel_kernel) == 2.0 * (1 << 21)
    assert _settled_threads(before) == before
    # the premise: a long-lived thread that once ran a parallel kernel keeps a team beside its own
    jobs: queue.Queue = queue.Queue()
    done = threading.Event()

    def worker() -> None:
        while jobs.get() is not None:
            _parallel_kernel()
            done.set()

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    jobs.put(1)
    done.wait()
    assert _settled_threads(before + 1) > before + 1  # the worker itself, and its team
    jobs.put(None)
    t.join()
