"""What n-gram speculation (vLLM's speculative_config, method "ngram") does on the embedded model
(SmolLM2-135M, CPU, float32): one engine (a second one in the process runs its steps slower), its
speculation switched on and off between requests, the same greedy chats alternated in each round.
A chat that quotes its history (a file edited and shown again) and one that does not (a story); each
answer's decode time per token, the answers checked equal, and the share of speculated tokens the
model wrote alike.

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/spec_ab.py [k] [rounds]
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

    k = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    params = SamplingParams(max_tokens=200, temperature=0)
    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    llm = LLM(enable_prefix_caching=False, speculative_config=spec)
    ways = {"off": None, "ngram": llm.engine.speculative}
    print(f"n-gram speculation, k={k}, prompt_lookup 2-4, {rounds} rounds alternated, medians; ms per answer token")
    print("| chat | tokens | off | ngram | speed-up | speculated tokens kept |")
    print("|---|---|---|---|---|---|")
    for name, messages in CHATS.items():
        times = {way: [] for way in ways}
        answers = {}
        llm.chat(messages, params, use_tqdm=False)  # (warm: kernels, page faults)
        before = dict(llm.engine.spec_counts)
        for _ in range(rounds):
            for way, speculative in ways.items():
                llm.engine.speculative = speculative
                start = time.perf_counter()
                out = llm.chat(messages, params, use_tqdm=False)[0]
                elapsed = time.perf_counter() - start - out.metrics.ttft_s  # (decode only: the prompt is the same)
                times[way].append(1000 * elapsed / max(1, len(out.token_ids) - 1))
                answers[way] = out.token_ids
        if answers["off"] != answers["ngram"]:
            raise SystemExit(f"{name}: the answers differ")
        counts = {key: llm.engine.spec_counts[key] - before[key] for key in before}
        kept = counts["accepted_tokens"] / max(1, counts["draft_tokens"])
        off, on = statistics.median(times["off"]), statistics.median(times["ngram"])
        print(f"| {name} | {len(answers['off'])} | {off:.1f} | {on:.1f} | {off / on:.2f}x | {kept:.0%} |")


if __name__ == "__main__":
    main()
