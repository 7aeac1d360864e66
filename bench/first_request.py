"""Start-up time and the first requests' time to first token of fresh engines: what a user meets
first. Each round starts a new process (a new engine, a new KV pool) from each source tree given,
alternating the trees so machine noise hits each alike; CPU, embedded model, store off.

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/first_request.py [rounds] [tree ...]

A diagnostic, not a benchmark mode. With no tree, the current checkout; give two (e.g. a `git
worktree` of another commit and this one) to compare them.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROMPTS = [
    "Tell me about the history of the Roman empire in detail please.",
    "What is the capital of France? Answer briefly and well.",
    "Explain photosynthesis to a child in simple words now.",
]

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from cachedattention import LLM, SamplingParams
llm = LLM(enable_store=False)
init = time.perf_counter() - t0
params = SamplingParams(max_tokens=8, temperature=0)
ttfts = [llm.generate([p], params, use_tqdm=False)[0].metrics.ttft_s for p in json.loads(sys.argv[1])]
print(json.dumps({"init_s": init, "ttft_s": ttfts}))
"""


def run_once(tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(PROMPTS)], env=env, cwd=tree,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(rounds: int, trees: list[Path]) -> None:
    results = {t: [] for t in trees}
    for _ in range(rounds):
        for t in trees:
            results[t].append(run_once(t))
    print(f"median of {rounds} fresh processes each (ms)\n")
    print("| tree | start-up | request 1 TTFT | request 2 TTFT | request 3 TTFT |")
    print("|---|---|---|---|---|")
    for t, runs in results.items():
        init = statistics.median(r["init_s"] for r in runs) * 1e3
        ttft = [statistics.median(r["ttft_s"][i] for r in runs) * 1e3 for i in range(len(PROMPTS))]
        print(f"| {t} | {init:.0f} | " + " | ".join(f"{x:.0f}" for x in ttft) + " |")


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    main(n, [Path(p).resolve() for p in sys.argv[2:]] or [Path(__file__).resolve().parent.parent])
