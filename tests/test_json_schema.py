"""JSON schema guided answers: the automaton agrees with the jsonschema package on random documents
(complete exactly when valid, for documents written as json.dumps writes them), never completes an
invalid one, refuses what it cannot enforce by name, and the embedded model's guided answers validate."""

from __future__ import annotations

import copy
import json
import random
from fractions import Fraction

import jsonschema
import pytest
import torch

from cachedattention import LLM, SamplingParams
from cachedattention.engine.guided import GuidedConstraint
from cachedattention.engine.json_schema import MAX_STACKS, choice_automaton, schema_automaton
from cachedattention.engine.schema_compile import compile_schema
from tests.util import mutate_json

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8, "title": "Name"},
        "age": {"type": "integer", "description": "years"},
        "height": {"type": "number"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "ü", None, True]}, "maxItems": 3},
        "pet": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}], "default": None},
    },
    "required": ["name", "age"],
    "$defs": {"Pet": {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
                      "required": ["kind"]}},
}  # fmt: skip
TREE = {  # recursive
    "$defs": {"Node": {"type": "object", "properties": {"value": {"type": ["integer", "string"]},
                                                         "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
                       "required": ["value"]}},
    "$ref": "#/$defs/Node",
}  # fmt: skip
FLAGS = {"type": "object", "properties": {"id": {"type": "string", "maxLength": 3}},
         "additionalProperties": {"type": "boolean"}}  # fmt: skip
NUMBERS = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4}
BOUNDED = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                            "delta": {"type": "integer", "exclusiveMinimum": -5.5, "exclusiveMaximum": 20},
                                            "low": {"type": "integer", "maximum": -3},
                                            "score": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                                            "temp": {"type": "number", "exclusiveMinimum": -40.5, "maximum": 60},
                                            "even": {"type": "integer", "multipleOf": 2, "minimum": 0, "maximum": 100},
                                            "price": {"type": "number", "multipleOf": 0.25, "minimum": 0, "maximum": 10}},
           "required": ["age"]}  # fmt: skip
PATTERNED = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[ab ü]*[b中\\\\\"]"},
                                             "mood": {"type": "string", "pattern": "[🙂中]|^[ab]", "maxLength": 6}},
             "required": ["code"]}  # fmt: skip
TUPLE = {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string", "maxLength": 3}],
         "items": {"type": "boolean"}, "maxItems": 4}  # pydantic's tuple[int, str, *bool] (draft 2020-12)
COUNTED = {"type": "object", "properties": {"id": {"type": "integer"}, "tag": {"type": "boolean"}}, "required": ["id"],
           "additionalProperties": {"type": "integer"}, "minProperties": 2, "maxProperties": 3}  # fmt: skip
SCHEMAS = {"person": PERSON, "tree": TREE, "flags": FLAGS, "numbers": NUMBERS, "bounded": BOUNDED, "patterned": PATTERNED,
           "tuple": TUPLE, "counted": COUNTED}  # fmt: skip


def strict(schema):
    """What the automaton enforces, for jsonschema: listed properties and no others unless given."""
    schema = copy.deepcopy(schema)

    def walk(s):
        if isinstance(s, dict):
            if "properties" in s:
                s.setdefault("additionalProperties", False)
            for v in s.values():
                walk(v)
        elif isinstance(s, list):
            for v in s:
                walk(v)

    walk(schema)
    return schema


def _text(rng: random.Random, depth: int = 0):
    return "".join(rng.choice('ab "\\\nü中🙂') for _ in range(rng.randint(0, 10 if depth else 3)))


def _value(rng: random.Random, schema: dict, root: dict, depth: int = 0):
    """A random value shaped by the schema: mostly valid, sometimes off in one way or another."""
    if rng.random() < 0.04:  # anything at all
        return rng.choice([1, 2.5, "x", None, True, [], {}, {"name": "x"}])
    if "$ref" in schema:
        return _value(rng, root["$defs"][schema["$ref"].split("/")[-1]], root, depth)
    if "anyOf" in schema:
        return _value(rng, rng.choice(schema["anyOf"]), root, depth)
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "const" in schema:
        return schema["const"] if rng.random() < 0.9 else "dog"
    kind = schema.get("type")
    kind = rng.choice(kind) if isinstance(kind, list) else kind
    if kind == "object":
        props = schema.get("properties", {})
        out = {k: _value(rng, v, root, depth + 1) for k, v in props.items()
               if k in schema.get("required", []) and rng.random() < 0.97 or rng.random() < 0.5}  # fmt: skip
        extra = schema.get("additionalProperties")
        for i in range(rng.randint(0, 2) if extra else int(rng.random() < 0.05)):
            out[f"x{i}"] = _value(rng, extra or {"type": "integer"}, root, depth + 1)
        return out
    if kind == "array":
        n = rng.randint(0, 5 if depth < 3 else 0)
        prefix = schema.get("prefixItems", [])
        return [_value(rng, prefix[i] if i < len(prefix) else schema["items"], root, depth + 1) for i in range(n)]
    if kind == "string":
        return _text(rng, depth)
    if kind == "integer":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -1000))
        hi = schema.get("maximum", schema.get("exclusiveMaximum", 1000))
        return rng.randint(int(lo) - 3, int(hi) + 3) if rng.random() < 0.95 else 2.5
    if kind == "number":
        if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
            lo = schema.get("minimum", schema.get("exclusiveMinimum"))
            hi = schema.get("maximum", schema.get("exclusiveMaximum"))
            return rng.choice([lo, hi, -lo, round(rng.uniform(lo - 1, hi + 1), rng.randint(0, 3)), int(hi)])
        return rng.choice([rng.randint(-9, 9), rng.uniform(-1e3, 1e3), rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30)])
    if kind == "boolean":
        return rng.random() < 0.5
    return None


def _dump(rng: random.Random, value) -> bytes:
    style = rng.choice([{}, {"indent": 2}, {"separators": (",", ":")}])
    return json.dumps(value, ensure_ascii=False, **style).encode()


def _complete(automaton, text: bytes) -> bool:
    state = automaton.advance(automaton.start, text)
    return state is not None and automaton.is_done(state)


@pytest.mark.parametrize("name", SCHEMAS)
def test_complete_exactly_when_the_document_is_valid(name):
    schema = SCHEMAS[name]
    automaton, validator = schema_automaton(schema), jsonschema.Draft202012Validator(strict(schema))
    rng = random.Random(name)
    valid = 0
    for _ in range(400):
        value = _value(rng, schema, schema)
        text = _dump(rng, value)
        ok = validator.is_valid(value)
        assert _complete(automaton, text) == ok, (text, ok)
        valid += ok
        if ok:  # no proper prefix of a valid document is complete (a root number may still go on)
            state = automaton.start
            for i, b in enumerate(text[:-1]):
                state = automaton.step(state, b)
                assert state is not None and not automaton.is_done(state), text[: i + 1]
    assert 60 < valid < 380  # both kinds were tried


@pytest.mark.parametrize("name", SCHEMAS)
def test_a_changed_byte_never_makes_an_invalid_document_complete(name):
    schema = SCHEMAS[name]
    automaton, validator = schema_automaton(schema), jsonschema.Draft202012Validator(strict(schema))
    rng = random.Random(f"mutate-{name}")
    done = 0
    for _ in range(600):
        text = mutate_json(rng, _dump(rng, _value(rng, schema, schema)))
        if text is not None and _complete(automaton, text):
            done += 1
            assert validator.is_valid(json.loads(text)), text
    assert done > 10


def test_tuples_of_draft_7_and_items_that_may_not_follow_the_prefix():
    pair = schema_automaton({"type": "array", "items": [{"type": "integer"}, {"type": "string"}], "additionalItems": False})
    assert [_complete(pair, t) for t in (b'[1, "a"]', b"[1]", b"[]", b'[1, "a", 2]', b'["a"]')] == [True, True, True, False, False]
    assert [_complete(schema_automaton({"type": "array", "items": False}), t) for t in (b"[]", b"[1]")] == [True, False]
    with pytest.raises(ValueError, match="minItems 3 is above the 2 items"):
        compile_schema({"type": "array", "prefixItems": [{}, {}], "items": False, "minItems": 3})


def test_keys_may_come_in_any_order_once_each_and_required_ones_before_the_end():
    automaton = schema_automaton(PERSON)
    assert _complete(automaton, b'{"age": 3, "name": "Al"}')
    assert not _complete(automaton, b'{"name": "Al"}')  # age is required
    assert automaton.advance(automaton.start, b'{"name": "Al", "name"') is None  # once each
    assert automaton.advance(automaton.start, b'{"nam') is not None
    assert automaton.advance(automaton.start, b'{"nam"') is None  # a listed name whole, not part of one
    assert automaton.advance(automaton.start, b'{"nose') is None  # not a listed property
    assert automaton.advance(automaton.start, b'{"name": ""') is None  # minLength 1
    assert automaton.advance(automaton.start, b'{"name": "123456789') is None  # maxLength 8
    assert automaton.advance(automaton.start, b'{"name": "\\u00e9\\n\xf0\x9f\x99\x82abcde"') is not None  # 8 characters
    assert automaton.advance(automaton.start, b'{"tags": ["a", "a", "a", "a"') is None  # maxItems 3
    assert automaton.advance(automaton.start, b'{"age": 1.5') is None  # an integer
    assert automaton.advance(automaton.start, b' {') is None  # the answer starts with the value


def _prefixes(texts: list[str]) -> set[str]:
    """Every non-empty prefix of the texts: a text is one iff some text starts with it."""
    return {t[:k] for t in texts for k in range(1, len(t) + 1)}


def test_a_bounded_integer_s_prefixes_are_those_of_integers_within_its_bounds():
    from cachedattention.engine.schema_nodes import Num

    rng = random.Random(7)
    for _ in range(60):
        lo, hi = rng.choice([None, rng.randint(-300, 300)]), rng.choice([None, rng.randint(-300, 300)])
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
        node = Num(True, lo, hi)
        inside = [str(v) for v in range(-2000, 2001) if (lo is None or v >= lo) and (hi is None or v <= hi)]
        inside += ["-0"] if node.holds("0") else []
        starts = _prefixes(inside)
        for text in {str(v)[:k] for v in range(-1500, 1501, 7) for k in range(1, len(str(v)) + 1)} | {"-0", "0"}:
            # beyond +-2000 only an unbounded side has integers: those start with any digits
            far = (hi is None and not text.startswith("-")) or (lo is None and text.startswith("-"))
            want = text in starts or (far and text not in ("0", "-0"))
            assert node.viable(text) == want, (lo, hi, text)


def test_a_multiple_s_prefixes_are_those_of_multiples_within_its_bounds():
    from cachedattention.engine.schema_nodes import Num

    rng = random.Random(8)
    for _ in range(12):
        lo, hi = rng.choice([None, rng.randint(-300, 300)]), rng.choice([None, rng.randint(-300, 300)])
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
        m = rng.choice([2, 3, 7, 25, 120])
        node = Num(True, lo, hi, multiple=Fraction(m))
        inside = [str(v) for v in range(-3000, 3001) if v % m == 0 and (lo is None or v >= lo) and (hi is None or v <= hi)]
        inside += ["-0"] if node.holds("0") else []
        starts = _prefixes(inside)
        for text in {str(v)[:k] for v in range(-1500, 1501, 11) for k in range(1, len(str(v)) + 1)} | {"-0", "0"}:
            far = (hi is None and not text.startswith("-")) or (lo is None and text.startswith("-"))
            want = text in starts or (far and text not in ("0", "-0"))
            assert node.viable(text) == want, (lo, hi, m, text)
            if text != "-":
                v = int(text)
                assert node.holds(text) == (v % m == 0 and (lo is None or v >= lo) and (hi is None or v <= hi)), text
    price = schema_automaton({"type": "number", "multipleOf": 0.01, "minimum": 0})
    assert _complete_root(price, b"19.99") and _complete_root(price, b"20") and not _complete_root(price, b"19.999")
    assert price.advance(price.start, b"19.991") is None and price.advance(price.start, b"1e3") is None
    assert _complete_root(schema_automaton({"type": "integer", "multipleOf": 2.5}), b"15")  # integers: multiples of 5
    assert not _complete_root(schema_automaton({"type": "integer", "multipleOf": 2.5}), b"12")


def _complete_root(automaton, text: bytes) -> bool:
    state = automaton.advance(automaton.start, text)
    return state is not None and automaton.may_end(state)


def test_a_bounded_number_s_digits_stay_within_its_bounds():
    from cachedattention.engine.schema_compile import compile_schema

    unit = compile_schema({"type": "number", "minimum": 0, "exclusiveMaximum": 1})
    assert all(unit.viable(t) for t in ("0", "0.", "0.9", "0.99", "-", "-0"))
    assert not any(unit.viable(t) for t in ("1", "2", "-1"))
    assert unit.holds("0") and unit.holds("0.999") and not unit.holds("1") and not unit.holds("1.0")
    assert not unit.viable("1.") and not unit.viable("-0.1") and unit.viable("-0.0")  # -0.0 is 0
    automaton = schema_automaton({"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}}})
    assert _complete(automaton, b'{"p": 0.25}') and automaton.advance(automaton.start, b'{"p": 1}') is None
    assert automaton.advance(automaton.start, b'{"p": 0.5e') is None  # no exponent where bounded
    band = compile_schema({"type": "number", "exclusiveMinimum": 2.5, "maximum": 12})
    assert band.viable("2.5") and band.viable("2.51") and not band.holds("2.5") and band.holds("12")  # (2.5, 2.6)
    assert band.viable("1") and not band.viable("13") and not band.viable("-")  # 1 -> 10, 11, 12


def test_bounds_and_numbers_of_any_length_are_never_rounded():
    """Found by a review: 28-digit Decimal arithmetic looped for ever on a 29-digit negative number,
    took 10^30 under an exclusiveMaximum of 10^30, and dead-ended on a 29-digit bound."""
    below = schema_automaton({"type": "object", "properties": {"x": {"type": "number", "maximum": 100}}})
    assert _complete(below, b'{"x": -' + b"1" * 40 + b"}")
    huge = schema_automaton({"type": "integer", "exclusiveMaximum": 10**30})
    assert huge.advance(huge.start, b"1" + b"0" * 30) is None and huge.may_end(huge.advance(huge.start, b"9" * 30))
    exact = -12345678901234567890123456789
    only = schema_automaton({"type": "integer", "minimum": exact, "maximum": exact})
    assert only.may_end(only.advance(only.start, str(exact).encode()))
    at_least = compile_schema({"type": "number", "minimum": -7})
    assert at_least.viable("67.388475041455927442685844702806") and at_least.viable("1" * 29 + ".")
    assert compile_schema({"type": "number", "exclusiveMinimum": 1}).viable("1." + "0" * 27 + "1")
    assert compile_schema({"type": "integer", "minimum": 1e300}).viable("1")  # 1 followed by 300 digits
    # an integer bound past a float's range (math.isfinite overflowed on it: a 500 from the server)
    beyond = schema_automaton({"type": "integer", "minimum": 10**400, "multipleOf": 10**399})
    assert beyond.may_end(beyond.advance(beyond.start, b"2" + b"0" * 400))
    assert not beyond.may_end(beyond.advance(beyond.start, b"9" * 400))  # below the minimum
    assert not beyond.may_end(beyond.advance(beyond.start, b"2" + b"0" * 399 + b"1"))  # not a multiple


def test_a_choice_holding_a_lone_surrogate_is_refused_as_such():
    with pytest.raises(ValueError, match="a choice holds a lone surrogate"):
        choice_automaton(["yes", "n\ud800"])


def test_a_root_number_may_end_or_go_on_and_a_choice_ends_where_no_other_goes_on():
    integer = schema_automaton({"type": "integer"})
    state = integer.advance(integer.start, b"12")
    assert not integer.is_done(state) and integer.may_end(state)
    assert not integer.may_end(integer.advance(integer.start, b"-"))
    choice = choice_automaton(["yes", "yes!", "no"])
    state = choice.advance(choice.start, b"yes")
    assert not choice.is_done(state) and choice.may_end(state)  # "yes!" goes on
    assert choice.is_done(choice.advance(choice.start, b"yes!")) and choice.is_done(choice.advance(choice.start, b"no"))
    assert choice.advance(choice.start, b"nope") is None


def test_findings_of_a_review_stay_fixed():
    # a type beside an enum keeps only its values (1.0 is an integer, written as json.dumps writes it)
    typed = schema_automaton({"type": "string", "enum": ["a", 1]})
    assert _complete(typed, b'"a"') and typed.advance(typed.start, b"1") is None
    assert _complete(schema_automaton({"type": "integer", "const": 1.0}), b"1.0")
    # an escaped key may not spell a listed property under another schema
    extra = schema_automaton({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                              "additionalProperties": True})  # fmt: skip
    assert _complete(extra, b'{"a": 5, "b": "x"}')
    assert extra.advance(extra.start, b'{"a": 5, "\\u0061') is None and extra.advance(extra.start, b'{"\\u') is None
    # strings are UTF-8: lone continuation bytes, overlong forms and surrogates are refused; characters count
    one = schema_automaton({"type": "string", "maxLength": 1})
    for broken in (b'"\x80', b'"\xc3\xc3', b'"\xe0\x80', b'"\xed\xa0\x80', b'"\xf5'):
        assert one.advance(one.start, broken) is None, broken
    assert _complete(one, '"🙂"'.encode()) and one.advance(one.start, '"éé'.encode()) is None
    # a $ref to a $ref is an alias, not a loop
    alias = {"$defs": {"Tree": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/Alias"}}}},
                       "Alias": {"$ref": "#/$defs/Tree"}}, "$ref": "#/$defs/Alias"}  # fmt: skip
    assert _complete(schema_automaton(alias), b'{"kids": [{"kids": []}, {}]}')
    # a string with only a minimum stops counting past it (its states recur)
    least = schema_automaton({"type": "string", "minLength": 3})
    assert least.advance(least.start, b'"' + b"x" * 10) == least.advance(least.start, b'"' + b"x" * 100)


def test_overlapping_options_nested_deep_are_followed_a_bounded_number_of_ways():
    """Two options sharing their fields, nested: each level doubles the readings of the text. At
    most MAX_STACKS are followed (the first); the answer stays valid."""
    node = {"type": "object", "properties": {"name": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#"}}},
            "required": ["name", "kids"]}  # fmt: skip
    schema = {"anyOf": [node, {**node, "properties": {**node["properties"], "size": {"type": "integer"}}}]}
    automaton = schema_automaton(schema)
    state = automaton.advance(automaton.start, b'{"name": "x", "kids": [' * 20)
    assert state is not None and len(state) <= MAX_STACKS
    closed = b'{"name": "x", "kids": [' * 20 + b'{"name": "y", "kids": [], "size": 3}' + b"]}" * 20
    assert _complete(automaton, closed)


def test_a_large_enum_is_one_state_and_takes_exactly_its_values():
    rng = random.Random(3)
    words = sorted({"".join(rng.choice("abcü") for _ in range(rng.randint(1, 8))) for _ in range(3000)})
    automaton = schema_automaton({"type": "object", "properties": {"w": {"enum": words}}, "required": ["w"]})
    state = automaton.advance(automaton.start, b'{"w": "')
    assert len(state) == 1  # a trie of the values, not one stack per value
    assert all(_complete(automaton, f'{{"w": "{w}"}}'.encode()) for w in words)
    others = ({w + "a" for w in words} | {w[:-1] for w in words}) - set(words)
    assert not any(_complete(automaton, f'{{"w": "{w}"}}'.encode()) for w in others)


@pytest.mark.parametrize(
    "schema, message",
    [
        ({"type": "string", "pattern": "(?i)^a"}, "schema.pattern: an inline flag"),
        ({"type": "string", "pattern": 5}, "schema.pattern must be a string"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "'patternProperties' is not supported"),
        ({"type": "integer", "multipleOf": 0}, "multipleOf must be a number > 0"),
        ({"type": "integer", "minimum": 1, "maximum": 4, "multipleOf": 5}, "that is a multiple of its multipleOf"),
        ({"type": "number", "maximum": -1, "minimum": -2, "multipleOf": 3}, "that is a multiple"),
        ({"type": "array", "uniqueItems": True}, "'uniqueItems' is not supported"),
        ({"type": "object", "properties": {"a": {}, "b": {}}, "required": ["a", "b"], "maxProperties": 1},
         "2 required properties are above maxProperties 1"),
        ({"type": "object", "properties": {"a": {}}, "minProperties": 2}, "minProperties 2 is above the 1 properties allowed"),
        ({"type": "object", "minProperties": 3, "maxProperties": 2}, "minProperties 3 is above maxProperties 2"),
        ({"type": "integer", "minimum": 3, "exclusiveMaximum": 3}, "no integer lies within"),
        ({"type": "number", "minimum": 1, "exclusiveMaximum": 1}, "no number lies within"),
        ({"type": "integer", "exclusiveMinimum": True}, "exclusiveMinimum must be a finite number"),
        ({"type": "object", "properties": {}, "required": ["x"]}, "required names 'x'"),
        ({"$ref": "#/$defs/Missing"}, "points at nothing"),
        ({"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}, "refers only to itself"),
        ({"$ref": "https://example.com/s.json"}, "must point inside the schema"),
        ({"type": "text"}, "schema.type must be one of"),
        ({"type": []}, "schema.type must be one of"),
        ({"type": ["string", 1]}, "schema.type must be one of"),
        ({"type": {"a": 1}}, "schema.type must be one of"),
        ({"type": "integer", "enum": ["a", 1.5]}, "no value of the enum or const is of type 'integer'"),
        ({"const": float("nan")}, "NaN or infinite"),
        ({"enum": ["ok", "a\ud800"]}, "holds a lone surrogate"),
        ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems 3 is above maxItems 2"),
        ({"allOf": [{"type": "string"}, {"maxLength": 2}]}, "allOf with more than one"),
        ({"anyOf": [{"type": "string"}], "maxLength": 2}, "'maxLength' beside anyOf"),
        ({"not": {"type": "string"}}, "'not' beside no type"),
        ({"type": "object", "properties": {"a": False}}, "schema.properties.a is false"),
        ("{not json", "not valid JSON"),
    ],
)
def test_what_cannot_be_enforced_is_refused_by_place_and_keyword(schema, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        compile_schema(schema)
    with pytest.raises(ValueError):
        SamplingParams(json_schema=schema)


def test_guided_fields_are_one_at_a_time_and_a_schema_is_kept_as_text():
    params = SamplingParams(json_schema=PERSON)
    assert json.loads(params.json_schema) == PERSON and hash(params)
    with pytest.raises(ValueError, match="json_object and json_schema cannot be combined"):
        SamplingParams(json_object=True, json_schema=PERSON)
    with pytest.raises(ValueError, match="choice"):
        SamplingParams(choice=["a", ""])
    assert SamplingParams(choice="yes").choice == ("yes",)


def test_an_end_token_is_allowed_only_where_the_answer_may_end(embedded_llm):
    tok = embedded_llm.tokenizer
    eos = tok.eos_token_id
    rule = GuidedConstraint(schema_automaton({"type": "integer"}), tok.token_bytes, tok.is_special, [eos])
    row = torch.zeros(len(tok.hf))
    row[eos] = 10.0
    for t in tok.encode("-"):
        rule.accept(t)
    assert rule.mask(row)[eos] == float("-inf")
    for t in tok.encode("42"):
        rule.accept(t)
    assert rule.mask(row)[eos] == 10.0 and not rule.done
    rule.accept(eos)
    assert rule.done
    # where nothing but the end may follow ("0" of an integer), the end is taken even when it is
    # not among the likely tokens, the request ignores EOS (no enders) or min_tokens holds EOS back
    for enders, eos_logit in (([eos], -30.0), ([], 10.0), ([eos], float("-inf"))):
        rule = GuidedConstraint(schema_automaton({"type": "integer"}), tok.token_bytes, tok.is_special, enders,
                                tok.tokens_by_first_byte, end_token=eos)  # fmt: skip
        rule.accept(tok.encode("0")[0])
        row = torch.randn(len(tok.hf), generator=torch.Generator().manual_seed(0))
        row[eos] = eos_logit
        masked = rule.mask(row)
        assert masked.isfinite().nonzero().flatten().tolist() == [eos]
        rule.accept(eos)
        assert rule.done


def test_where_no_token_goes_on_the_answer_ends_unfinished_rather_than_broken():
    vocab = [b"a", b"b", b""]  # a vocabulary without "c"; token 2 is the end
    rule = GuidedConstraint(choice_automaton(["ac"]), vocab.__getitem__, lambda t: t == 2, [2], end_token=2)
    row = torch.zeros(3)
    assert rule.mask(row).isfinite().tolist() == [True, False, False]
    rule.accept(0)
    assert rule.mask(row).isfinite().tolist() == [False, False, True]  # only the end: never "ab"
    rule.accept(2)
    assert rule.done


def test_the_embedded_model_answers_by_the_schema(embedded_llm):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 30},
                       "colors": {"type": "array", "items": {"enum": ["black", "white", "orange"]}, "maxItems": 3}},
        "required": ["name", "age", "colors"],
    }  # fmt: skip
    question = [{"role": "user", "content": "Describe a cat as JSON with its name, age and colors."}]
    out = embedded_llm.chat(question, SamplingParams(max_tokens=80, temperature=0, json_schema=schema))[0]
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), strict(schema))
    sentiment = [{"role": "user", "content": "Is 'I love this film!' positive or negative?"}]
    out = embedded_llm.chat(sentiment, SamplingParams(max_tokens=8, temperature=0, choice=["positive", "negative"]))[0]
    assert out.finish_reason == "stop" and out.text == "positive"


def test_a_schema_needs_a_tokenizer_and_is_checked_before_the_request_runs(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path))
    with pytest.raises(ValueError, match="tokenizer") as e:
        llm.generate([[1, 2, 3]], SamplingParams(choice=["a", "b"]))
    assert e.value.param == "choice"
    with pytest.raises(ValueError, match="tokenizer") as e:
        llm.generate([[1, 2, 3]], SamplingParams(regex="a+"))
    assert e.value.param == "regex"


def test_whitespace_is_capped_between_values_but_not_inside_strings():
    """A string's spaces are its text (code indented deep inside a JSON string); between values a
    run of whitespace-only tokens stops after MAX_WHITESPACE bytes (no endless padding)."""
    from cachedattention.engine.guided import MAX_WHITESPACE
    from cachedattention.engine.tool_choice import tool_call_automaton

    vocab = [b" " * 8, b'"', b"x", b'{"code": ', b"}", b""]  # token 5 is the end
    for automaton, opening in ((schema_automaton({"type": "object", "properties": {"code": {"type": "string"}}}), [3]),
                               (tool_call_automaton(["run"]), None)):  # fmt: skip
        rule = GuidedConstraint(automaton, vocab.__getitem__, lambda t: t == 5, [5], end_token=5)
        if opening is None:  # the call's fixed head, then the arguments' object opens
            for b in b'<tool_call>\n{"name": "run", "arguments": ':
                rule.state = automaton.step(rule.state, b)
            rule.accept(3)
        else:
            rule.accept(opening[0])
        rule.accept(1)  # inside the string: spaces are text
        for _ in range(6):
            assert rule.mask(torch.zeros(len(vocab)))[0] == 0.0
            rule.accept(0)
        rule.accept(1)  # the string closed: between values the run is capped
        allowed = 0
        while rule.mask(torch.zeros(len(vocab)))[0] == 0.0:
            rule.accept(0)
            allowed += 8
        assert allowed == MAX_WHITESPACE


def test_max_properties_leaves_room_for_the_required_ones():
    schema = {"type": "object", "properties": {"r": {"type": "integer"}}, "required": ["r"], "additionalProperties": True,
              "maxProperties": 2, "minProperties": 1}  # fmt: skip
    automaton = schema_automaton(schema)
    assert _complete(automaton, b'{"x": 1, "r": 2}') and _complete(automaton, b'{"r": 1}')
    assert automaton.advance(automaton.start, b'{"x": 1, "y') is None  # "r" must still fit
    state = automaton.advance(automaton.start, b'{"x": 1, "')
    assert [chr(b) for b in range(256) if automaton.step(state, b) is not None] == ["r"]
    assert not _complete(automaton, b"{}") and automaton.advance(automaton.start, b'{"r": 1, "x": 2, "') is None


@pytest.mark.parametrize("form", ["object", "integer", "person", "regex"])
def test_the_vocabulary_walk_finds_the_tokens_each_one_tried_alone_finds(embedded_llm, form):
    """Where none of the likeliest tokens fits, the guided mask looks through the whole vocabulary by
    walking its tokens in byte order: at every state of random guided answers (whitespace runs
    included) it finds exactly the tokens that trying each one's bytes finds."""
    from cachedattention.engine.json_schema import JSON_OBJECT
    from cachedattention.engine.regex import regex_automaton

    tok = embedded_llm.tokenizer
    automaton = {"object": JSON_OBJECT, "integer": schema_automaton({"type": "integer"}),
                 "person": schema_automaton(PERSON), "regex": regex_automaton(r"[a-z ]{2,9}-\d+( ok)?")}[form]  # fmt: skip
    groups = tok.tokens_by_first_byte()
    g = torch.Generator().manual_seed(len(form))
    checked = 0
    for _ in range(1 if form == "object" else 2):  # (an object's states let most of the vocabulary through: seconds each)
        rule = GuidedConstraint(automaton, tok.token_bytes, tok.is_special, [tok.eos_token_id], tok.tokens_by_first_byte)
        for _ in range(6):
            firsts = [b for b in range(256) if automaton.step(rule.state, b) is not None]
            rule._recall()  # (what _fits remembers is the current state's, as when the mask asks)
            tried = {t for b in firsts for t in groups.get(b, ()) if rule._fits(t, False)}
            assert rule._fitting(groups, firsts) == tried
            checked += len(tried)
            allowed = rule.mask(torch.randn(len(tok.hf), generator=g)).isfinite().nonzero().flatten()
            if rule.done or not len(allowed):
                break
            rule.accept(int(allowed[torch.randint(len(allowed), (1,), generator=g)]))
    assert checked > 100
    if form == "object":  # near the whitespace limit: whitespace-only tokens, and only they, run out
        rule = GuidedConstraint(automaton, tok.token_bytes, tok.is_special, [tok.eos_token_id], tok.tokens_by_first_byte)
        for t in tok.encode("{") + tok.encode("  ") * 10:
            rule.accept(t)
        assert rule._whitespace >= 20
        firsts = [b for b in range(256) if automaton.step(rule.state, b) is not None]
        rule._recall()
        tried = {t for b in firsts for t in groups.get(b, ()) if rule._fits(t, False)}
        assert rule._fitting(groups, firsts) == tried and any(tok.token_bytes(t)[:1] == b" " for t in tried)
