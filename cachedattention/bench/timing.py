"""Small timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def warm_median_ms(fn: Callable[[], object], repeats: int = 9) -> float:
    """One warm-up call, then the median of `repeats` on a CPU, in ms (the diagnostics' cells)."""
    fn()
    return median_time(fn, repeats, "cpu") * 1000


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"
