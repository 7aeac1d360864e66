"""Times whole engine steps of decoding sessions with the store on (host and disk tiers): what the
store's per-step work (capturing each new token's pre-RoPE K/V for saving) adds to a decode step.
One decoder at 1,000 tokens, then eight at 600; the median step, warm-up and drain left out.

A diagnostic, not a benchmark mode (CPU, embedded model). To compare two versions of the code,
alternate runs with PYTHONPATH pointing at each checkout:

    CACHEDATTENTION_HOME=/tmp/cahome PYTHONPATH=/path/to/checkout .venv/bin/python bench/store_decode_timing.py
"""

import statistics
import tempfile
import time

import torch

from cachedattention import LLM, SamplingParams, SchedulerConfig


def main() -> None:
    with tempfile.TemporaryDirectory() as store_dir:
        llm = LLM(max_model_len=8192, scheduler=SchedulerConfig(max_num_batched_tokens=2048), enable_store=True,
                  store_dir=store_dir, host_bytes=1 << 30, disk_bytes=4 << 30)
        engine, cells = llm.engine, []
        for rows, context in ((1, 1000), (8, 600)):
            for i in range(rows):
                ids = torch.randint(100, 40000, (context,), generator=torch.Generator().manual_seed(100 * rows + i))
                engine.add_request(ids.tolist(), SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True),
                                   session_id=f"s{rows}-{i}")
            steps = []
            while engine.has_unfinished():
                start = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - start)
            cells.append(f"{rows} x {context} tokens: {statistics.median(steps[3:-3]) * 1000:.2f} ms")
            llm.engine.store.store.flush()
        print(", ".join(cells))
        llm.close()


if __name__ == "__main__":
    main()
