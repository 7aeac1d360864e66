"""Times a prompt's attention over a cached history on a CPU: one flash call with the bottom-right
causal mask materialised (what the engine did before) against the history and the new tokens in
two unmasked/causal calls merged by log-sum-exp (model/split_attention.py), with the embedded
model's heads (9 query, 3 KV, 64 dims). Inputs are strided like the pool's. Alternated per round.

    .venv/bin/python bench/split_attention_timing.py [rounds] [engine]

With `engine`, it times instead a new turn's prefill on the embedded model (history from the device
prefix cache), the split switched off and on in turn within one process, and checks both sample
the same token. A diagnostic, not a benchmark mode: it picks split_attention's MIN_CONTEXT and MIN_NEW.
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from cachedattention.model import split_attention
from cachedattention.model.split_attention import attend_history_then_new

HEADS, KV_HEADS, DIM = 9, 3, 64
CELLS = [(n, ctx) for ctx in (512, 1024, 2048, 4096) for n in (8, 32, 100, 512)]


def masked(q, k, v, context_len):
    mask = torch.ones(q.shape[1], context_len + q.shape[1], dtype=torch.bool).tril(context_len)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]


def main(rounds: int) -> None:
    torch.manual_seed(0)
    print(f"median of {rounds} alternated rounds, ms per layer; {torch.get_num_threads()} threads\n")
    print("| new tokens | history | masked | split | split / masked |")
    print("|---|---|---|---|---|")
    for n, ctx in CELLS:
        q = torch.randn(n, HEADS, DIM).transpose(0, 1)
        pool_k, pool_v = torch.randn(ctx + n, KV_HEADS, DIM), torch.randn(ctx + n, KV_HEADS, DIM)
        k, v = pool_k.transpose(0, 1), pool_v.transpose(0, 1)
        times = {masked: [], attend_history_then_new: []}
        for _ in range(rounds):
            for f, t in times.items():
                t0 = time.perf_counter()
                f(q, k, v, ctx)
                t.append(time.perf_counter() - t0)
        a, b = (statistics.median(t) * 1e3 for t in times.values())
        print(f"| {n} | {ctx} | {a:.2f} | {b:.2f} | {b / a:.2f} |")


def engine_main(rounds: int) -> None:
    from cachedattention import LLM, SamplingParams

    llm = LLM(enable_store=False)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    min_new = split_attention.MIN_NEW

    def turn(history: int, new: int, split: bool) -> tuple[float, list[int]]:
        split_attention.MIN_NEW = min_new if split else 1 << 40
        llm.engine.pages.clear_cache()
        h = [(7 * i + 3) % 30000 + 10 for i in range(history)]
        llm.generate([h], params, use_tqdm=False)  # the history, into the device prefix cache
        t0 = time.perf_counter()
        out = llm.generate([h + [(11 * i + 5) % 30000 + 10 for i in range(new)]], params, use_tqdm=False)[0]
        return time.perf_counter() - t0, out.token_ids

    print(f"new turn's TTFT on the embedded model, median of {rounds} alternated rounds\n")
    print("| history | new tokens | masked (ms) | split (ms) | split / masked | same token |")
    print("|---|---|---|---|---|---|")
    for history, new in [(2048, 128), (4096, 128), (4096, 512)]:
        times, tokens = {False: [], True: []}, {}
        for _ in range(rounds):
            for split in (False, True):
                dt, tokens[split] = turn(history, new, split)
                times[split].append(dt)
        a, b = (statistics.median(times[s]) * 1e3 for s in (False, True))
        print(f"| {history} | {new} | {a:.0f} | {b:.0f} | {b / a:.2f} | {tokens[True] == tokens[False]} |")


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 21
    engine_main(n) if "engine" in sys.argv[2:] else main(n)
