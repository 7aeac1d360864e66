"""Times a decode step's forward with several sequences decoding together, for ways of splitting
them into padded attention groups: one group (the CUDA path) or groups of similar length chosen with
a given cost per call, in rows (the CPU path). CPU, embedded model.

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/decode_timing.py [rounds] [call rows, ...]

A diagnostic, not a benchmark mode; the settings alternate so machine noise hits each alike.
"""

import statistics
import sys
import time

import torch

from cachedattention import LLM, CacheConfig, SamplingParams, SchedulerConfig

CONTEXTS = (
    [100] * 6,
    [1000] * 6,
    [300, 500, 900, 1200, 1800, 2500, 3500, 4500],  # the spread of the workload bench's later turns
)


def median_decode_ms(llm: LLM, call_rows: int | None, lens: list[int]) -> float:
    eng = llm.engine
    eng.runner.group_call_rows = call_rows
    gen = torch.Generator().manual_seed(0)
    for n in lens:
        ids = torch.randint(100, 40000, (n,), generator=gen).tolist()
        eng.add_request(ids, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    times = []
    real = eng.runner.run

    def timed(batch):
        start = time.perf_counter()
        out = real(batch)
        times.append((batch.input_ids.shape[0], time.perf_counter() - start))
        return out

    eng.runner.run = timed
    try:
        while eng.has_unfinished():
            eng.step()
    finally:
        eng.runner.run = real
    return statistics.median(t for n, t in times if n == len(lens)) * 1000


def main(rounds: int, settings: list[int | None]) -> None:
    llm = LLM(max_model_len=8192, cache=CacheConfig(enable_prefix_cache=False),
              scheduler=SchedulerConfig(max_num_batched_tokens=2048))
    for lens in CONTEXTS:
        ms: dict[int | None, list[float]] = {s: [] for s in settings}
        for _ in range(rounds):
            for s in settings:
                ms[s].append(median_decode_ms(llm, s, lens))
        cells = ", ".join(f"{'one group' if s is None else f'{s} rows/call'} {statistics.median(v):.1f} ms"
                          for s, v in ms.items())
        print(f"contexts {lens}: {cells} (medians of {rounds} rounds)", flush=True)


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    values = sys.argv[2].split(",") if len(sys.argv) > 2 else ["none", "512", "1024", "2048"]
    main(rounds, [None if v == "none" else int(v) for v in values])
