"""Run a background job's CPU tensor work in a thread that exits when the job is done.

Why: GNU OpenMP (PyTorch's CPU thread pool) gives each thread that runs a parallel kernel its
own team of worker threads, kept for as long as that thread lives. Once a process holds more
OpenMP threads than cores, libgomp stops spinning between parallel regions, so every kernel of
the forward pass then waits for its workers to wake up. With the store's loader, saver and I/O
threads alive, the embedded model's 32-token forward ran 137-147 ms instead of 106-119 ms on
two cores (`bench/forward_timing.py`, the device cell with and without the store). A short-lived
thread's team goes away with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def call_in_fresh_thread(fn: Callable[..., T], *args: object, name: str = "store-job") -> T:
    """fn(*args) on a new thread, joined before returning; its exception is re-raised here."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn(*args))
        except BaseException as e:  # handed to the caller, which decides
            error.append(e)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
