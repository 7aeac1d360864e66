"""vLLM's engine flags that change nothing for one process on one device (accepted, each help
saying why: parallelism of 1, graph capture, compilation, expert placement, a text-only run of a
vision-language checkpoint), and those asking for what this engine does not have (refused,
saying why). The command line and `LLM(...)` (llm_args.py) check their values alike."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from cachedattention.cli_types import GIB, POSITIVE, json_object, number, one_device, only, text

# vLLM's structured-output backends, over its releases (lm-format-enforcer until 0.10)
GUIDED_DECODING_BACKENDS = ("auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer")
guided_decoding_backend = only(GUIDED_DECODING_BACKENDS, "vLLM's backends, each served by this engine's own "
                                                         "guided decoding (a backend's options are not taken)")
NOT_COMPILED = ("this engine compiles no graphs (a CPU's decode layers are its own C kernels, built at first "
                "use; CUDA runs eagerly): any level or JSON object changes nothing")
NOT_OVERLAPPED = ("each step is scheduled once the last one's tokens are in, as without it: the answers are "
                  "the same")
ONE_DEVICE = "this engine runs one device in one process"
GUIDED = (f"any of vLLM's ({', '.join(GUIDED_DECODING_BACKENDS)}): this engine's own guided decoding serves every "
          "structured answer, held to the whole schema, regex or grammar, or refused saying what it cannot hold to")
TEXT_ONLY = "this engine runs a vision-language checkpoint's language model alone: text in, text out"


def compilation_config(value: str) -> str:
    """-O / -cc / --compilation-config: vLLM's level (-O3, -O 3), a dotted field (-O.level=3) or a JSON object."""
    value = value.strip()
    if value.isdigit() or value.startswith("."):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"a level (0-3), a dotted field (.level=3) or a JSON object was expected, "
                                         f"got {value!r}")  # fmt: skip
    return value


def media_limits(value: str) -> str:
    """--limit-mm-per-prompt: vLLM's JSON object (`{"image": 0, "video": 0}`, a count or `{"count": N}`
    each) or its older `image=0,video=0`; every limit 0, for this engine reads no media."""
    try:
        limits = json.loads(value)
    except json.JSONDecodeError:
        limits = dict(part.split("=", 1) for part in value.split(",") if "=" in part) if "=" in value else None
    if not isinstance(limits, dict) or not limits:
        raise argparse.ArgumentTypeError(f"a JSON object of limits per modality was expected, e.g. "
                                         f"'{{\"image\": 0}}', got {value!r}")  # fmt: skip
    counts = {k: v.get("count") if isinstance(v, dict) else v for k, v in limits.items()}
    if any(str(count).strip() != "0" for count in counts.values()):
        raise argparse.ArgumentTypeError(f"{TEXT_ONLY}: images, video and audio in messages are refused; give 0 "
                                         f"for each modality (got {value}), or leave the flag out")  # fmt: skip
    return value


def structured_outputs_config(value: str) -> str:
    """--structured-outputs-config: vLLM's JSON object; its backend any of vLLM's, its options that
    would change an answer (whitespace, additional properties, structure inside reasoning) off."""
    config = json_object(value, example='{"backend": "xgrammar"}')
    for key, option in config.items():
        if key == "backend":
            guided_decoding_backend(str(option))
        elif key in ("disable_any_whitespace", "disable_additional_properties", "enable_in_reasoning"):
            if option not in (False, None):
                raise argparse.ArgumentTypeError(f"{key} true is not followed here: it changes the structured "
                                                 "answers this engine writes (leave it out)")  # fmt: skip
        elif key not in ("disable_fallback", "reasoning_parser") or (key == "reasoning_parser" and option):
            raise argparse.ArgumentTypeError(f"{key!r} is not taken (taken: backend, disable_fallback; the "
                                             "reasoning parser is --reasoning-parser)")  # fmt: skip
    return value


def config_format(value: str) -> str:
    if value == "mistral":
        raise argparse.ArgumentTypeError("'mistral' is not read: this engine reads a model's Hugging Face "
                                         "config.json (and safetensors or GGUF weights); most Mistral "
                                         "repositories have both forms")  # fmt: skip
    return only(("auto", "hf"), "a model's Hugging Face config.json is read")(value)


def no_weight_offload(value: str) -> float:
    gib = GIB(value)
    if gib:
        raise argparse.ArgumentTypeError("weights stay on the device here, none are offloaded to the CPU: a "
                                         "quantized checkpoint (GGUF, AWQ, GPTQ, FP8) takes less memory")  # fmt: skip
    return gib


# vLLM's engine arguments taken and ignored, by the command line and by LLM(...): each one's check
# of its value (a usage error there, a ValueError here), its metavar, and why it changes nothing
IGNORED_ENGINE_ARGS: dict[str, tuple[Callable[[str], Any], str, str]] = {
    "swap_space": (GIB, "GiB", "this engine preempts by recompute and never swaps a request's KV out to the CPU "
                               "(the store's host tier keeps finished turns' KV: --host-bytes)"),
    "max_seq_len_to_capture": (POSITIVE, "N", "this engine captures no CUDA graphs (it always runs eagerly)"),
    "guided_decoding_backend": (guided_decoding_backend, "NAME", GUIDED),
    "structured_outputs_config": (structured_outputs_config, "JSON", GUIDED),
    "data_parallel_size": (one_device, "N", f"1 only: {ONE_DEVICE} (run several servers instead)"),
    "distributed_executor_backend": (only(("mp", "uni", "ray", "external_launcher"), ONE_DEVICE), "NAME",
                                     f"any of vLLM's: {ONE_DEVICE}"),
    "optimization_level": (number(int, 0, "a level from 0 to 3", 3), "N", NOT_COMPILED),
    "max_cudagraph_capture_size": (POSITIVE, "N", "this engine captures no CUDA graphs"),
    "attention_backend": (text, "NAME", "this engine's own attention serves (its C kernels on a CPU, torch's on "
                                        "CUDA)"),
    "runner": (only(("auto", "generate"), "this engine generates text"), "NAME", "auto or generate: it generates"),
    "convert": (only(("auto", "none"), "this engine generates text (no pooling)"), "NAME", "auto or none"),
    "task": (only(("auto", "generate"), "this engine generates text"), "NAME", "auto or generate: it generates"),
    "limit_mm_per_prompt": (media_limits, "JSON", f"0 for each modality: {TEXT_ONLY}"),
    "config_format": (config_format, "auto|hf", "auto or hf: a model's Hugging Face config.json is read"),
    "cpu_offload_gb": (no_weight_offload, "GiB", "0 only: weights stay on the device"),
}  # fmt: skip
# vLLM's true-or-false engine flags this engine already behaves as, by the command line and LLM(...)
ACCEPTED_ENGINE_FLAGS = {
    "enable_expert_parallel": f"{ONE_DEVICE}: a mixture's experts run where the model runs",
    "disable_hybrid_kv_cache_manager": "one KV page layout serves every layer here",
    "disable_custom_all_reduce": f"{ONE_DEVICE}: nothing is all-reduced",
    "language_model_only": TEXT_ONLY,
}
# what this engine does not have: the command line's usage error says so (nargs: 0 for a switch)
REFUSED_ENGINE_FLAGS = {
    "--enable-sleep-mode": (0, "this server has no sleep mode (/sleep, /wake_up): it keeps its weights and KV"),
    "--cpu-offload-params": (None, "weights stay on the device here, none are offloaded to the CPU"),
    "--tool-parser-plugin": (None, "no plugins are loaded: --tool-call-parser names the formats this server reads"),
    "--reasoning-parser-plugin": (None, "no plugins are loaded: --reasoning-parser names the formats it reads"),
    "--logits-processors": ("+", "this engine loads no logits processors"),
    "--otlp-traces-endpoint": (None, "this server exports no traces (its metrics are at /metrics)"),
    "--headless": (0, "this engine runs its own front end in one process"),
    "--tool-server": (None, "this server calls no tools itself: a request's tools come back as tool_calls"),
    "--middleware": (None, "no ASGI middleware is loaded"),
    "--calculate-kv-scales": (0, "FP8 pages (--kv-cache-dtype fp8) have a scale of 1 here, as vLLM's default: "
                                 "no scales are computed"),
}


def add_ignored_engine_args(g: argparse._ArgumentGroup) -> None:
    """The flags above, and those taking several values (-O, graph capture sizes, --async-scheduling)."""
    for name, (check, metavar, why) in IGNORED_ENGINE_ARGS.items():
        flags = ["--" + name.replace("_", "-")] + (["-dp"] if name == "data_parallel_size" else [])
        g.add_argument(*flags, type=check, default=None, metavar=metavar, help=f"accepted: {why}")
    for name, why in ACCEPTED_ENGINE_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=None,
                       help=f"accepted: {why}")  # fmt: skip
    g.add_argument("-O", "-cc", "--compilation-config", type=compilation_config, default=None, metavar="LEVEL|JSON",
                   help=f"accepted: {NOT_COMPILED}")
    for flag in ("--cudagraph-capture-sizes", "--cuda-graph-sizes"):
        g.add_argument(flag, type=POSITIVE, nargs="+", default=None, metavar="N",
                       help="accepted: this engine captures no CUDA graphs")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help=f"accepted: {NOT_OVERLAPPED}")
    g.add_argument("--hf-token", nargs="?", const=True, default=None, metavar="TOKEN",
                   help="accepted: nothing is downloaded here (models are read from paths and the local cache)")
    for flag, (nargs, why) in REFUSED_ENGINE_FLAGS.items():
        g.add_argument(flag, action=Refuse, nargs=nargs, help=f"refused: {why}")


class Refuse(argparse.Action):
    """A flag that asks for what this engine cannot do: a usage error saying why (its help)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:  # fmt: skip
        parser.error(f"{option_string}: {self.help}")
