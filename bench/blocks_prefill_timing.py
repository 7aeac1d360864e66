"""Times one Llama-3-8B decoder layer's seven linear weights held only as blocks (a GGUF's on a
CPU: Q4_K, with v and down in Q6_K, random super-blocks) for a prefill chunk of more rows than the
few-rows kernel takes, through the model's own Linear layer: the blocks dequantized for each call,
then MKL; and MKL on float32 copies of the same weights, for scale. To compare two checkouts, alternated:

    PYTHONPATH=CHECKOUT CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/blocks_prefill_timing.py [rows]
"""

import sys

import numpy as np
import torch

from cachedattention.bench.timing import warm_median_ms
from cachedattention.kernels.few_rows_linear import FewRowsLinearKernel
from cachedattention.model.gguf_kquants import kquant_weight, random_rows
from cachedattention.model.layers import Linear

# (out, in, type) of a Llama-3-8B layer's q, k, v, o, gate, up, down in a Q4_K_M file
LAYER = [(4096, 4096, "Q4_K"), (1024, 4096, "Q4_K"), (1024, 4096, "Q6_K"), (4096, 4096, "Q4_K"),
         (14336, 4096, "Q4_K"), (14336, 4096, "Q4_K"), (4096, 14336, "Q6_K")]  # fmt: skip


def main(rows: int) -> None:
    kernel = FewRowsLinearKernel.load()
    if kernel is None:
        sys.exit("the few-rows kernel cannot be built here (no C compiler or no AVX-512)")
    rng = np.random.default_rng(0)
    layers = []
    for out, inp, kind in LAYER:
        linear = Linear(1, 1, bias=False)  # a placeholder weight, as the loader leaves one
        linear.quantized = kquant_weight(kind, random_rows(kind, out, inp, rng), inp)
        linear.few_rows, linear.blocks_only = kernel, True
        layers.append(linear)
    inputs = {inp: torch.randn(rows, inp) for _, inp, _ in LAYER}
    dense = [m.quantized.dequantize() for m in layers]
    with torch.no_grad():
        blocks = warm_median_ms(lambda: [m(inputs[m.quantized.shape[1]]) for m in layers], 5)
        f32 = warm_median_ms(lambda: [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in dense], 5)
    print(f"one Llama-3-8B layer's linear calls, {rows} rows: weights held only as blocks {blocks:.0f} ms, "
          f"float32 weights {f32:.0f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1024)
