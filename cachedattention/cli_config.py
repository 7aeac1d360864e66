"""vLLM's `--config FILE`: a YAML file of flag values read into the command line, so that a vLLM
deployment's config file runs here. Its keys are flag names without their dashes; the flags are
laid in after the command (and its model), before the command line's own, which so win."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from cachedattention.cli_argv import vllm_argv


class ConfigFileParser(argparse.ArgumentParser):
    """An ArgumentParser that reads `--config FILE` where it has that flag (its subcommands are
    parsers of this class too), and vLLM's other forms (cli_argv.py)."""

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None):  # fmt: skip
        args = list(sys.argv[1:] if args is None else args)
        if "--config" in self._option_string_actions and _config_flag_at(args) is not None:
            args = with_config_file(self, args)
        return super().parse_known_args(vllm_argv(self, args), namespace)


def _config_flag_at(args: list[str]) -> int | None:
    at = [i for i, a in enumerate(args) if a == "--config" or a.startswith("--config=")]
    return at[0] if at else None


def with_config_file(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """`args` (a command's, after its name) with `--config FILE` replaced by the file's flags, laid
    in after the positional model (as vLLM lays them), ahead of the command line's flags."""
    at = _config_flag_at(args)
    if sum(a == "--config" or a.startswith("--config=") for a in args) > 1:
        parser.error("--config: give one config file")
    if args[at] == "--config":
        if at + 1 >= len(args):
            parser.error("--config: expected a YAML file")
        path, rest = args[at + 1], args[:at] + args[at + 2:]
    else:
        path, rest = args[at].removeprefix("--config="), args[:at] + args[at + 1:]
    model_given = (bool(rest) and not rest[0].startswith("-")) or any(
        a == "--model" or a.startswith("--model=") for a in rest)  # fmt: skip
    flags = config_file_flags(parser, path, skip=("model",) if model_given else ())
    lead = 1 if rest and not rest[0].startswith("-") else 0
    return rest[:lead] + flags + rest[lead:]


def config_file_flags(parser: argparse.ArgumentParser, path: str, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags the YAML file at `path` holds, as vLLM reads them: `true` the flag alone, `false` its
    --no- form where it has one (else nothing), a list its values, a mapping as JSON."""
    flags: list[str] = []
    for key, value in _read_yaml(parser, path).items():
        name = str(key).replace("_", "-")
        if name in skip:  # (the command line's model wins over the file's, as vLLM's)
            continue
        flag = f"--{name}"
        if name == "config" or flag not in parser._option_string_actions:
            parser.error(f"--config {path}: {key!r} is not a flag of `{parser.prog}`")
        flags += _flag_values(parser, path, flag, value)
    return flags


def _flag_values(parser: argparse.ArgumentParser, path: str, flag: str, value: Any) -> list[str]:
    if value is None:
        parser.error(f"--config {path}: {flag[2:]} has no value (give one, or leave the key out)")
    if isinstance(value, bool):
        if value:
            return [flag]
        negative = f"--no-{flag[2:]}"
        return [negative] if negative in parser._option_string_actions else []
    if isinstance(value, list):
        items = [json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value]
        if isinstance(parser._option_string_actions[flag], argparse._AppendAction):  # (e.g. --api-key: once each)
            return [part for item in items for part in (flag, item)]
        return [flag, *items] if items else []
    text = json.dumps(value) if isinstance(value, dict) else str(value)
    return [f"{flag}={text}"]  # (joined: a value such as -1 is not read as a flag)


def _read_yaml(parser: argparse.ArgumentParser, path: str) -> dict:
    if not path.endswith((".yaml", ".yml")):
        parser.error(f"--config {path}: a YAML file (.yaml or .yml) was expected, as vLLM's")
    try:
        import yaml
    except ImportError:
        parser.error("--config needs PyYAML to read its file: pip install pyyaml")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except OSError as e:
        parser.error(f"--config {path}: cannot be read: {e.strerror or e}")
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        parser.error(f"--config {path}: not valid YAML: {e}")
    if values is None:  # (an empty file: no flags)
        return {}
    if not isinstance(values, dict):
        parser.error(f"--config {path}: a mapping of flag names to values was expected, got {type(values).__name__}")
    return values
