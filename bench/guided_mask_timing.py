"""What one guided step's mask costs where an enum's value starts: a 1,000-string enum inside an
object, and the same strings as a choice; and inside a number with and without bounds (digits
made likely, as a model writing one makes them); at a string's start with and without a pattern,
at a guided_regex answer's start and inside a guided_grammar answer. The embedded model's tokenizer, random logits.

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/guided_mask_timing.py [values] [rounds]
"""

import random
import sys
import time

import torch

from cachedattention.engine.grammar import grammar_automaton
from cachedattention.engine.guided import GuidedConstraint
from cachedattention.engine.json_schema import choice_automaton, schema_automaton
from cachedattention.engine.regex import regex_automaton
from cachedattention.model.embedded import embedded_model_dir
from cachedattention.model.tokenizer import Tokenizer

EMAIL = r"[a-z0-9._]{1,20}@[a-z]{2,12}\.(com|org|net)"
REASON = 'root ::= answer ", because " [a-z ,]{3,60} "."\nanswer ::= "Yes" | "No"'


def main() -> None:
    values = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    tok = Tokenizer.from_pretrained(str(embedded_model_dir()))
    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 12)))
                    for _ in range(values)})  # fmt: skip
    schema = {"type": "object", "properties": {"country": {"enum": words}}, "required": ["country"]}
    number = {"type": "object", "properties": {"p": {"type": "number"}}}
    bounded = {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}}}
    text = {"type": "object", "properties": {"p": {"type": "string"}}}
    email = {"type": "object", "properties": {"p": {"type": "string", "pattern": f"^{EMAIL}$"}}}
    symbols = {"type": "object", "properties": {"p": {"type": "string", "pattern": "^\\W+$", "minLength": 50}}}
    cases = {
        f"enum in an object, {len(words)} values": (schema_automaton(schema), '{"country": "'),
        f"choice, {len(words)} values": (choice_automaton(words), ""),
        "a number": (schema_automaton(number), '{"p": 0.'),
        "a number in [0, 1)": (schema_automaton(bounded), '{"p": 0.'),
        "a string": (schema_automaton(text), '{"p": "'),
        "a string with a pattern": (schema_automaton(email), '{"p": "'),
        "a regex (guided_regex)": (regex_automaton(EMAIL), ""),
        "a string of 50+ non-word characters (a large class and a length)": (schema_automaton(symbols), '{"p": "'),
        "a grammar (guided_grammar), after its first word": (grammar_automaton(REASON), "Yes, because "),
    }
    digits = [tok.encode(d)[0] for d in "0123456789"]
    for name, (automaton, prefix) in cases.items():
        best, first = float("inf"), None
        for _ in range(rounds):  # a fresh constraint each round: nothing remembered from the last
            rule = GuidedConstraint(automaton, tok.token_bytes, tok.is_special, [tok.eos_token_id],
                                    tok.tokens_by_first_byte)  # fmt: skip
            for t in tok.encode(prefix):
                rule.accept(t)
            row = torch.randn(len(tok.hf), generator=torch.Generator().manual_seed(0))
            if prefix.endswith("0."):
                row[digits] += 20.0
            start = time.perf_counter()
            rule.mask(row)
            took = time.perf_counter() - start
            best, first = min(best, took), took if first is None else first
        print(f"{name}: {best * 1e3:.2f} ms for one mask (best of {rounds}; the first {first * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
