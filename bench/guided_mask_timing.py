"""What one guided step's mask costs where an enum's value starts: a 1,000-string enum inside an
object, and the same strings as a choice, on the embedded model's tokenizer with random logits.

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/guided_mask_timing.py [values] [rounds]
"""

import random
import sys
import time

import torch

from cachedattention.engine.guided import GuidedConstraint
from cachedattention.engine.json_schema import choice_automaton, schema_automaton
from cachedattention.model.embedded import embedded_model_dir
from cachedattention.model.tokenizer import Tokenizer


def main() -> None:
    values = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    tok = Tokenizer.from_pretrained(str(embedded_model_dir()))
    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 12)))
                    for _ in range(values)})  # fmt: skip
    schema = {"type": "object", "properties": {"country": {"enum": words}}, "required": ["country"]}
    cases = {"enum in an object": (schema_automaton(schema), '{"country": "'), "choice": (choice_automaton(words), "")}
    for name, (automaton, prefix) in cases.items():
        best = float("inf")
        for _ in range(rounds):  # a fresh constraint each round: nothing remembered from the last
            rule = GuidedConstraint(automaton, tok.token_bytes, tok.is_special, [tok.eos_token_id],
                                    tok.tokens_by_first_byte)  # fmt: skip
            for t in tok.encode(prefix):
                rule.accept(t)
            row = torch.randn(len(tok.hf), generator=torch.Generator().manual_seed(0))
            start = time.perf_counter()
            rule.mask(row)
            best = min(best, time.perf_counter() - start)
        print(f"{name}, {len(words)} values: {best * 1e3:.1f} ms for one mask at the value's start (best of {rounds})")


if __name__ == "__main__":
    main()
