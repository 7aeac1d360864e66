"""Times the decode forward of one sequence alone at a few context lengths (CPU, embedded model).

A diagnostic, not a benchmark mode. To compare two versions of the code, alternate runs with
PYTHONPATH pointing at each checkout:

    CACHEDATTENTION_HOME=/tmp/cahome PYTHONPATH=/path/to/checkout .venv/bin/python bench/lone_decode_timing.py
"""

import statistics
import time

import torch

from cachedattention import LLM, CacheConfig, SamplingParams, SchedulerConfig


def main() -> None:
    llm = LLM(max_model_len=8192, cache=CacheConfig(enable_prefix_cache=False),
              scheduler=SchedulerConfig(max_num_batched_tokens=2048))
    engine = llm.engine
    cells = []
    for length in (1000, 2500, 4500):
        ids = torch.randint(100, 40000, (length,), generator=torch.Generator().manual_seed(0)).tolist()
        engine.add_request(ids, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
        times = []
        real = engine.runner.run

        def timed(batch, real=real, times=times):
            start = time.perf_counter()
            out = real(batch)
            times.append((batch.input_ids.shape[0], time.perf_counter() - start))
            return out

        engine.runner.run = timed
        while engine.has_unfinished():
            engine.step()
        engine.runner.run = real
        cells.append(f"{length}: {statistics.median(t for n, t in times if n == 1) * 1000:.1f} ms")
    print(" ".join(cells))


if __name__ == "__main__":
    main()
