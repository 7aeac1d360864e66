"""How scattered decoders' pages are during the workload benchmark: for each decode step of each
sequence, how many separate runs of consecutive pages hold its context (1 = one slice of the pool).
Replays the saved workload through the CachedAttention system for a given number of seconds.

A diagnostic, not a benchmark mode (CPU, embedded model):

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/page_runs.py [seconds] [docs/results/cpu/workload.json]
"""

import collections
import sys
import tempfile
import time

from workload_profile import load_saved_workload

from cachedattention.bench.replay import replay
from cachedattention.bench.systems import build_systems
from cachedattention.engine import runner as runner_mod
from cachedattention.engine.engine import LLMEngine


class Enough(Exception):
    pass


def main(seconds: float, workload_path: str) -> None:
    steps: collections.Counter[int] = collections.Counter()
    rows: collections.Counter[int] = collections.Counter()
    real = runner_mod.ModelRunner.build_batch
    deadline = time.monotonic() + seconds

    def counting(self, scheduled, hooks):
        if time.monotonic() > deadline:
            raise Enough
        for s in scheduled:
            if s.num_new == 1 and s.request.num_computed > 0:  # a decoder
                length = s.request.num_computed + 1
                pages = s.request.pages[: -(-length // self.pool.page_size)]
                runs = 1 + sum(1 for a, b in zip(pages, pages[1:]) if b != a + 1)
                steps[min(runs, 10)] += 1
                rows[min(runs, 10)] += length
        return real(self, scheduled, hooks)

    runner_mod.ModelRunner.build_batch = counting
    loaded, workload, budgets, base = load_saved_workload(workload_path)
    with tempfile.TemporaryDirectory() as root:
        engine = LLMEngine(build_systems(["CachedAttention"], budgets, root)[0].engine_config(base), loaded=loaded)
        try:
            replay(engine, workload, "CachedAttention", progress=False)
        except Enough:
            pass
        finally:
            engine.close()
    total_steps, total_rows = sum(steps.values()), sum(rows.values())
    for runs in sorted(steps):
        print(f"{runs}{'+' if runs == 10 else ''} runs of pages: {steps[runs] / total_steps:.1%} of decoder steps, "
              f"{rows[runs] / total_rows:.1%} of context rows")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 240.0,
         sys.argv[2] if len(sys.argv) > 2 else "docs/results/cpu/workload.json")
