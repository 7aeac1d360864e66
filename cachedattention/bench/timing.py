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


def prefill_and_decode_s(llm, prompt: list[int]) -> tuple[float, float, list[int]]:
    """An engine's prefill of `prompt` (its first token varied so nothing is reused; the median of
    three after a warm-up) and a decode step (64 tokens after its first 32), in seconds, and the
    first tokens that decode gave (diagnostics comparing two ways of serving a model)."""
    from cachedattention import SamplingParams

    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    llm.generate([prompt[:64]], one, use_tqdm=False)
    prefill = []
    for rep in range(3):
        t = time.perf_counter()
        llm.generate([[rep + 100, *prompt[1:]]], one, use_tqdm=False)
        prefill.append(time.perf_counter() - t)
    out = llm.generate([prompt[:32]], SamplingParams(max_tokens=65, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    return statistics.median(prefill), (out.metrics.finish_s - out.metrics.first_token_s) / 64, out.token_ids[:8]
