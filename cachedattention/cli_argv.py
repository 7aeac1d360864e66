"""vLLM's command-line forms that argparse does not read by itself, rewritten into ours before
parsing: a flag spelt with underscores (`--max_model_len 4096`), a JSON flag given key by key
(`--speculative-config.method ngram --speculative-config.num_speculative_tokens 3`,
`--hf-overrides.rope_scaling.factor=2.0`, `-O.level=3`), and an optional flag left empty or None by a script
(`--tool-call-parser ''`, `--seed None`), which vLLM reads as not given."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cachedattention.cli_types import name as name_type
from cachedattention.cli_types import text as text_type


def vllm_argv(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """`args` with vLLM's forms rewritten for `parser` (a flag it does not know stays as it is, for
    argparse to name)."""
    out: list[str] = []
    dotted: dict[str, dict[str, Any]] = {}  # a JSON flag given key by key: its object so far
    places: dict[str, int] = {}  # where each such flag stands in `out`
    whole: set[str] = set()  # the flags given as they are
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":  # (what follows is no flag)
            out += args[i:]
            break
        if arg.startswith(("-O.", "-cc.")) and "--compilation-config" in parser._option_string_actions:
            arg = "--compilation-config" + arg[arg.index(".") :]  # (vLLM's -O.level=3, -cc.cudagraph_mode=NONE)
        flag, value, joined = _split(parser, arg)
        if flag is None:
            out.append(arg)
            i += 1
            if _takes_one_value(parser._option_string_actions.get(arg)):  # (a short flag's value: kept as it is)
                out += args[i : i + 1]
                i += 1
            continue
        if "." in flag and flag.split(".", 1)[0] in parser._option_string_actions:
            base, keys = flag.split(".", 1)
            if not joined:
                if i + 1 >= len(args):
                    parser.error(f"{flag}: expected a value")
                value, i = args[i + 1], i + 1
            if base not in dotted:
                dotted[base], places[base] = {}, len(out)
                out.append(base)  # (its place: the object is filled in below)
            _set(dotted[base], keys.split("."), _json_or_text(value), parser, flag)
            i += 1
            continue
        action = parser._option_string_actions.get(flag)
        if action is not None and _empty_optional(action, value, joined, args, i):
            i += 1 if joined else 2  # (vLLM reads '' and None as the flag not given)
            continue
        out.append(f"{flag}={value}" if joined else flag)
        whole.add(flag)
        i += 1
        if not joined and _takes_one_value(action):  # its value, whatever it looks like, is no flag
            out += args[i : i + 1]
            i += 1
    for base in dotted.keys() & whole:
        parser.error(f"{base}: give it as one JSON object or key by key ({base}.KEY VALUE), not both")
    for base, at in places.items():
        out[at] = f"{base}={json.dumps(dotted[base])}"
    return out


def _split(parser: argparse.ArgumentParser, arg: str) -> tuple[str | None, str | None, bool]:
    """A long flag's name (its underscores made dashes where the dashed name is the parser's), its
    joined value (`--flag=value`), and whether it had one; (None, None, False) for anything else."""
    name, joined, value = arg.partition("=")
    if not arg.startswith("--") or arg == "--" or " " in name:  # (argparse reads a name with a space as no flag)
        return None, None, False
    head, dot, rest = name.partition(".")
    dashed = "--" + head[2:].replace("_", "-")
    if head not in parser._option_string_actions and dashed in parser._option_string_actions:
        head = dashed
    return head + dot + rest, (value if joined else None), bool(joined)


def _empty_optional(action: argparse.Action, value: str | None, joined: bool, args: list[str], i: int) -> bool:
    """Whether this is an optional flag (one value, no default) given '' or None: vLLM reads that as
    the flag not given. (A flag of ours with a default, such as --session-id, keeps its own check.)"""
    if action.nargs is not None or type(action) is not argparse._StoreAction or action.default is not None:
        return False
    if action.required or action.type in (text_type, name_type):  # (a prompt, a system message: text, whatever it says)
        return False
    given = value if joined else (args[i + 1] if i + 1 < len(args) else None)
    return given in ("", "None")


def _takes_one_value(action: argparse.Action | None) -> bool:
    """Whether the flag's next argument is its value (a store of one value, not a switch)."""
    return action is not None and action.nargs is None and isinstance(action, argparse._StoreAction)


def _json_or_text(value: str) -> Any:
    """A dotted key's value as vLLM reads it: JSON (a number, true, a list...), else the text."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _set(obj: dict[str, Any], keys: list[str], value: Any, parser: argparse.ArgumentParser, flag: str) -> None:
    for key in keys[:-1]:
        inner = obj.setdefault(key, {})
        if not isinstance(inner, dict):
            parser.error(f"{flag}: {key} is given a value and keys both")
        obj = inner
    if not keys[-1]:
        parser.error(f"{flag}: a key was expected after the dot")
    obj[keys[-1]] = value
