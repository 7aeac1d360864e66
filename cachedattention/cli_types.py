"""argparse types for numeric flags: a wrong value is a usage error naming the flag, given before
any model loads, not a failure after it (or a value taken that makes no sense)."""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from typing import Any


def number(kind: type, least: float, what: str, most: float | None = None, above: bool = False) -> Callable[[str], float]:
    """A finite number of `kind` from `least` (or `above` it) to `most`, described as `what` in the error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} was expected, got {text!r}") from None
        low = value > least if above else value >= least
        if not (math.isfinite(value) and low and (most is None or value <= most)):
            raise argparse.ArgumentTypeError(f"{what} was expected, got {text}")
        return value

    return parse


POSITIVE = number(int, 1, "an integer >= 1")
GIB = number(float, 0.0, "a number of GiB >= 0")
RATE = number(float, 0.0, "a finite number > 0", above=True)
SECONDS = number(float, 0.0, "a finite number >= 0")
PORT = number(int, 0, "a port in [0, 65535]", 65535)


_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def context_length(text: str) -> int:
    """--max-model-len as vLLM reads it: a count (human_count), or auto / -1 for the model's window
    lowered to what the KV pool holds (-1)."""
    return -1 if text.strip() in ("auto", "-1") else human_count(text)


def human_count(text: str) -> int:
    """A count >= 1 as vLLM reads it (human_int)."""
    return POSITIVE(str(human_int(text)))


def human_int(text: str) -> int:
    """An integer as vLLM reads it: digits, with k/m/g/t (powers of 1000, decimals allowed: 25.6k) or
    K/M/G/T (powers of 1024, whole numbers: 32K); one out of range is left to the config's own check."""
    value = text.strip()
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgtKMGT])", value)
    if found is None:
        return integer(value)
    number_text, suffix = found.groups()
    if suffix in _BINARY:
        if "." in number_text:
            raise argparse.ArgumentTypeError(f"decimals are not taken with {suffix} (powers of 1024): {text!r}; "
                                             f"{number_text}{suffix.lower()} is in thousands")  # fmt: skip
        return int(number_text) * _BINARY[suffix]
    return int(float(number_text) * _DECIMAL[suffix])


def json_value(text: str) -> Any:
    """A flag's JSON value, or a usage error saying where it does not parse."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None


def json_object(text: str, what: str = "a JSON object", example: str | None = None) -> dict:
    """A flag's JSON object, or a usage error saying `what` was expected (with an `example`)."""
    value = json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{what} was expected" + (f", e.g. '{example}'" if example else "") +
                                         f", got {text!r}")  # fmt: skip
    return value


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer was expected, got {text!r}") from None


def one_device(text: str) -> int:
    """--tensor-parallel-size, --pipeline-parallel-size, --data-parallel-size: 1, the one device
    this engine runs on."""
    value = integer(text)
    if value != 1:
        raise argparse.ArgumentTypeError(f"this engine runs one device: only 1 is accepted, got {value} "
                                         "(run several servers instead, sharing sessions with --remote-url)")  # fmt: skip
    return value


def only(allowed: tuple[str, ...], why: str) -> Callable[[str], str]:
    """An argument type that takes what this engine does (`allowed`) and refuses the rest, saying why."""

    def check(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"{text!r} is not supported: {why} (supported: {', '.join(allowed)})")
        return text

    return check


def lengths(text: str) -> str:
    """Comma-separated counts, each >= 1 (kept as the text the caller splits)."""
    for part in text.split(","):
        POSITIVE(part.strip())
    return text


def text(value: str) -> str:
    """Text the tokenizer can take: argv bytes that are not UTF-8 arrive as lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("the text is not valid UTF-8") from None
    return value


def name(value: str) -> str:
    """A non-empty name (a session id): an empty one would fail every turn after the model loaded."""
    if not value:
        raise argparse.ArgumentTypeError("a non-empty name was expected")
    return text(value)
