"""A/B, not kept in the engine: decode steps with the MLP's weights (gate, up, down) also packed for
oneDNN for 4-16 rows, against the plain weights. Same decoder sets as bench/decode_timing.py, with
the paged decode kernel, alternating in one process. The packed copies double the MLP's weight
memory, which is why the engine packs only the vocabulary head.

A diagnostic, not a benchmark mode:

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/mlp_packed_ab.py [rounds]
"""

import statistics
import sys

from decode_timing import CONTEXTS, median_decode_ms
from torch.nn import functional as F

from cachedattention import LLM, CacheConfig, SchedulerConfig
from cachedattention.model.layers import GatedMLP, OneDNNWeight

NAMES = ("gate_proj", "up_proj", "down_proj")


def packed_forward(packs: dict[int, dict[str, OneDNNWeight]]):
    def forward(self, x):
        p = packs[id(self)]
        h = F.silu(p["gate_proj"].linear(x), inplace=True).mul_(p["up_proj"].linear(x))
        return p["down_proj"].linear(h)

    return forward


def main(rounds: int) -> None:
    llm = LLM(max_model_len=8192, cache=CacheConfig(enable_prefix_cache=False),
              scheduler=SchedulerConfig(max_num_batched_tokens=2048))
    kernel = llm.engine.runner.decode_kernel
    packs = {id(layer.mlp): {n: OneDNNWeight(getattr(layer.mlp, n).weight, rows=(4, 16)) for n in NAMES}
             for layer in llm.engine.model.model.layers}
    plain, packed = GatedMLP.forward, packed_forward(packs)
    for lens in CONTEXTS:
        ms: dict[str, list[float]] = {"plain": [], "packed": []}
        for _ in range(rounds):
            for name, forward in (("plain", plain), ("packed", packed)):
                GatedMLP.forward = forward
                ms[name].append(median_decode_ms(llm, "kernel", lens, kernel))
        GatedMLP.forward = plain
        print(f"contexts {lens}: plain {statistics.median(ms['plain']):.1f} ms, "
              f"packed MLP {statistics.median(ms['packed']):.1f} ms (medians of {rounds} rounds)", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
