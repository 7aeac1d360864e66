"""vLLM's --kv-cache-dtype on the embedded model: the device pool's pages in the model's float32
(auto), bfloat16 or FP8. How many tokens the same pool holds, a 1,024-token prompt's prefill, and
decode steps of one sequence and of eight with 1,000 tokens of context each; each dtype in its own
process, the dtypes alternated:

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/kv_dtype_ab.py [rounds] [dtype,dtype,...]
"""

import json
import statistics
import subprocess
import sys


def measure(kv_cache_dtype: str) -> dict:
    from cachedattention import LLM, SamplingParams
    from cachedattention.bench.timing import prefill_and_decode_s

    llm = LLM(kv_cache_dtype=kv_cache_dtype, enable_store=False, enable_prefix_caching=False)
    vocab = llm.engine.spec.vocab_size
    prompt = [(7 * i + 3) % (vocab - 200) + 100 for i in range(1024)]
    prefill, decode, tokens = prefill_and_decode_s(llm, prompt)
    long = [[(11 * i + 5 * j) % (vocab - 200) + 100 for i in range(1000)] for j in range(8)]
    outs = llm.generate(long, SamplingParams(max_tokens=33, temperature=0, ignore_eos=True), use_tqdm=False)
    eight = max(o.metrics.finish_s for o in outs) - max(o.metrics.first_token_s for o in outs)
    pool = llm.engine.pool
    return {"pool_tokens": pool.num_pages * pool.page_size, "prefill_ms": prefill * 1000, "decode_ms": decode * 1000,
            "decode8_ms": eight * 1000 / 32, "tokens": tokens}  # fmt: skip


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(sys.argv[2])))
        return
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["auto", "bfloat16", "fp8"]
    results: dict[str, list[dict]] = {d: [] for d in dtypes}
    for _ in range(rounds):
        for d in dtypes:
            run = subprocess.run([sys.executable, __file__, "--measure", d], capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(run.stderr)
            results[d].append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(f"embedded model, default pool, medians of {rounds} processes per dtype\n")
    print("| kv-cache-dtype | tokens in the pool | prefill 1,024 (ms) | decode, 1 seq (ms/step) | decode, 8 x 1,000 ctx (ms/step) |")
    print("|---|---|---|---|---|")
    for d, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("prefill_ms", "decode_ms", "decode8_ms")}
        print(f"| {d} | {rs[0]['pool_tokens']:,} | {med['prefill_ms']:.0f} | {med['decode_ms']:.1f} | {med['decode8_ms']:.1f} |")
    for d, rs in results.items():
        print(f"{d}: first tokens {rs[0]['tokens']}")


if __name__ == "__main__":
    main()
