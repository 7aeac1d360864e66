"""The torch profile of one decode step of 8 sequences at 300-4,500 tokens (the embedded model, CPU),
with the paged decode kernel (`kernel`, the default) or through torch's padded groups (`groups`):
which operators the step spends its time in. The kernel itself is a ctypes call the profiler does
not list; it is the step's time minus the operators'.

A diagnostic, not a benchmark mode:

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/decode_profile.py [kernel|groups]
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from cachedattention import LLM, CacheConfig, SamplingParams, SchedulerConfig

LENGTHS = [300, 500, 900, 1200, 1800, 2500, 3500, 4500]


def main(mode: str) -> None:
    llm = LLM(max_model_len=8192, cache=CacheConfig(enable_prefix_cache=False),
              scheduler=SchedulerConfig(max_num_batched_tokens=2048))
    eng = llm.engine
    if mode == "groups":
        eng.runner.decode_kernel = None
    gen = torch.Generator().manual_seed(0)
    for n in LENGTHS:
        eng.add_request(torch.randint(100, 40000, (n,), generator=gen).tolist(),
                        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    real, seen = eng.runner.run, {"decode_steps": 0, "profile": None}

    def run(batch):
        if batch.input_ids.shape[0] == len(LENGTHS):
            seen["decode_steps"] += 1
            if seen["decode_steps"] == 8:  # a warm step
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    out = real(batch)
                seen["profile"] = prof
                return out
        return real(batch)

    eng.runner.run = run
    while eng.has_unfinished():
        eng.step()
    print(seen["profile"].key_averages().table(sort_by="self_cpu_time_total", row_limit=16))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kernel")
