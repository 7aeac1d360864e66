"""Times the linear layers of a decode step for a few rows, over the embedded model's real weights
(the 210 linear layers of its 30 blocks and the vocabulary head): torch's linear (MKL) on the float32
weights, the few-rows kernel (kernels/few_rows_linear.c) on the same float32 weights, and the kernel
on the GGUF blocks the weights come from (Q4_1 layers, a Q8_0 head), plus the oneDNN-packed head.
A diagnostic, not a benchmark mode:

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/few_rows_linear_timing.py [rows,...]

The ways alternate within one process, so machine noise hits each alike.
"""

import statistics
import sys

import torch
from torch.nn import functional as F

from cachedattention.bench.timing import median_time
from cachedattention.kernels.few_rows_linear import FewRowsLinearKernel
from cachedattention.model.embedded import embedded_gguf_path
from cachedattention.model.gguf_loader import gguf_quantized_weights
from cachedattention.model.layers import OneDNNWeight


def median_ms(fn, repeats: int = 9) -> float:
    fn()  # warm
    return median_time(fn, repeats, "cpu") * 1000


def all_layers(linear, weights, inputs) -> None:
    for w in weights:
        linear(inputs[w.shape[1]], w)


def main(row_counts: list[int]) -> None:
    kernel = FewRowsLinearKernel.load()
    if kernel is None:
        sys.exit("the few-rows kernel cannot be built here (no C compiler or no AVX-512)")
    quantized = gguf_quantized_weights(str(embedded_gguf_path()))
    head_q = quantized.pop("model.embed_tokens.weight")
    layers_q = list(quantized.values())
    layers = [w.dequantize() for w in layers_q]
    head = head_q.dequantize()
    packed = OneDNNWeight(head, rows=(1, 1 << 30))
    gb = sum(w.numel() for w in layers) * 4 / 1e9
    print(f"{len(layers)} layer weights, {gb:.3f} GB in float32; ms per pass over all of them, then the head alone")
    print("| rows | layers: MKL | layers: kernel | layers: kernel on GGUF blocks | head: MKL | head: kernel "
          "| head: kernel on GGUF blocks | head: oneDNN |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for rows in row_counts:
        inputs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in layers}}
        x = torch.randn(rows, head.shape[1])
        ways = {
            "mkl": lambda inputs=inputs: all_layers(F.linear, layers, inputs),
            "kernel": lambda inputs=inputs: all_layers(kernel, layers, inputs),
            "kernel_q": lambda inputs=inputs: all_layers(kernel, layers_q, inputs),
            "head_mkl": lambda x=x: F.linear(x, head),
            "head_kernel": lambda x=x: kernel(x, head),
            "head_kernel_q": lambda x=x: kernel(x, head_q),
            "head_onednn": lambda x=x: packed.linear(x),
        }
        cells = {name: [] for name in ways}
        for _ in range(3):
            for name, fn in ways.items():
                cells[name].append(median_ms(fn, 20 if name.startswith("head") else 9))
        m = {k: statistics.median(v) for k, v in cells.items()}
        print(f"| {rows} | {m['mkl']:.2f} | {m['kernel']:.2f} | {m['kernel_q']:.2f} | {m['head_mkl']:.2f} "
              f"| {m['head_kernel']:.2f} | {m['head_kernel_q']:.2f} | {m['head_onednn']:.2f} |", flush=True)


if __name__ == "__main__":
    main([int(r) for r in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 2, 4, 8, 16, 32])
