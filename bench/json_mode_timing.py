"""What JSON mode costs per token on the embedded model: the same number of answer tokens with and
without it (ignore_eos, so both write exactly as many), alternated.

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/json_mode_timing.py [tokens] [rounds]
"""

import sys
import time

from cachedattention import LLM, SamplingParams


def main() -> None:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    llm = LLM()
    question = [{"role": "user", "content": "Describe a cat as a JSON object with name, age and colors."}]
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for json_mode in (False, True):
            params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, json_object=json_mode)
            start = time.perf_counter()
            out = llm.chat(question, params, use_tqdm=False)[0]
            times[json_mode].append((time.perf_counter() - start) / len(out.token_ids))
            if json_mode and out.finish_reason == "stop":
                print(f"(the JSON closed after {len(out.token_ids)} tokens)")
    free, constrained = min(times[False]), min(times[True])
    print(f"{tokens} tokens, best of {rounds}: {free * 1e3:.2f} ms per token free, {constrained * 1e3:.2f} ms in JSON "
          f"mode ({constrained / free:.2f}x)")


if __name__ == "__main__":
    main()
