"""What n-gram speculation (vLLM's speculative_config, method "ngram") does on the embedded model
(SmolLM2-135M, CPU, float32): one engine (a second one in the process runs its steps slower), its
speculation switched on and off between requests, the same greedy chats alternated in each round.
A chat that quotes its history (a file edited and shown again) and one that does not (a story); each
answer's decode time per token, the answers checked equal, and the share of speculated tokens the
model wrote alike. With a temperature, seeded answers (speculation leaves a seeded answer as it is).

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/spec_ab.py [k[,k...]] [rounds] [temperature]
"""

import statistics
import sys
import time

CODE = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return b


def factorial(n):
    """Return n factorial."""
    result = 1
    for i in range(2, n + 1):
        result *= i
    return result
'''
CHATS = {
    "quotes its history (code edit)": [{"role": "user", "content": f"Here is my code:\n```python\n{CODE}```\n"
                                         "Rename the function fibonacci to fib and show the whole file again."}],
    "free text (a story)": [{"role": "user", "content": "Tell me a short story about a dragon who learns to bake."}],
}


def main() -> None:
    from cachedattention import LLM, SamplingParams
    from cachedattention.config import SpeculativeConfig

    ks = [int(k) for k in (sys.argv[1] if len(sys.argv) > 1 else "5").split(",")]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    temperature = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    params = SamplingParams(max_tokens=200, temperature=temperature, seed=0 if temperature else None)

    def ngram(k: int) -> dict:
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}

    llm = LLM(enable_prefix_caching=False, speculative_config=ngram(ks[0]))
    ways = {"off": None, **{f"k={k}": SpeculativeConfig.of(ngram(k)) for k in ks}}
    print(f"n-gram speculation, prompt_lookup 2-4, temperature {temperature}, {rounds} rounds alternated, medians; "
          "ms per answer token (speed-up, share of speculated tokens kept)")
    print("| chat | tokens | " + " | ".join(ways) + " |")
    print("|---" * (len(ways) + 2) + "|")
    for name, messages in CHATS.items():
        times = {way: [] for way in ways}
        counts = {way: [0, 0] for way in ways}  # (accepted, proposed)
        answers = {}
        llm.chat(messages, params, use_tqdm=False)  # (warm: kernels, page faults)
        for _ in range(rounds):
            for way, speculative in ways.items():
                llm.engine.speculative = speculative
                before = dict(llm.engine.spec_counts)
                start = time.perf_counter()
                out = llm.chat(messages, params, use_tqdm=False)[0]
                elapsed = time.perf_counter() - start - out.metrics.ttft_s  # (decode only: the prompt is the same)
                times[way].append(1000 * elapsed / max(1, len(out.token_ids) - 1))
                counts[way][0] += llm.engine.spec_counts["accepted_tokens"] - before["accepted_tokens"]
                counts[way][1] += llm.engine.spec_counts["draft_tokens"] - before["draft_tokens"]
                answers[way] = out.token_ids
        if any(answer != answers["off"] for answer in answers.values()):
            raise SystemExit(f"{name}: the answers differ")
        off = statistics.median(times["off"])
        cells = [f"{off:.1f}"]
        for way in list(ways)[1:]:
            on = statistics.median(times[way])
            cells.append(f"{on:.1f} ({off / on:.2f}x, {counts[way][0] / max(1, counts[way][1]):.0%})")
        print(f"| {name} | {len(answers['off'])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
