"""Times the forward pass alone inside the turn bench's cells (CPU, embedded model, 1024 history tokens).

A diagnostic, not a benchmark mode: it wraps `ModelRunner.run` to time each 32-token forward, to tell
the forward's own cost apart from the load's in a host hit. Two rounds of each cell.

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/forward_timing.py device,host-sync,host-layerwise

Cells: the turn bench's, and device-with-store (a device hit with the store enabled).
"""

import argparse
import sys
import time

from cachedattention.bench import turn
from cachedattention.bench.models import bench_model
from cachedattention.engine import runner


def main(cell_names: str) -> None:
    args = argparse.Namespace(model=None, random_shape=None, device="cpu", dtype="float32", repeats=5,
                              new_tokens=32, seed=0)
    loaded = bench_model(args)
    cells = {c.name: c for c in turn.CELLS}
    # a device hit with the store's threads alive (they cost the forward nothing when they keep no
    # OpenMP team between jobs: cachedattention/store/fresh_thread.py)
    cells["device-with-store"] = turn.Cell("device-with-store", store=True, prefix_cache=True)
    times: list[tuple[int, float]] = []
    real = runner.ModelRunner.run

    def timed(self, batch):
        start = time.perf_counter()
        out = real(self, batch)
        times.append((sum(s.num_new for s in batch.seqs), time.perf_counter() - start))
        return out

    runner.ModelRunner.run = timed
    for _ in range(2):
        for name in cell_names.split(","):
            times.clear()
            run = turn.CellRun(cells[name], loaded, args, 1024, 4096)
            for rep in range(args.repeats + 1):
                run.repeat(rep)
            r = run.result()
            run.close()
            fwd = [round(t * 1000, 1) for n, t in times if n == args.new_tokens]
            print(f"{name}: TTFT {r['ttft_s'] * 1000:.1f} ms, load alone {r['load_alone_s'] * 1000:.1f} ms, "
                  f"32-token forwards {fwd} ms", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "device,host-sync,host-layerwise")
