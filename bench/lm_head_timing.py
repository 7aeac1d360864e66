"""Times the vocabulary head (the embedded model's shape, 49,152 x 576, float32) for a few row
counts: PyTorch's plain linear (MKL) against the oneDNN-packed weight the engine uses for 4 to 128
rows on a CPU (model/layers.py, OneDNNWeight). A diagnostic, not a benchmark mode:

    .venv/bin/python bench/lm_head_timing.py [rows,...]

Both run alternately in one process, so machine noise hits each alike.
"""

import statistics
import sys

import torch
from torch.nn import functional as F

from cachedattention.bench.timing import median_time
from cachedattention.model.layers import OneDNNWeight


def median_ms(fn) -> float:
    fn()  # warm
    return median_time(fn, 20, "cpu") * 1000


def main(row_counts: list[int]) -> None:
    weight = torch.randn(49152, 576)
    packed = OneDNNWeight(weight, rows=(1, 1 << 30))
    if packed.packed is None:
        sys.exit("oneDNN packing is not available in this torch")
    print("| rows | plain linear (ms) | oneDNN packed (ms) | plain / packed |")
    print("| --- | --- | --- | --- |")
    for rows in row_counts:
        x = torch.randn(rows, 576)
        plain, onednn = [], []
        for _ in range(3):
            plain.append(median_ms(lambda x=x: F.linear(x, weight)))
            onednn.append(median_ms(lambda x=x: packed.linear(x)))
        a, b = statistics.median(plain), statistics.median(onednn)
        print(f"| {rows} | {a:.2f} | {b:.2f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    counts = [int(v) for v in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 2, 3, 4, 8, 12, 16, 32, 64, 128, 256]
    main(counts)
