"""What keeping a streamed answer's text costs per token: decoding the whole output at each step (the
engine before the incremental detokenizer) against `IncrementalDetokenizer`, on the embedded tokenizer.

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/detokenize_timing.py [lengths, e.g. 500,2000,4000]
"""

import sys
import time

from cachedattention.engine.detokenizer import IncrementalDetokenizer
from cachedattention.model.embedded import embedded_model_dir
from cachedattention.model.tokenizer import Tokenizer


def main() -> None:
    lengths = [int(n) for n in (sys.argv[1] if len(sys.argv) > 1 else "500,2000,4000").split(",")]
    tok = Tokenizer.from_pretrained(str(embedded_model_dir()))
    with open(__file__.replace("bench/detokenize_timing.py", "README.md")) as f:
        ids = tok.encode(f.read() * 2)
    print("| answer tokens | whole decode per step: ms per token | incremental: ms per token | ratio |")
    print("|---|---|---|---|")
    for n in lengths:
        answer = ids[:n]
        grown: list[int] = []  # the request's output list, one token longer each step
        start = time.perf_counter()
        for t in answer:
            grown.append(t)
            whole = tok.decode(grown)
        t_whole = time.perf_counter() - start
        grown = []
        start = time.perf_counter()
        detok = IncrementalDetokenizer(tok.decode)
        for t in answer:
            grown.append(t)
            detok.update(grown)
        detok.update(grown, final=True)
        t_inc = time.perf_counter() - start
        assert detok.text == whole
        print(f"| {n} | {t_whole / n * 1e3:.3f} | {t_inc / n * 1e3:.3f} | {t_whole / t_inc:.1f}x |")


if __name__ == "__main__":
    main()
