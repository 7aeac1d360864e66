"""Times one MoE expert's linear weight held only as blocks (a GGUF mixture's, random super-blocks)
for a prefill's rows: the few-rows kernel on the blocks, against dequantizing them for the call and
running MKL, and MKL on a float32 copy for scale; to place MAX_ROWS_BLOCKS_ONLY. A diagnostic:

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/expert_rows_timing.py [rows,...]
"""

import sys

import numpy as np
import torch
from torch.nn import functional as F

from cachedattention.bench.timing import warm_median_ms
from cachedattention.kernels.few_rows_linear import FewRowsLinearKernel
from cachedattention.model.gguf_kquants import kquant_weight, random_rows

# a Qwen3-30B-A3B expert's gate (or up) projection in Q4_K, and its down projection in Q6_K
EXPERTS = [("Q4_K", 768, 2048), ("Q6_K", 2048, 768)]


def main(row_counts: list[int]) -> None:
    kernel = FewRowsLinearKernel.load()
    if kernel is None:
        sys.exit("the few-rows kernel cannot be built here (no C compiler or no AVX-512)")
    rng = np.random.default_rng(0)
    print("| type | out x in | rows | kernel on blocks | dequantize + MKL | MKL on float32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, out, inp in EXPERTS:
        w = kquant_weight(kind, random_rows(kind, out, inp, rng), inp)
        dense = w.dequantize()
        for rows in row_counts:
            x = torch.randn(rows, inp)
            ways = [lambda x=x, w=w: kernel.run(x, w, None), lambda x=x, w=w: F.linear(x, kernel.dequantize(w)),
                    lambda x=x, dense=dense: F.linear(x, dense)]  # fmt: skip
            cells = [warm_median_ms(fn, 7) for fn in ways]
            print(f"| {kind} | {out} x {inp} | {rows} | " + " | ".join(f"{c:.2f} ms" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main([int(r) for r in sys.argv[1].split(",")] if len(sys.argv) > 1 else [32, 96, 128, 256, 384, 512])
