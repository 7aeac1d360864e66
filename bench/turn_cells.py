"""A few of the turn bench's cells at one history length, interleaved, with ratios to recompute.

A diagnostic, not a benchmark mode (CPU, embedded model). To compare two versions of the code,
alternate runs with PYTHONPATH pointing at each checkout:

    CACHEDATTENTION_HOME=/tmp/cahome PYTHONPATH=/path/to/checkout .venv/bin/python bench/turn_cells.py \\
        [history] [cell,cell,...] [random shape]

(a random shape, e.g. gemma3-110m, instead of the embedded model: that checkout must know it).
"""

import argparse
import sys

from cachedattention.bench import turn
from cachedattention.bench.models import bench_model


def main(history: int, names: list[str], shape: str | None = None) -> None:
    args = argparse.Namespace(model=None, random_shape=shape, device="cpu", dtype="float32", repeats=5,
                              new_tokens=32, seed=0, remote_url=None)  # fmt: skip
    loaded = bench_model(args)
    cells = {c.name: c for c in turn.CELLS}
    runs = {n: turn.CellRun(cells[n], loaded, args, history, 4 * history) for n in ["recompute", *names]}
    for rep in range(args.repeats + 1):
        for run in runs.values():
            run.repeat(rep)
    results = {n: run.result() for n, run in runs.items()}
    for run in runs.values():
        run.close()
    base = results["recompute"]["ttft_s"]
    print(" ".join(f"{n} {r['ttft_s'] * 1000:.1f} ms ({r['ttft_s'] / base:.3f}x)" for n, r in results.items()))


if __name__ == "__main__":
    argv = sys.argv[1:]
    main(int(argv[0]) if argv else 1024,
         argv[1].split(",") if len(argv) > 1 else ["host-layerwise", "disk-cold-layerwise"],
         argv[2] if len(argv) > 2 else None)
