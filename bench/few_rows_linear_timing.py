"""Times the linear layers of a decode step for a few rows: torch's linear (MKL) against the
few-rows kernel (kernels/few_rows_linear.c), over the embedded model's weights of all 30 layers
(q, k, v, o, gate, up, down: 425 MB of float32, more than the caches hold), and the vocabulary
head (49,152 x 576) against the oneDNN-packed weight as well. A diagnostic, not a benchmark mode:

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/few_rows_linear_timing.py [rows,...]

The ways alternate within one process, so machine noise hits each alike.
"""

import statistics
import sys

import torch
from torch.nn import functional as F

from cachedattention.bench.timing import median_time
from cachedattention.kernels.few_rows_linear import FewRowsLinearKernel
from cachedattention.model.layers import OneDNNWeight

HIDDEN, KV, INTER, LAYERS, VOCAB = 576, 192, 1536, 30, 49152
SHAPES = ((HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTER, HIDDEN), (INTER, HIDDEN),
          (HIDDEN, INTER))


def median_ms(fn, repeats: int = 9) -> float:
    fn()  # warm
    return median_time(fn, repeats, "cpu") * 1000


def all_layers(linear, weights, x, xi) -> None:
    for w in weights:
        linear(xi if w.shape[1] == INTER else x, w)


def main(row_counts: list[int]) -> None:
    kernel = FewRowsLinearKernel.load()
    if kernel is None:
        sys.exit("the few-rows kernel cannot be built here (no C compiler or no AVX-512)")
    torch.manual_seed(0)
    weights = [torch.randn(*shape) for _ in range(LAYERS) for shape in SHAPES]
    head = torch.randn(VOCAB, HIDDEN)
    packed = OneDNNWeight(head, rows=(1, 1 << 30))
    gb = sum(w.numel() for w in weights) * 4 / 1e9
    print("| rows | layers: MKL (ms) | layers: kernel (ms) | kernel GB/s | head: MKL | head: kernel | head: oneDNN |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rows in row_counts:
        x, xi = torch.randn(rows, HIDDEN), torch.randn(rows, INTER)
        cells = {name: [] for name in ("mkl", "kernel", "head_mkl", "head_kernel", "head_onednn")}
        for _ in range(3):
            cells["mkl"].append(median_ms(lambda x=x, xi=xi: all_layers(F.linear, weights, x, xi)))
            cells["kernel"].append(median_ms(lambda x=x, xi=xi: all_layers(kernel, weights, x, xi)))
            cells["head_mkl"].append(median_ms(lambda x=x: F.linear(x, head), 20))
            cells["head_kernel"].append(median_ms(lambda x=x: kernel(x, head), 20))
            if packed.packed is not None:
                cells["head_onednn"].append(median_ms(lambda x=x: packed.linear(x), 20))
        m = {k: statistics.median(v) if v else float("nan") for k, v in cells.items()}
        print(f"| {rows} | {m['mkl']:.2f} | {m['kernel']:.2f} | {gb / m['kernel'] * 1000:.1f} | {m['head_mkl']:.2f} "
              f"| {m['head_kernel']:.2f} | {m['head_onednn']:.2f} |", flush=True)


if __name__ == "__main__":
    main([int(r) for r in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 2, 4, 8, 12, 16])
