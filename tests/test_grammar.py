"""Grammar-guided answers (vLLM's guided_grammar, GBNF): a JSON grammar agrees with json.loads on
random documents and changed ones, an arithmetic grammar with a recursive-descent reference; every
prefix of a derivable text stays alive, no kept prefix is a dead end, and bad grammars are refused
with where and why."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
import torch

from cachedattention import SamplingParams
from cachedattention.engine.grammar import Grammar, grammar_automaton
from cachedattention.engine.guided import GuidedConstraint
from tests.util import mutate_json

JSON_GBNF = r"""
# JSON (RFC 8259), whitespace anywhere it may stand
root   ::= ws value ws
value  ::= object | array | string | number | "true" | "false" | "null"
object ::= "{" ws ( member ( ws "," ws member )* ws )? "}"
member ::= string ws ":" ws value
array  ::= "[" ws ( value ( ws "," ws value )* ws )? "]"
string ::= "\"" ( [^"\\\x00-\x1f] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\""
number ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [+-]? [0-9]+ )?
ws     ::= [ \t\n\r]*
"""

ARITHMETIC = """
root   ::= expr
expr   ::= term (("+" | "-") term)*
term   ::= factor (("*" | "/") factor)*
factor ::= [0-9]+ | "(" expr ")"
"""


def _strict_json(text: str) -> bool:
    def refuse(name):
        raise ValueError(name)

    try:
        json.loads(text, parse_constant=refuse)
        return True
    except ValueError:
        return False


def _complete(automaton, text: bytes) -> bool:
    state = automaton.advance(automaton.start, text)
    return state is not None and automaton.may_end(state)


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.choice(["obj", "arr", "str", "num", "lit"] if depth < 3 else ["str", "num", "lit"])
    if kind == "obj":
        return {"".join(rng.choice('ab"\\é\n') for _ in range(rng.randint(0, 3))): _random_json(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}  # fmt: skip
    if kind == "arr":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "str":
        return "".join(rng.choice('xy "\\\t🙂中\x01') for _ in range(rng.randint(0, 5)))
    if kind == "num":
        return rng.choice([0, -7, 12345, 0.5, -1e-9, 3.25e40, rng.uniform(-1e3, 1e3)])
    return rng.choice([True, False, None])


def test_a_json_grammar_agrees_with_json_loads():
    automaton = grammar_automaton(JSON_GBNF)
    rng = random.Random(0)
    valid = invalid = 0
    for _ in range(300):
        doc = _random_json(rng)
        text = json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]))
        assert _complete(automaton, text.encode()), text
        state = automaton.start
        for b in text.encode():  # every prefix stays alive
            state = automaton.step(state, b)
            assert state is not None, text
        changed = mutate_json(rng, text.encode())
        if changed is None:
            continue
        try:
            decoded = changed.decode()
        except UnicodeDecodeError:  # not text: never complete
            assert not _complete(automaton, changed)
            continue
        want = _strict_json(decoded)
        assert _complete(automaton, changed) == want, changed
        valid, invalid = valid + want, invalid + (not want)
    assert valid > 20 and invalid > 50


def _arithmetic(text: str) -> bool:
    """A recursive-descent reference for ARITHMETIC."""
    pos = 0

    def factor() -> bool:
        nonlocal pos
        if pos < len(text) and text[pos].isdigit() and text[pos].isascii():
            while pos < len(text) and text[pos].isdigit() and text[pos].isascii():
                pos += 1
            return True
        if pos < len(text) and text[pos] == "(":
            pos += 1
            if not expr() or pos >= len(text) or text[pos] != ")":
                return False
            pos += 1
            return True
        return False

    def chain(item, ops) -> bool:
        nonlocal pos
        if not item():
            return False
        while pos < len(text) and text[pos] in ops:
            pos += 1
            if not item():
                return False
        return True

    def term() -> bool:
        return chain(factor, "*/")

    def expr() -> bool:
        return chain(term, "+-")

    return expr() and pos == len(text)


def _random_expr(rng: random.Random, depth: int = 0) -> str:
    if depth > 3 or rng.random() < 0.4:
        return str(rng.randint(0, 999)) if rng.random() < 0.8 else f"({_random_expr(rng, depth + 1)})"
    return _random_expr(rng, depth + 1) + rng.choice("+-*/") + _random_expr(rng, depth + 1)


def test_an_arithmetic_grammar_agrees_with_a_recursive_descent_parser():
    automaton = grammar_automaton(ARITHMETIC)
    rng = random.Random(1)
    seen = {True: 0, False: 0}
    for _ in range(400):
        text = _random_expr(rng)
        assert _arithmetic(text) and _complete(automaton, text.encode()), text
        for _ in range(rng.randint(1, 2)):
            i = rng.randint(0, len(text))
            text = text[:i] + rng.choice("()+-*/07 x") + text[i + 1 :]
        want = _arithmetic(text)
        assert _complete(automaton, text.encode()) == want, text
        seen[want] += 1
    assert seen[True] > 20 and seen[False] > 100


def test_no_kept_prefix_is_a_dead_end():
    automaton = grammar_automaton('root ::= "a" never | "b" [x-y]{2} | [^\\x00-\\U0010FFFF] "c"\nnever ::= "n" never')
    assert automaton.step(automaton.start, ord("a")) is None  # "never" never finishes: that way is pruned
    assert automaton.step(automaton.start, ord("c")) is None
    assert _complete(automaton, b"bxy")
    nested = grammar_automaton('root ::= "(" root ")" | "x"')
    assert _complete(nested, b"((((x))))") and not _complete(nested, b"((x)")
    greedy = grammar_automaton('root ::= ("a"?)* "b"')  # a repetition of what may be empty is fine
    assert _complete(greedy, b"aab") and not _complete(greedy, b"aa")


def test_ambiguous_grammars_follow_a_bounded_number_of_readings():
    automaton = grammar_automaton('root ::= ("a" | "a" "a" | "a" "a" "a")*')
    state = automaton.advance(automaton.start, b"a" * 40)
    assert state is not None and automaton.may_end(state) and len(state[0]) <= 7  # a node per frame at a class (6), and the bottom


LONGEST = 7  # texts checked: every one over a, b, c up to this length


def _concat(left: set[str], right: set[str]) -> set[str]:
    by_length: dict[int, list[str]] = {}
    for y in right:
        by_length.setdefault(len(y), []).append(y)
    return {x + y for x in left for n in range(LONGEST - len(x) + 1) for y in by_length.get(n, ())}


def _repeat(item: set[str], low: int, high: int | None) -> set[str]:
    """The texts of low to high copies (high None: any number), up to LONGEST characters."""
    out, copies = set(), {""}
    for n in range(low + LONGEST + 1 if high is None else high + 1):
        if n >= low:
            out |= copies
        copies = _concat(copies, item)
    return out


def _random_pattern(rng: random.Random, depth: int = 0) -> tuple[str, set[str]]:
    """A random GBNF expression and its texts up to LONGEST characters, worked out by sets: strings,
    classes, the empty string, groups of alternatives, and every quantifier, nested (so readings
    are ambiguous and repetitions of what may match nothing nest)."""
    kind = rng.choice(["a", "ab", "class", "empty", "group", "group"] if depth < 3 else ["a", "ab", "class", "empty"])
    if kind == "group":
        options = [_random_sequence(rng, depth + 1) for _ in range(rng.randint(1, 3))]
        gbnf, texts = "(" + " | ".join(g for g, _ in options) + ")", set().union(*(t for _, t in options))
    else:
        gbnf, texts = {"a": ('"a"', {"a"}), "ab": ('"ab"', {"ab"}), "class": ("[bc]", {"b", "c"}), "empty": ('""', {""})}[kind]
    low = rng.randint(0, 2)
    high = low + rng.randint(0, 3)
    quantifier, bounds = rng.choice([("", (1, 1)), ("", (1, 1)), ("?", (0, 1)), ("*", (0, None)), ("+", (1, None)),
                                     (f"{{{low}}}", (low, low)), (f"{{{low},}}", (low, None)), (f"{{{low},{high}}}", (low, high))])  # fmt: skip
    return gbnf + quantifier, _repeat(texts, *bounds)


def _random_sequence(rng: random.Random, depth: int) -> tuple[str, set[str]]:
    texts = {""}
    gbnf = []
    for _ in range(rng.randint(1, 3)):
        part, part_texts = _random_pattern(rng, depth)
        gbnf.append(part)
        texts = _concat(texts, part_texts)
    return " ".join(gbnf), texts


def test_random_ambiguous_grammars_agree_with_their_languages():
    """Nested groups and quantifiers (of the empty string too), each grammar's texts worked out by
    sets of strings: every text over a, b, c up to 7 characters is taken exactly when it should
    be, and every prefix of a text taken stays alive; the graph of stacks keeps every reading,
    however many there are."""
    rng = random.Random(11)
    texts = [""] + ["".join(t) for n in range(1, LONGEST + 1) for t in itertools.product("abc", repeat=n)]
    for _ in range(150):
        gbnf, taken = _random_sequence(rng, 0)
        automaton = grammar_automaton("root ::= " + gbnf)
        alive = {t[:k] for t in taken for k in range(len(t) + 1)}
        for text in texts[: 3**6]:  # up to 6 characters: whether a 7th can follow is known
            state = automaton.advance(automaton.start, text.encode())
            assert (state is not None and automaton.may_end(state)) == (text in taken), (gbnf, text)
            if text in alive:
                assert state is not None, (gbnf, text)


def test_nested_repetitions_of_what_matches_nothing_cost_one_node_per_frame():
    """Grammars that used to hang (each reading a stack of its own): repetitions nested three deep
    of the empty string, rules that double the readings at each of 40 levels, eight nested
    optional repetitions, and nesting 3,000 deep; each position builds at most a node per frame."""
    nested = Grammar('root ::= (((""){0,1000}){0,1000}){0,1000} "z"')
    assert nested.matched(nested.step_char(nested.start, ord("z")))
    doubling = Grammar('root ::= t0 "z"\n' + "\n".join(f't{i} ::= t{i + 1} t{i + 1} | ""' for i in range(40)) + '\nt40 ::= ""')
    assert doubling.matched(doubling.step_char(doubling.start, ord("z")))
    optional = Grammar("root ::= " + "(" * 8 + '"a"?' + "){0,100}" * 8 + ' "z"')
    cursor = optional.start
    for c in "aaaz":
        cursor = optional.step_char(cursor, ord(c))
        assert cursor is not None and len(cursor[0]) <= 3, c  # "a" (one frame), "z", the bottom
    assert optional.matched(cursor)
    deep = Grammar('root ::= "(" root ")" | "x"')
    cursor = deep.start
    for c in "(" * 3000 + "x" + ")" * 3000:
        cursor = deep.step_char(cursor, ord(c))
    assert deep.matched(cursor) and len(deep._nodes) < 4 * 6001  # a node or two per level, not a stack copied


@pytest.mark.parametrize(
    "grammar, message",
    [
        ("expr ::= [0-9]", "no 'root' rule"),
        ("root ::= root \"+\" [0-9] | [0-9]", "the rule 'root' is left-recursive"),
        ("root ::= a\na ::= b \"x\"\nb ::= a | \"y\"", "left-recursive"),
        ('root ::= item\n', "the rule 'item' is used but not defined at line 1, column 10"),
        ('root ::= "a"\nroot ::= "b"', "defined twice at line 2"),
        ('root ::= ("a"', "a group is not closed"),
        ('root ::= "a")', "unbalanced parenthesis"),
        ('root := "a"', "'::=' was expected"),
        ('root ::= "a" root', "never finishes"),
        ('root ::= "\\q"', "\\q (an unknown escape)"),
        ('root ::= "a"{2000}', "above 1000"),
        ("", "the grammar is empty"),
        ("?start: value", "a rule's name"),
        ('root ::= "\\d"', "\\d is a class, not a character: write it outside the string, as [\\d]"),
        ("root ::= []a]", "a class that begins with ']' is ambiguous"),
        ('root ::= "a"{,1001}', "above 1000"),
    ],
)
def test_bad_grammars_are_refused_with_where_and_why(grammar, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Grammar(grammar)
    with pytest.raises(ValueError):
        SamplingParams(grammar=grammar)


def test_a_masked_answer_follows_the_grammar_token_by_token():
    vocab = [b"1", b"+", b"(", b")", b"23", b"*(", b"x", b""]  # token 7 is the end
    rule = GuidedConstraint(grammar_automaton(ARITHMETIC), vocab.__getitem__, lambda t: t == 7, [7], end_token=7)
    gen = torch.Generator().manual_seed(2)
    text = b""
    for _ in range(40):
        if rule.done:
            break
        token = int(torch.argmax(rule.mask(torch.randn(len(vocab), generator=gen))))
        rule.accept(token)
        text += vocab[token]
    state = grammar_automaton(ARITHMETIC).advance(grammar_automaton(ARITHMETIC).start, text)
    assert state is not None, text  # a prefix of an expression, whole if it ended
    assert not rule.done or _arithmetic(text.decode()), text


def test_the_embedded_model_answers_by_the_grammar(embedded_llm):
    grammar = 'root ::= answer ", because " [a-z ,]{3,60} "."\nanswer ::= "Yes" | "No"'
    question = [{"role": "user", "content": "Is the sky blue? Answer yes or no and say why."}]
    out = embedded_llm.chat(question, SamplingParams(max_tokens=40, temperature=0, grammar=grammar))[0]
    assert out.finish_reason == "stop", out.text
    assert re.fullmatch(r"(Yes|No), because [a-z ,]{3,60}\.", out.text), out.text


def test_gbnf_s_own_spellings_are_read_as_llama_cpp_reads_them():
    spaced = grammar_automaton('root ::= "a" * "b" {2} "c" {,2} [\\d]')  # quantifiers after spaces; {,n}; \d in a class
    assert _complete(spaced, b"aabbcc7") and _complete(spaced, b"bb0") and not _complete(spaced, b"bbccc0")
    assert not _complete(spaced, b"bbc")


def test_a_lone_surrogate_in_a_string_is_refused():
    with pytest.raises(ValueError, match="lone surrogate"):
        Grammar('root ::= "a\ud800"')


def test_a_request_s_grammar_is_compiled_once_and_again_only_when_it_changes(monkeypatch):
    """The server's parse of a request compiles its grammar once (a 400 still names the field); the
    engine's copy of the params (with its end ids) keeps that automaton; a changed form compiles anew."""
    from dataclasses import replace

    from cachedattention import sampling
    from cachedattention.server.api_error import APIError
    from cachedattention.server.protocol import sampling_params

    compiled = []

    def counted(text: str):
        compiled.append(text)
        return grammar_automaton(text)

    monkeypatch.setattr(sampling, "grammar_automaton", counted)
    params = sampling_params({"guided_grammar": 'root ::= "a"+', "max_tokens": 4}, 64)
    engine_copy = replace(params, eos_token_ids=(2,), seed=5)
    assert compiled == ['root ::= "a"+'] and engine_copy.guided_automaton() is params.guided_automaton()
    changed = replace(params, grammar='root ::= "b"')
    automaton = changed.guided_automaton()
    assert len(compiled) == 2 and automaton.step(automaton.start, ord("b")) is not None
    assert automaton.step(automaton.start, ord("a")) is None
    with pytest.raises(APIError) as refused:
        sampling_params({"structured_outputs": {"grammar": "root ::= x"}}, 64)
    assert refused.value.param == "structured_outputs" and "'x' is used but not defined" in str(refused.value)
