"""Next-turn TTFT of a model with sliding-window layers (random weights, `gemma3-110m` by default)
served from host and from a cold disk, two ways side by side, repetitions interleaved in one run:
windowed layers loading only the keys their window reaches (the store's way), against every stored
token loaded into every layer (as before it did so). A diagnostic, not a benchmark mode (CPU):

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/window_loads_ab.py [history] [shape]
"""

import argparse
import sys

from cachedattention.bench import turn
from cachedattention.bench.models import bench_model
from cachedattention.store import disk


def count_file_reads(runs: dict) -> tuple[dict[str, int], list[str]]:
    """Bytes read from segment files by each run (the one named in the returned list's slot)."""
    read, current = dict.fromkeys(runs, 0), [""]
    real = disk._read_into

    def counted(fd, buf, offset):
        got = real(fd, buf, offset)
        read[current[0]] += got
        return got

    disk._read_into = counted
    return read, current


def main(history: int, shape: str) -> None:
    args = argparse.Namespace(model=None, random_shape=shape, device="cpu", dtype="float32", repeats=5,
                              new_tokens=32, seed=0, remote_url=None)  # fmt: skip
    loaded = bench_model(args)
    window = history + args.new_tokens + 8
    cells = {c.name: c for c in turn.CELLS}
    runs = {"recompute": turn.CellRun(cells["recompute"], loaded, args, history, window)}
    for name in ("host-layerwise", "disk-cold-layerwise"):
        runs[name] = turn.CellRun(cells[name], loaded, args, history, window)
        whole = turn.CellRun(cells[name], loaded, args, history, window)
        whole.engine.store._window_from = lambda lo, hi: lo  # every stored token into every layer
        runs[f"{name} (whole)"] = whole
    read, current = count_file_reads(runs)
    for rep in range(args.repeats + 1):
        for name, run in runs.items():
            current[0] = name
            run.repeat(rep)
    base = runs["recompute"].result()["ttft_s"]
    print(f"{loaded.name}, history {history}, {args.new_tokens} new tokens, median of {args.repeats}")
    print("| cell | TTFT ms | vs recompute | load alone ms | MB loaded per turn | MB read from files per turn |")
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        r = run.result()
        store = run.engine.store
        mb = sum(store.stats()["bytes_loaded"].values()) / (args.repeats + 1) / 1e6 if store else 0.0
        files = read[name] / (args.repeats + 1) / 1e6
        print(f"| {name} | {r['ttft_s'] * 1000:.1f} | {r['ttft_s'] / base:.3f}x | {r['load_alone_s'] * 1000:.1f} "
              f"| {mb:.1f} | {files:.1f} |")  # fmt: skip
    for run in runs.values():
        run.close()


if __name__ == "__main__":
    argv = sys.argv[1:]
    main(int(argv[0]) if argv else 8192, argv[1] if len(argv) > 1 else "gemma3-110m")
