"""Regex-guided answers (vLLM's guided_regex, JSON schema's pattern): the automaton agrees with
Python's re on texts drawn from each pattern and on changed ones, never takes a text re rejects,
keeps every prefix of a match alive, reads UTF-8 a byte at a time, and refuses what it cannot hold to;
JSON schema's string formats take what their parsers take."""

from __future__ import annotations

import datetime
import ipaddress
import json
import random
import re
import uuid

import pytest
import torch

from cachedattention import SamplingParams
from cachedattention.engine.code_points import utf8_span
from cachedattention.engine.guided import GuidedConstraint
from cachedattention.engine.json_schema import schema_automaton
from cachedattention.engine.regex import Regex, regex_automaton
from cachedattention.engine.regex_parse import parse
from cachedattention.engine.string_formats import FORMATS

PATTERNS = [
    r"\d{3}-\d{4}",
    r"(a|b)*c?",
    r"[A-Za-z_][A-Za-z0-9_]*",
    r"^(?:yes|no|maybe)$",
    r"x{2,4}y+z{0,2}",
    r"[^a-c\n]{1,5}",
    r"(\w+\s?)+\.",
    r"[€😀-😂]+[-a]",
    r"a.b|\.",
    r"(?P<year>\d{4})-(?P<month>0[1-9]|1[0-2])",
    r"[\d\-+]{2}\S\W",
    r"\x41\u00e9\t[\]\\^]",
    r"(ab|a)(bc|c)?{",
    r"\s*[üé中]\D",
]
ALPHABET = "abcxyz019_ -.+\n\t€😀😁😃ü中é{]\\^"  # no "\r" (Python's "." takes it, JavaScript's does not)


def _sample(rng: random.Random, node: tuple) -> str:
    """A text the tree matches, drawn from the tree itself (not the automaton)."""
    kind = node[0]
    if kind == "set":
        ranges = node[1]
        printable = [(max(lo, 0x20), min(hi, 0x7E)) for lo, hi in ranges if lo <= 0x7E and hi >= 0x20]
        lo, hi = rng.choice(printable if printable and rng.random() < 0.8 else ranges)
        return chr(rng.randint(lo, min(hi, lo + 300)))
    if kind == "cat":
        return "".join(_sample(rng, child) for child in node[1])
    if kind == "alt":
        return _sample(rng, rng.choice(node[1]))
    if kind == "rep":
        low, high = node[2], node[3]
        return "".join(_sample(rng, node[1]) for _ in range(rng.randint(low, low + 3 if high is None else high)))
    return ""  # an anchor at an edge


def _mutate(rng: random.Random, text: str) -> str:
    i = rng.randint(0, len(text))
    op = rng.choice(["insert", "delete", "replace"])
    c = rng.choice(ALPHABET)
    if op == "insert" or not text:
        return text[:i] + c + text[i:]
    i = min(i, len(text) - 1)
    return text[:i] + (c if op == "replace" else "") + text[i + 1 :]


def _states(automaton, text: str) -> list:
    """The state after each byte of the text (None once it can no longer match)."""
    out, state = [], automaton.start
    for b in text.encode():
        state = automaton.step(state, b) if state is not None else None
        out.append(state)
    return out


def _matches(automaton, text: str) -> bool:
    states = _states(automaton, text)
    state = states[-1] if states else automaton.start
    return state is not None and automaton.may_end(state)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_drawn_texts_match_and_every_prefix_stays_alive(pattern):
    automaton, rng = regex_automaton(pattern), random.Random(pattern)
    for _ in range(200):
        text = _sample(rng, parse(pattern))
        assert re.fullmatch(pattern, text), (pattern, text)  # the tree reads the pattern as re does
        states = _states(automaton, text)
        assert all(s is not None for s in states), (pattern, text)
        assert _matches(automaton, text)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_changed_texts_match_exactly_when_re_says_so(pattern):
    automaton, rng = regex_automaton(pattern), random.Random(f"mutate-{pattern}")
    agreed = {True: 0, False: 0}
    for _ in range(400):
        text = _sample(rng, parse(pattern))
        for _ in range(rng.randint(1, 3)):
            text = _mutate(rng, text)
        # where Python's Unicode and ASCII classes disagree (a "中" for \\w), ours hold to both: no match
        want = re.fullmatch(pattern, text) is not None and re.fullmatch(pattern, text, re.ASCII) is not None
        assert _matches(automaton, text) == want, (pattern, text, want)
        agreed[want] += 1
    assert agreed[False] > 20


def test_classes_hold_to_what_both_python_and_javascript_match():
    # \d, \w, \s: ASCII; their negations leave out what either syntax's class holds
    assert _matches(regex_automaton(r"\d"), "7") and not _matches(regex_automaton(r"\d"), "٣")
    assert not _matches(regex_automaton(r"\D"), "٣") and _matches(regex_automaton(r"\D"), "x")
    assert not _matches(regex_automaton(r"\w"), "é") and not _matches(regex_automaton(r"\W"), "é")
    assert not _matches(regex_automaton(r"\S"), "\u00a0") and not _matches(regex_automaton(r"\S"), "\ufeff")
    dot = regex_automaton(".")
    assert not any(_matches(dot, c) for c in "\n\r\u2028\u2029") and _matches(dot, "🙂")
    assert _matches(regex_automaton("[^a]"), "🙂") and not _matches(regex_automaton("[^a]"), "a")


def test_utf8_is_read_a_byte_at_a_time_and_a_character_begun_must_be_able_to_end_well():
    assert utf8_span(b"\xe0") == (0x800, 0xFFF) and utf8_span(b"\xf0\x9f") == (0x1F000, 0x1FFFF)
    assert utf8_span(b"\xc0") is None and utf8_span(b"\xed\xa0") is None  # overlong, surrogate
    automaton = regex_automaton("[a-z]*ü")
    assert automaton.step(automaton.start, 0xC3) is not None  # "ü" starts with C3
    assert automaton.step(automaton.start, 0xE4) is None  # no character the pattern takes starts with E4
    assert automaton.advance(automaton.start, "中".encode()[:2]) is None
    state = automaton.advance(automaton.start, "abü".encode())
    assert automaton.is_done(state)  # nothing may follow
    loose = regex_automaton("[a-zé]*")
    assert not loose.may_end(loose.advance(loose.start, "é".encode()[:1]))  # inside a character


def test_search_semantics_for_json_schema_patterns():
    rng = random.Random(1)
    for pattern in (r"\d{2}", r"^ab", r"c$", r"^x|y$", r"^(a|b)+$"):
        automaton = Regex(pattern, search=True).automaton()
        for _ in range(300):
            text = "".join(rng.choice("abcxy01") for _ in range(rng.randint(0, 6)))
            assert _matches(automaton, text) == (re.search(pattern, text) is not None), (pattern, text)


@pytest.mark.parametrize(
    "pattern, message",
    [
        (r"(a)\1", "backreferences"),
        (r"(?=a)a", "lookahead"),
        (r"(?<!a)b", "lookbehind"),
        (r"(?i)a", "inline flag"),
        (r"\bword", "word boundaries"),
        (r"\p{L}", "Unicode properties"),
        (r"a++", "possessive"),
        (r"a(^b)", "anchors"),
        (r"a$b", "anchors"),
        (r"(ab", "not closed"),
        (r"ab)", "unbalanced parenthesis"),
        (r"a{3,2}", "out of order"),
        (r"a{5000}", "above 1000"),
        (r"(a{1000}){1000}", "too large"),
        (r"*a", "nothing to repeat"),
        (r"[z-a]", "out of order"),
        ("[a", "ends too early"),
        (r"\xZZ", "hex digits"),
    ],
)
def test_what_cannot_be_held_to_is_refused_with_what_and_where(pattern, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        regex_automaton(pattern)
    with pytest.raises(ValueError):
        SamplingParams(regex=pattern)


def test_regex_is_one_guided_field_among_the_others():
    assert SamplingParams(regex=r"\d+").guided
    with pytest.raises(ValueError, match="choice and regex cannot be combined"):
        SamplingParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="regex must be a string"):
        SamplingParams(regex=5)


def test_a_masked_answer_follows_the_pattern_token_by_token():
    vocab = [b"12", b"3", b"-", b"45", b"a", b"\xc3", b"\xbc", b""]  # token 7 is the end
    pattern = r"\d{3}-\d{2}ü?"
    rule = GuidedConstraint(regex_automaton(pattern), vocab.__getitem__, lambda t: t == 7, [7], end_token=7)
    rng = torch.Generator().manual_seed(0)
    text = b""
    while not rule.done:
        masked = rule.mask(torch.randn(len(vocab), generator=rng))
        token = int(torch.argmax(masked))
        rule.accept(token)
        text += vocab[token]
    assert re.fullmatch(pattern, text.decode()), text


def test_the_embedded_model_answers_by_the_pattern(embedded_llm):
    question = [{"role": "user", "content": "Give a phone number in the form 555-1234."}]
    pattern = r"\d{3}-\d{4}"
    out = embedded_llm.chat(question, SamplingParams(max_tokens=16, temperature=0, regex=pattern))[0]
    assert out.finish_reason == "stop" and re.fullmatch(pattern, out.text), out.text
    date = [{"role": "user", "content": "When did the Apollo 11 landing happen? Answer with the date."}]
    pattern = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    out = embedded_llm.chat(date, SamplingParams(max_tokens=16, temperature=0, regex=pattern))[0]
    assert out.finish_reason == "stop" and re.fullmatch(pattern, out.text), out.text


def _string_held(schema: dict, text: str) -> bool:
    automaton = schema_automaton(schema)
    state = automaton.advance(automaton.start, json.dumps(text, ensure_ascii=False).encode())
    return state is not None and automaton.is_done(state)


def test_dates_and_times_are_real_ones():
    rx = Regex(FORMATS["date"]).automaton()
    day, step = datetime.date(1, 1, 1), datetime.timedelta(days=37)
    while day.year < 9999:  # every 37th day of years 1-9999 (all 3.65 M pass; this keeps the test short)
        assert _matches(rx, day.isoformat()), day
        day += step
    leap = ["2024-02-29", "2000-02-29", "0004-02-29", "1600-02-29"]
    assert all(_matches(rx, d) for d in leap)
    assert not any(_matches(rx, d) for d in ["2023-02-29", "1900-02-29", "2024-04-31", "2024-13-01", "0000-01-01", "2024-1-01"])
    rng = random.Random(3)
    for _ in range(300):
        moment = datetime.datetime(rng.randint(1, 9999), rng.randint(1, 12), rng.randint(1, 28), rng.randint(0, 23),
                                   rng.randint(0, 59), rng.randint(0, 59), rng.choice([0, rng.randint(1, 999999)]),
                                   tzinfo=datetime.timezone(datetime.timedelta(minutes=15 * rng.randint(-56, 56))))  # fmt: skip
        assert _string_held({"type": "string", "format": "date-time"}, moment.isoformat()), moment.isoformat()
        assert _string_held({"type": "string", "format": "time"}, moment.timetz().isoformat())
    assert _string_held({"type": "string", "format": "date-time"}, "2024-05-01T12:30:00Z")
    for wrong in ("2024-05-01 12:30:00Z", "2024-05-01T24:00:00Z", "2024-05-01T12:30:00", "2024-05-01T12:30:60Z"):
        assert not _string_held({"type": "string", "format": "date-time"}, wrong), wrong


def test_formats_take_what_their_parsers_take():
    rng = random.Random(4)
    ipv4, uid = Regex(FORMATS["ipv4"]).automaton(), Regex(FORMATS["uuid"]).automaton()
    for _ in range(300):
        address = ".".join(str(rng.randint(0, 255)) for _ in range(4))
        assert _matches(ipv4, address)
        changed = _mutate(rng, address)
        if _matches(ipv4, changed):
            assert str(ipaddress.IPv4Address(changed)) == changed
        text = str(uuid.UUID(int=rng.getrandbits(128)))
        assert _matches(uid, text) and _matches(uid, text.upper())
        changed = _mutate(rng, text)
        if _matches(uid, changed):
            assert str(uuid.UUID(changed)) == changed.lower()
    email, host, duration = (Regex(FORMATS[f]).automaton() for f in ("email", "hostname", "duration"))
    assert _matches(email, "first.last+tag@mail.example.org") and not _matches(email, "a@b") and not _matches(email, "a..b@c.de")
    assert _matches(host, "a-b.example.com") and not _matches(host, "-a.com") and not _matches(host, "a" * 64)
    assert all(_matches(duration, d) for d in ("P1Y2M3DT4H5M6.5S", "PT0S", "P2W", "P1D", "PT36H"))
    assert not any(_matches(duration, d) for d in ("P", "PT", "P1H", "1Y", "P1YT"))


def test_a_format_and_a_pattern_both_hold_and_other_formats_are_annotations():
    schema = {"type": "string", "format": "date", "pattern": "^2024"}
    assert _string_held(schema, "2024-05-01") and not _string_held(schema, "2023-05-01")
    assert not _string_held(schema, "2024")
    assert _string_held({"type": "string", "format": "uri"}, "not a uri")  # not held to: an annotation
    escaped = {"type": "string", "format": "date"}
    automaton = schema_automaton(escaped)
    assert automaton.is_done(automaton.advance(automaton.start, b'"2024-05-\\u00301"'))  # "\u0030" is "0"


def test_the_embedded_model_writes_a_date_where_the_schema_says_so(embedded_llm):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                               "born": {"type": "string", "format": "date"}},
              "required": ["name", "born"]}  # fmt: skip
    question = [{"role": "user", "content": "Who was Albert Einstein and when was he born? Answer as JSON."}]
    out = embedded_llm.chat(question, SamplingParams(max_tokens=48, temperature=0, json_schema=schema))[0]
    assert out.finish_reason == "stop", out.text
    datetime.date.fromisoformat(json.loads(out.text)["born"])


@pytest.mark.parametrize(
    "pattern, message",
    [
        (r"\u{41", "\\u needs 4 hex digits"),  # used to loop for ever
        ("a" + "*" * 1500, "multiple repeat"),  # used to overflow the stack
        (r"x{2}{3}", "multiple repeat"),
        (r"a{,3}", "write {0,3}"),
        (r"{2}", "nothing to repeat"),
        (r"\x4", "\\x needs 2 hex digits"),
        (r"\Z", "write $"),
        (r"\U0001F600", "write the character itself"),
        (r"[]]", "write \\]"),
        ("a\\\ud800", "lone surrogate"),
    ],
)
def test_findings_of_the_review_are_refused(pattern, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        regex_automaton(pattern)


def test_findings_of_the_review_stay_fixed():
    # a negated class's shorthands take their widest reading: its complement holds to both syntaxes
    for pattern, text in ((r"[^\s]", "\u00a0"), (r"[^\s]", "\x1c"), (r"[^\w]", "é"), (r"[^\d]", "٣"), (r"[^\D]", "٣"),
                          (r"[^\W]", "é")):  # fmt: skip
        assert not _matches(regex_automaton(pattern), text), (pattern, text)
    assert _matches(regex_automaton(r"[^\s]"), "a") and _matches(regex_automaton(r"[^\D]"), "5")
    with pytest.raises(ValueError, match="matches no text"):
        regex_automaton(r"[^\s\S]")
    # a class that holds nothing makes its branch a dead end: never entered
    empty = regex_automaton(r"a[^\s\S]|b")
    assert empty.step(empty.start, ord("a")) is None and empty.step(empty.start, ord("b")) is not None
    # inside a string with a pattern, an escape begins only where a character may follow
    anchored = schema_automaton({"type": "string", "pattern": "^a$"})
    assert anchored.advance(anchored.start, b'"a\\') is None and _string_held({"type": "string", "pattern": "^a$"}, "a")
    assert schema_automaton({"type": "string", "format": "date"}).advance(schema_automaton({"type": "string", "format": "date"}).start, b'"2024-01-01\\') is None
    # patterns, formats and lengths that no string meets together are refused; a length is held with them
    for schema in ({"type": "string", "format": "uuid", "pattern": "z"}, {"type": "string", "pattern": "^a$", "minLength": 2},
                   {"type": "string", "pattern": "^a{5}$", "maxLength": 3}, {"type": "string", "format": "date", "maxLength": 5}):  # fmt: skip
        with pytest.raises(ValueError, match="no text matches all of the string's pattern, format and length"):
            schema_automaton(schema)
    short = {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}
    assert _string_held(short, "abc") and not _string_held(short, "abcd")
    with pytest.raises(ValueError, match="format must be a string"):
        schema_automaton({"type": "string", "format": ["date"]})


def test_a_pattern_may_ask_for_long_runs_of_whitespace():
    vocab = [b" ", b"  ", b"x", b""]
    rule = GuidedConstraint(regex_automaton(" {30}x"), vocab.__getitem__, lambda t: t == 3, [3], end_token=3)
    text = b""
    while not rule.done:
        token = int(torch.argmax(rule.mask(torch.zeros(len(vocab)))))
        rule.accept(token)
        text += vocab[token]
    assert text == b" " * 30 + b"x"


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "^[a-c]{2,4}(-[0-9])?$"},
        {"type": "string", "format": "date", "pattern": "^20"},
        {"type": "string", "format": "uuid", "pattern": "ab"},
        {"type": "string", "pattern": "é|\\n", "minLength": 3, "maxLength": 6},
        {"type": "string", "format": "email", "maxLength": 12},
    ],
)
def test_random_walks_through_patterned_strings_never_get_stuck(schema):
    """From every state reached by bytes the automaton allows, some byte goes on or the string is
    complete; and a walk that completes the string gives one that holds."""
    automaton, rng = schema_automaton(schema), random.Random(json.dumps(schema))
    finished = 0
    for _ in range(150):
        state, text = automaton.start, b""
        while not automaton.is_done(state) and len(text) < 80:
            allowed = [b for b in range(256) if automaton.step(state, b) is not None]
            assert allowed, (schema, text)  # never stuck
            quote = ord('"') if ord('"') in allowed and rng.random() < 0.3 else None
            b = quote or rng.choice(allowed)
            state, text = automaton.step(state, b), text + bytes((b,))
        if automaton.is_done(state):
            finished += 1
            value = json.loads(text)
            pattern, fmt = schema.get("pattern"), schema.get("format")
            assert pattern is None or re.search(pattern, value), (schema, value)
            assert fmt is None or re.fullmatch(FORMATS[fmt], value), (schema, value)
            assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10**9), (schema, value)
    assert finished > 10


def test_the_memory_of_a_large_pattern_stays_bounded():
    from cachedattention.engine.code_points import MEMO_WEIGHT

    rx = Regex("[ab]*a[ab]{300}")
    rng, state = random.Random(5), rx.start
    for _ in range(3000):
        state = rx.step_char(state, ord(rng.choice("ab")))
    assert rx._weight <= MEMO_WEIGHT and len(rx._steps) < 3000


def test_a_search_that_cannot_decide_counts_as_no_way_on():
    """Found by the second review: hostname with "_" (which no host name has) under a maxLength
    compiled (the search gave up and took the start as live), and a walk then got stuck."""
    with pytest.raises(ValueError, match="no text matches"):
        schema_automaton({"type": "string", "format": "hostname", "pattern": "_", "maxLength": 255})
