"""Times one Llama-3-8B decoder layer's seven linear weights for a few rows, as a Q4_K_M file holds
them (Q4_K, with v and down in Q6_K): torch's linear (MKL) and the few-rows kernel on the float32
weights they dequantize to, against the kernel on the blocks they are re-expressed as at load
(model/gguf_kquants.py: Q4_K as Q4_1, Q6_K as Q8_S16). The blocks are random super-blocks (finite
scales), not a quantized checkpoint: only the bytes read matter here. (A Q4_K_M file keeps v and
down in Q6_K in about half its layers, Q4_K in the rest: this is the heavier kind.) With `Q2_K`, a
layer as llama.cpp's Q2_K mix holds it (Q2_K, as Q4_MS16; v and down in Q3_K, as Q8_S16). A diagnostic:

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/kquant_linear_timing.py [rows,...] [Q4_K_M|Q2_K]

The ways alternate within one process, so machine noise hits each alike.
"""

import statistics
import sys

import numpy as np
import torch
from torch.nn import functional as F

from cachedattention.bench.timing import warm_median_ms
from cachedattention.kernels.few_rows_linear import FewRowsLinearKernel
from cachedattention.model.gguf_kquants import K_QUANT_BYTES, kquant_weight, random_rows

# (out, in) of a Llama-3-8B layer's q, k, v, o, gate, up, down
SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
# each weight's type in a file of each mix
MIXES = {"Q4_K_M": ["Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q4_K", "Q6_K"],
         "Q2_K": ["Q2_K", "Q2_K", "Q3_K", "Q2_K", "Q2_K", "Q2_K", "Q3_K"]}  # fmt: skip


def main(row_counts: list[int], mix: str = "Q4_K_M") -> None:
    kernel = FewRowsLinearKernel.load()
    if kernel is None:
        sys.exit("the few-rows kernel cannot be built here (no C compiler or no AVX-512)")
    rng = np.random.default_rng(0)
    layer = [(out, inp, kind) for (out, inp), kind in zip(SHAPES, MIXES[mix])]
    blocks = [kquant_weight(kind, random_rows(kind, out, inp, rng), inp) for out, inp, kind in layer]
    dense = [w.dequantize() for w in blocks]
    f32_gb = sum(w.numel() for w in dense) * 4 / 1e9
    q_gb = sum(w.quants.numel() * w.quants.element_size() + w.scales.numel() * 4 +
               (w.mins.numel() * 4 if w.mins is not None else 0) for w in blocks) / 1e9  # fmt: skip
    file_gb = sum(out * inp // 256 * K_QUANT_BYTES[kind] for out, inp, kind in layer) / 1e9
    print(f"one Llama-3-8B layer of {mix}: {f32_gb:.3f} GB in float32, {q_gb:.3f} GB as kernel blocks "
          f"({file_gb:.3f} GB in the file); ms per pass")
    print("| rows | MKL, float32 | kernel, float32 | kernel, blocks | blocks vs kernel float32 |")
    print("| --- | --- | --- | --- | --- |")
    for rows in row_counts:
        inputs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in dense}}
        ways = {
            "mkl": lambda inputs=inputs: [F.linear(inputs[w.shape[1]], w) for w in dense],
            "kernel": lambda inputs=inputs: [kernel(inputs[w.shape[1]], w) for w in dense],
            "blocks": lambda inputs=inputs: [kernel(inputs[w.shape[1]], w) for w in blocks],
        }
        cells = {name: [] for name in ways}
        for _ in range(3):
            for name, fn in ways.items():
                cells[name].append(warm_median_ms(fn))
        m = {k: statistics.median(v) for k, v in cells.items()}
        print(f"| {rows} | {m['mkl']:.2f} | {m['kernel']:.2f} | {m['blocks']:.2f} | {m['kernel'] / m['blocks']:.2f}x |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main([int(r) for r in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 4, 8, 16], *sys.argv[2:3])
