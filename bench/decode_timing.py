"""Times a decode step's forward with several sequences decoding together: with the paged decode
kernel (`kernel`, the CPU default when it builds), or through torch in padded attention groups: one
group (`none`, the CUDA path) or groups of similar length chosen with a given cost per call, in rows.
Every setting but two uses the few-row kernels (the few-rows linear and the row ops) too, and
`kernel` (the default) runs each layer of such a step in two C calls (kernels/decode_layer.c);
`kernel-ops` calls the same kernels one operation at a time from Python, `kernel-linear` is the paged
decode kernel and the few-rows linear with torch's small operators, and `kernel-torch` the paged
decode kernel alone (torch's GEMM, the oneDNN-packed vocabulary head, torch's small operators). CPU,
embedded model.

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/decode_timing.py [rounds] [kernel,kernel-torch,none,1024,...]

A diagnostic, not a benchmark mode; the settings alternate so machine noise hits each alike.
"""

import statistics
import sys
import time

import torch

from cachedattention import LLM, CacheConfig, SamplingParams, SchedulerConfig

CONTEXTS = (
    [100] * 6,
    [1000] * 6,
    [300, 500, 900, 1200, 1800, 2500, 3500, 4500],  # the spread of the workload bench's later turns
)


def median_decode_ms(llm: LLM, setting: int | str | None, lens: list[int], kernel, linear, row_ops, fused) -> float:
    eng = llm.engine
    paged = isinstance(setting, str)
    eng.runner.decode_kernel = kernel if paged else None
    eng.runner.group_call_rows = None if paged else setting
    eng.model.use_few_row_kernels(None if setting == "kernel-torch" else linear,
                                  None if setting in ("kernel-torch", "kernel-linear") else row_ops)
    eng.runner.fused_decode = fused if setting == "kernel" else None
    gen = torch.Generator().manual_seed(0)
    for n in lens:
        ids = torch.randint(100, 40000, (n,), generator=gen).tolist()
        eng.add_request(ids, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    times = []
    real = eng.runner.run

    def timed(batch):
        start = time.perf_counter()
        out = real(batch)
        times.append((batch.input_ids.shape[0], time.perf_counter() - start))
        return out

    eng.runner.run = timed
    try:
        while eng.has_unfinished():
            eng.step()
    finally:
        eng.runner.run = real
    return statistics.median(t for n, t in times if n == len(lens)) * 1000


def main(rounds: int, settings: list[int | str | None]) -> None:
    llm = LLM(max_model_len=8192, cache=CacheConfig(enable_prefix_cache=False),
              scheduler=SchedulerConfig(max_num_batched_tokens=2048))
    kernel = llm.engine.runner.decode_kernel
    model = llm.engine.model
    linear, row_ops, fused = model.lm_head.few_rows, model.row_ops, llm.engine.runner.fused_decode
    for lens in CONTEXTS:
        ms: dict[int | str | None, list[float]] = {s: [] for s in settings}
        for _ in range(rounds):
            for s in settings:
                ms[s].append(median_decode_ms(llm, s, lens, kernel, linear, row_ops, fused))
        cells = ", ".join(f"{_name(s)} {statistics.median(v):.1f} ms"
                          for s, v in ms.items())
        print(f"contexts {lens}: {cells} (medians of {rounds} rounds)", flush=True)


def _name(setting: int | str | None) -> str:
    return "one group" if setting is None else setting if isinstance(setting, str) else f"{setting} rows/call"


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    values = sys.argv[2].split(",") if len(sys.argv) > 2 else ["kernel", "kernel-ops", "none"]
    main(rounds, [None if v == "none" else v if v.startswith("kernel") else int(v) for v in values])
