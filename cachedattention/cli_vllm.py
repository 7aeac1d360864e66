"""vLLM's `serve` flags, so that a `vllm serve MODEL ...` command line runs here: each does what it
does in vLLM, is accepted where this engine already behaves so, or is a usage error saying why."""

from __future__ import annotations

import argparse
import json
import os
import ssl

from cachedattention.cli_types import POSITIVE, integer, json_object, json_value, number, one_device, only
from cachedattention.cli_vllm_ignored import Refuse, add_ignored_engine_args
from cachedattention.config import CONTENT_FORMATS, KV_CACHE_DTYPES, MAX_LOGPROBS, SpeculativeConfig
from cachedattention.model.hf_overrides import check_hf_overrides
from cachedattention.model.messages import ChatOptions
from cachedattention.model.quant_config import VLLM_QUANTIZATION

# server/tool_calls.py's parsers, named here so that the command line starts without the server's imports
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "granite", "phi4_mini_json", "pythonic", "qwen3_coder", "openai",
                     "glm45", "seed_oss", "olmo3", "xlam", "qwen3_xml", "llama4_json", "glm47", "ernie45")  # (the last four: vLLM's other names)
REASONING_PARSERS = ("qwen3", "deepseek_r1", "seed_oss", "mistral", "openai_gptoss", "glm45", "glm47", "olmo3",
                     "granite", "ernie45")  # server/reasoning.py's
# vLLM's --dtype names (llm_args.VLLM_DTYPES, named here so that parsing needs no config imports)
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


def add_vllm_engine_args(p: argparse.ArgumentParser) -> None:
    """vLLM's engine flags, so that a `vllm serve MODEL ...` command line runs here: each does what
    it does in vLLM, or is accepted where this engine already behaves so, or is refused saying why."""
    g = p.add_argument_group("vLLM's engine flags")
    g.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                   help="the model, as the positional MODEL (vLLM takes either; both must then agree)")
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="another tokenizer than the model's: a Hugging Face folder, or a GGUF file (e.g. a GGUF "
                        "model's original folder, for its exact tokenizer and chat template)")
    g.add_argument("--revision", default=None, metavar="REV",
                   help="a model id's branch, tag or commit in the local Hugging Face cache (default: main); "
                        "nothing is downloaded")
    g.add_argument("--tokenizer-revision", default=None, metavar="REV", help="the same for --tokenizer's model id")
    g.add_argument("--download-dir", default=None, metavar="DIR",
                   help="the Hugging Face cache folder a model id is read from, instead of HF_HUB_CACHE's (as "
                        "vLLM's, which downloads there; nothing is downloaded here)")
    g.add_argument("--tokenizer-mode", type=tokenizer_mode, default="auto",
                   help="auto only: transformers' fast tokenizer of the model (or of --tokenizer)")
    g.add_argument("--load-format", type=load_format, default="auto",
                   help="auto, safetensors or gguf: the model's files say which (a folder of safetensors, a "
                        ".gguf file); one that does not match them is refused at start")
    g.add_argument("--gpu-memory-utilization", type=fraction, default=None, metavar="F",
                   help="on CUDA, the share in (0, 1] of the device's memory for weights, activations and the KV "
                        "pool: the pool gets F x total memory, less what this engine uses once its weights are "
                        "loaded and an estimate of the activations; F of the device must be free at start "
                        "(vLLM's default is 0.9; ours "
                        "without it: --kv-pool-bytes' default). --kv-pool-bytes wins; a CPU pool is sized by "
                        "--kv-pool-bytes only")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="keep finished requests' KV pages on the device for later prompts that share a prefix "
                        "(default: on); the store's sessions and stored prefixes serve whatever this says "
                        "(--no-store: none)")
    g.add_argument("--max-logprobs", type=logprobs_limit, default=MAX_LOGPROBS, metavar="N",
                   help=f"the most logprobs, top_logprobs or prompt_logprobs a request may ask for (-1: no limit; "
                        f"default {MAX_LOGPROBS}, as vLLM); above it a request is answered 400")
    for flag, short in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp")):
        g.add_argument(flag, short, type=one_device, default=1, metavar="N",
                       help="1 only: this engine runs one device")
    g.add_argument("--quantization", "-q", type=quantization_method, default=None, metavar="METHOD",
                   help="the checkpoint's own quantization (awq, gptq, their _marlin names, fp8, fbgemm_fp8, "
                        "compressed-tensors, gguf): read from the checkpoint without it; another, or one for an "
                        "unquantized checkpoint (vLLM's online quantization), is refused at start")
    g.add_argument("--enable-lora", action="store_true",
                   help="serve LoRA adapters (PEFT folders) beside the model: a request names one (the server's "
                        "`model` field, --lora-modules; LLM's lora_request); their KV is kept apart by adapter")
    g.add_argument("--max-loras", type=POSITIVE, default=1, metavar="N",
                   help="the most LoRA adapters running in one step (default 1, as vLLM); a request of another "
                        "waits")
    g.add_argument("--max-lora-rank", type=POSITIVE, default=16, metavar="R",
                   help="the highest rank of an adapter (default 16, as vLLM); a higher one is refused")
    g.add_argument("--max-cpu-loras", type=POSITIVE, default=None, metavar="N",
                   help="adapters kept loaded (default --max-loras); the least recently used is read again when "
                        "asked for")
    g.add_argument("--kv-cache-dtype", type=kv_cache_dtype, default="auto",
                   help="what the device pool's pages hold: auto (the model's dtype), bfloat16, or fp8 (fp8_e4m3; "
                        "or fp8_e5m2), a scale of 1 as vLLM's default: 2 or 4 times the tokens in the same memory, "
                        "attention reading them back in the model's dtype (on a CPU through torch, slower than "
                        "its float32 kernels). The store keeps the model's dtype (--storage-dtype sets it)")
    g.add_argument("--speculative-config", type=speculative_config, default=None, metavar="JSON",
                   help="vLLM's speculative decoding, its n-gram method: '{\"method\": \"ngram\", "
                        "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4}': an answer's next tokens "
                        "proposed from the conversation's earlier text and checked in one forward pass (guided "
                        "answers go a token a step)")
    g.add_argument("--hf-overrides", type=hf_overrides_json, default=None, metavar="JSON",
                   help="values laid over the model's config.json before it is read, as vLLM's (e.g. "
                        "'{\"max_position_embeddings\": 8192}'): a value replaces the config's (rope_scaling "
                        "whole), a sub-config (text_config...) takes its keys one by one")
    g.add_argument("--rope-scaling", type=rope_scaling, default=None, metavar="JSON",
                   help="vLLM's older flag: the model's rope_scaling replaced (as --hf-overrides "
                        "'{\"rope_scaling\": ...}'), e.g. '{\"rope_type\": \"yarn\", \"factor\": 4.0, "
                        "\"original_max_position_embeddings\": 32768}'")
    g.add_argument("--rope-theta", type=number(float, 0.0, "a number > 0", above=True), default=None, metavar="F",
                   help="vLLM's older flag: the model's RoPE base (as --hf-overrides '{\"rope_theta\": F}')")
    g.add_argument("--disable-sliding-window", action="store_true",
                   help="the window capped at the model's sliding window (where windowed attention is full "
                        "attention), as vLLM's; a model without one is served as it is")
    g.add_argument("--kv-offloading-size", type=OFFLOAD_GIB, default=None, metavar="GiB",
                   help="vLLM's KV offloading to CPU memory: the store's host tier holds this many GiB (as "
                        "--host-bytes): finished turns' KV kept there and read back for later turns and prompts "
                        "sharing their prefix")
    g.add_argument("--kv-offloading-backend", type=offloading_backend, default="native", metavar="NAME",
                   help="native or lmcache: either is this engine's store (its host tier, with --store-dir's "
                        "disk and --remote-url's shared tiers)")
    g.add_argument("--kv-transfer-config", action=Refuse, metavar="JSON",
                   help="refused: this engine runs no KV connectors; its store is its KV offloading "
                        "(--kv-offloading-size GiB or --host-bytes; --store-dir for a disk tier, --remote-url for "
                        "one shared by replicas)")
    _accept(g, ENGINE_AS_IS)
    g.add_argument("--no-enable-chunked-prefill", action=Refuse, nargs=0,
                   help="refused: this scheduler always chunks prefill; to compute a prompt in as few steps as "
                        "it can, raise --max-num-batched-tokens (with --long-prefill-token-threshold 0)")
    add_ignored_engine_args(g)
    g.add_argument("--logits-processor-pattern", action=Refuse, metavar="REGEX",
                   help="refused: this engine loads no logits processors (a request's logits_processors are "
                        "refused too)")


# flags that ask for what this engine always does: accepted, their help says so
ENGINE_AS_IS = {
    "--enforce-eager": "this engine always runs eagerly (it never captures CUDA graphs)",
    "--enable-chunked-prefill": "prefill is always chunked here (--max-num-batched-tokens per step)",
    "--trust-remote-code": "this engine never runs a model's own code; it serves the Llama-family architectures "
                           "it implements itself",
}  # fmt: skip
SERVER_AS_IS = {
    "--enable-auto-tool-choice": "tool_choice 'auto' is always on here (answers' calls become tool_calls)",
    "--disable-log-stats": "this server logs no periodic stats (they are at /metrics and /health)",
    "--enable-prompt-tokens-details": "usage always has prompt_tokens_details (cached tokens, and by tier here)",
    "--disable-frontend-multiprocessing": "this server is one process: the HTTP front end and the engine's "
                                          "thread share it",
}


def add_negations(p: argparse.ArgumentParser) -> None:
    """vLLM's --no-X for each switch --X that is off by default (its boolean flags all have one): the
    default again. Not for the switches accepted as what this engine always does, whose --no- would
    ask for what it does not (--no-enable-auto-tool-choice, --no-enable-chunked-prefill's refusal), nor
    --disable-log-requests (vLLM's --no- form logs them)."""
    always = {*ENGINE_AS_IS, *SERVER_AS_IS, "--disable-log-requests"} - {"--enforce-eager", "--trust-remote-code"}
    for action in list(p._actions):
        if not isinstance(action, argparse._StoreTrueAction) or action.default is not False:
            continue
        for flag in action.option_strings:
            negative = "--no-" + flag[2:]
            if flag.startswith("--") and flag not in always and negative not in p._option_string_actions:
                p.add_argument(negative, dest=action.dest, action="store_false", help=argparse.SUPPRESS)


def _accept(group: argparse._ArgumentGroup, flags: dict[str, str]) -> None:
    for flag, why in flags.items():
        group.add_argument(flag, action="store_true", help=f"accepted: {why}")


def add_vllm_server_args(p: argparse.ArgumentParser) -> None:
    """vLLM's server flags for `serve` (see add_vllm_engine_args)."""
    g = p.add_argument_group("vLLM's server flags")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="a YAML file of flag values, as vLLM's: each key a flag's name without its dashes "
                        "(`port: 8000`, `enable-prefix-caching: false`); flags on the command line win")
    g.add_argument("--api-server-count", "-asc", type=one_server, default=1, metavar="N",
                   help="1 only: this server is one process")
    g.add_argument("--chat-template-content-format", type=content_format, default="auto",
                   metavar="auto|string|openai",
                   help="how a message's content reaches the chat template: one string (its text parts joined "
                        "a line each), OpenAI's list of text parts, or auto (the list for a template that loops "
                        "over a message's content, else the string), as vLLM's")
    g.add_argument("--enable-request-id-headers", action="store_true",
                   help="every answer carries an X-Request-Id header: the request's own, else a new id")
    g.add_argument("--default-chat-template-kwargs", type=template_kwargs, default=None, metavar="JSON",
                   help="chat template variables every chat gets unless its own chat_template_kwargs set them, "
                        "a JSON object (e.g. '{\"enable_thinking\": false}'), as vLLM's")
    g.add_argument("--seed", dest="engine_seed", type=seed_value, default=None, metavar="N",
                   help="seed of the sampling of requests without their own seed, so that a restarted server "
                        "answers them alike (default: none, a new random state each start; vLLM's V1 engine "
                        "defaults to 0)")
    g.add_argument("--lora-modules", type=lora_module, nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters a request names by its `model` field (with --enable-lora): NAME=PATH, or "
                        "vLLM's JSON '{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'; each is read at "
                        "start")
    _accept(g, SERVER_AS_IS)
    g.add_argument("--tool-call-parser", type=tool_call_parser, default=None, metavar="NAME",
                   help=f"how the model writes tool calls: {', '.join(TOOL_CALL_PARSERS)} (default hermes: Qwen2.5, "
                        "Hermes; llama3_json: Llama 3.1 to 3.3; mistral: Mistral 7B v0.3, Nemo, Small; granite: "
                        "Granite 3; phi4_mini_json: Phi-4-mini; pythonic: Llama 3.2 and 4; qwen3_coder (or qwen3_xml): "
                        "Qwen3-Coder; glm45 (or glm47): GLM-4.5 to 4.7; seed_oss: Seed-OSS; ernie45: ERNIE 4.5 (Hermes' blocks); olmo3: OLMo 3's Python calls a line each in <function_calls>; xlam: xLAM's JSON array of calls; "
                        "openai: gpt-oss's harmony, with --reasoning-parser openai_gptoss); "
                        "also the form a required or named tool_choice makes the answer take (openai has none: "
                        "such a request is refused)")
    g.add_argument("--reasoning-parser", type=reasoning_parser_name, default=None, metavar="NAME",
                   help=f"how the model writes its reasoning: {', '.join(REASONING_PARSERS)} (<think>...</think>; "
                        "qwen3: Qwen3, QwQ; deepseek_r1: DeepSeek-R1 and its distills, which start without the tag; "
                        "seed_oss: Seed-OSS's <seed:think>...</seed:think>, also without a tag at first; mistral: "
                        "Magistral's [THINK]...[/THINK]; openai_gptoss: "
                        "gpt-oss's harmony analysis channel; glm45, glm47: GLM-4.5 to 4.7; olmo3: OLMo 3; granite: "
                        "Granite 3.2's 'Here is my thought process:' ... 'Here is my response:'; ernie45: ERNIE 4.5 Thinking, "
                        "which starts without the tag, its answer's <response> tags dropped); "
                        "chat answers return it as `reasoning` (and `reasoning_content`) apart from `content`")
    logs = g.add_mutually_exclusive_group()
    logs.add_argument("--enable-log-requests", action="store_true",
                      help="log one INFO line per request received: its id, session, prompt size, max_tokens, "
                           "whether streamed (never the prompt's text)")
    logs.add_argument("--disable-log-requests", action="store_true",
                      help="accepted (deprecated in vLLM): requests are not logged unless --enable-log-requests")
    g.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                   help="a chat whose tool_choice is \"none\" is rendered without its tools (by default the "
                        "template still describes them, and the answer is read as text)")
    g.add_argument("--uds", default=None, metavar="PATH",
                   help="listen on this Unix domain socket instead of --host and --port (as vLLM's)")
    g.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="logprobs name each token as 'token_id:N' (tokens that are not valid text stay "
                        "identifiable); also a request field")
    g.add_argument("--uvicorn-log-level", default=None, choices=UVICORN_LOG_LEVELS,
                   help="uvicorn's log level (default: info)")
    g.add_argument("--response-role", type=response_role, default="assistant", metavar="ROLE",
                   help="assistant only: a chat answer after the generation prompt is the assistant's here "
                        "(without one, the last message's role, as vLLM's)")
    g.add_argument("--enable-force-include-usage", action="store_true",
                   help="every streamed answer ends with its usage, whether or not the request's stream_options "
                        "asks for it (answers not streamed always carry it)")
    g.add_argument("--enable-log-outputs", action="store_true",
                   help="log one INFO line per request finished: its id, token count, finish reason and text "
                        "(--max-log-len characters of it)")
    g.add_argument("--max-log-len", type=number(int, 0, "an integer >= 0"), default=None, metavar="N",
                   help="the most characters of an answer --enable-log-outputs logs (requests received are "
                        "logged without their prompt)")
    g.add_argument("--ssl-keyfile", default=None, metavar="FILE", help="serve HTTPS with this private key (PEM)")
    g.add_argument("--ssl-certfile", default=None, metavar="FILE", help="and this certificate (PEM)")
    g.add_argument("--ssl-ca-certs", default=None, metavar="FILE",
                   help="the CA certificates that client certificates are checked against")
    g.add_argument("--ssl-cert-reqs", type=int, default=0, choices=(0, 1, 2), metavar="N",
                   help="client certificates: 0 not asked for (default), 1 optional, 2 required (Python's "
                        "ssl.CERT_*), as uvicorn's")
    g.add_argument("--root-path", type=root_path, default="", metavar="PATH",
                   help="the path prefix a proxy serves this server under (FastAPI's root_path), as vLLM's")
    g.add_argument("--disable-uvicorn-access-log", action="store_true", help="no access log line per request")
    g.add_argument("--disable-access-log-for-endpoints", type=endpoint_paths, default=(), metavar="PATHS",
                   help="no access log line for these paths, comma-separated (e.g. /health,/metrics), as vLLM's")
    g.add_argument("--log-config-file", type=log_config_file, default=None, metavar="FILE",
                   help="a JSON logging configuration (Python's dictConfig schema) for this server's loggers "
                        "and uvicorn's, applied before the model loads, as vLLM's")
    g.add_argument("--disable-fastapi-docs", action="store_true",
                   help="no /openapi.json schema either (/docs and /redoc are never served here)")


UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def fraction(text: str) -> float:
    """--gpu-memory-utilization: a share of the device's memory, in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number in (0, 1] was expected, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a fraction of the device's memory in (0, 1] was expected (e.g. 0.9), got {text}")
    return value


OFFLOAD_GIB = number(float, 0.0, "a number of GiB > 0", above=True)


def offloading_host_bytes(size_gib: float, host_bytes: int | None) -> int:
    """vLLM's kv_offloading_size (GiB) as the store's host tier budget in bytes; a host_bytes given
    beside it must say the same."""
    wanted = int(size_gib * (1 << 30))
    if wanted < 1:
        raise ValueError(f"kv_offloading_size ({size_gib:g} GiB) is less than a byte")
    if host_bytes is not None and host_bytes != wanted:
        raise ValueError(f"kv_offloading_size ({size_gib:g} GiB, {wanted} bytes) and host_bytes ({host_bytes}) both "
                         "set the store's host tier: give one")  # fmt: skip
    return wanted


def one_server(text: str) -> int:
    """--api-server-count: 1, the one process this server runs in."""
    value = integer(text)
    if value != 1:
        raise argparse.ArgumentTypeError(f"this server is one process: only 1 is accepted, got {value} (run "
                                         "several servers instead, sharing sessions with --remote-url)")  # fmt: skip
    return value


def logprobs_limit(text: str) -> int:
    value = integer(text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"an integer >= 0, or -1 for no limit, was expected, got {value}")
    return value


def lora_module(text: str) -> tuple[str, str]:
    """vLLM's --lora-modules entry: NAME=PATH, or a JSON object with "name" and "path" (and an
    informative "base_model_name"); (name, path)."""
    if text.lstrip().startswith("{"):
        try:
            entry = json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a JSON object: {text!r:.80}") from None
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and entry[k] for k in ("name", "path")):
            raise argparse.ArgumentTypeError(f'a JSON entry needs "name" and "path" strings, got {text!r:.80}')
        if set(entry) - {"name", "path", "base_model_name"}:
            raise argparse.ArgumentTypeError(f"unknown keys {sorted(set(entry) - {'name', 'path', 'base_model_name'})}")
        return entry["name"], entry["path"]
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"NAME=PATH (or a JSON object) was expected, got {text!r:.80}")
    return name.strip(), path.strip()


def seed_value(text: str) -> int:
    value = integer(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"an integer in [0, 2**64) was expected, got {value}")
    return value


kv_cache_dtype = only(KV_CACHE_DTYPES, "the pages hold the model's dtype, bfloat16 or FP8 (fp8_inc is Intel "
                                       "Gaudi's, fp8_ds_mla DeepSeek MLA's layout)")
quantization_method = only(("None", *VLLM_QUANTIZATION), "the checkpoints this engine reads (it quantizes none at load)")
offloading_backend = only(("native", "lmcache"), "either is this engine's store")
tokenizer_mode = only(("auto", "hf"), "the model's own (fast) tokenizer serves; --tokenizer names another one")
load_format = only(("auto", "safetensors", "gguf"), "weights load from safetensors folders or GGUF files")
tool_call_parser = only(TOOL_CALL_PARSERS, "this server reads the tool call formats it knows")
reasoning_parser_name = only(REASONING_PARSERS, "this server reads the reasoning formats it knows")
dtype_name = only(DTYPES, "vLLM's dtypes (half is float16, float is float32)")
content_format = only(CONTENT_FORMATS, "vLLM's content formats")
response_role = only(("assistant",), "a chat answer after the generation prompt is the assistant's here")


def speculative_config(text: str) -> SpeculativeConfig:
    """--speculative-config: vLLM's JSON object, its n-gram method ('{"method": "ngram",
    "num_speculative_tokens": 4, "prompt_lookup_max": 4}')."""
    value = json_value(text)
    try:
        return SpeculativeConfig.of(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def rope_scaling(text: str) -> dict:
    """--rope-scaling: a JSON object, the model's rope_scaling."""
    return json_object(text, example='{"rope_type": "yarn", "factor": 4.0}')


def hf_overrides_json(text: str) -> dict:
    """--hf-overrides: a JSON object of config.json's names."""
    value = json_value(text)
    try:
        return check_hf_overrides(value) or {}
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def template_kwargs(text: str) -> dict:
    """--default-chat-template-kwargs: a JSON object of chat template variables, named as a
    request's chat_template_kwargs may name them."""
    value = json_object(text, "a JSON object of template variables", '{"enable_thinking": false}')
    try:
        ChatOptions(template_kwargs=value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def endpoint_paths(text: str) -> tuple[str, ...]:
    """Comma-separated paths, each starting with '/'."""
    paths = tuple(p.strip() for p in text.split(",") if p.strip())
    if not paths or any(not p.startswith("/") for p in paths):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated paths each starting with '/' were expected "
                                         "(e.g. /health,/metrics)")  # fmt: skip
    return paths


def log_config_file(path: str) -> dict:
    """A logging configuration file: a JSON object (Python's dictConfig schema), read now."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{path!r} cannot be read: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"{path!r} is not JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("version"), int):
        raise argparse.ArgumentTypeError(f"{path!r} must hold a JSON object in Python's logging dictConfig schema, "
                                         "with its \"version\": 1")  # fmt: skip
    return config


def root_path(text: str) -> str:
    if text and (not text.startswith("/") or text.endswith("/")):
        raise argparse.ArgumentTypeError(f"{text!r} must start with '/' and not end with one (e.g. /llm)")
    return text


def uvicorn_options(args: argparse.Namespace) -> dict:
    """uvicorn's keyword arguments for vLLM's listening flags (TLS, access log), the TLS files loaded
    before any model is."""
    files = {name: getattr(args, name, None) for name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs")}
    for name, path in files.items():
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"--{name.replace('_', '-')} {path!r} is not a file")
    key, cert, reqs = files["ssl_keyfile"], files["ssl_certfile"], getattr(args, "ssl_cert_reqs", 0)
    if key is not None and cert is None:  # a certificate file may hold its key too: alone, it serves
        raise ValueError("--ssl-keyfile needs --ssl-certfile: HTTPS needs the certificate")
    if cert is None and (reqs or files["ssl_ca_certs"] is not None):
        raise ValueError("client certificates (--ssl-cert-reqs, --ssl-ca-certs) are checked over HTTPS only: "
                         "give --ssl-certfile")  # fmt: skip
    if reqs and files["ssl_ca_certs"] is None:
        raise ValueError("--ssl-cert-reqs checks client certificates: give --ssl-ca-certs to check them against")
    if cert is not None:  # a wrong or mismatched file: said now, not as a traceback once the model is loaded
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"--ssl-certfile {cert!r} (with --ssl-keyfile {key!r}) cannot be used: {e}") from None
        if files["ssl_ca_certs"] is not None:
            try:
                context.load_verify_locations(files["ssl_ca_certs"])
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"--ssl-ca-certs {files['ssl_ca_certs']!r} cannot be used: {e}") from None
    uds = {"uds": args.uds} if getattr(args, "uds", None) is not None else {}
    if uds and not os.path.isdir(os.path.dirname(os.path.abspath(args.uds))):  # (said now, not once the model loaded)
        raise ValueError(f"--uds {args.uds!r}: its folder does not exist")
    logs = {"log_config": args.log_config_file} if getattr(args, "log_config_file", None) is not None else {}
    return {**files, "ssl_cert_reqs": reqs, "access_log": not getattr(args, "disable_uvicorn_access_log", False),
            **uds, **logs}


def model_arg(args: argparse.Namespace) -> str | None:
    """The model, given as the positional MODEL or as vLLM's --model (both: they must agree)."""
    named = getattr(args, "model_option", None)
    if named is not None and args.model is not None and named != args.model:
        raise ValueError(f"two models given: {args.model!r} and --model {named!r}; give one")
    model = args.model if args.model is not None else named
    check_load_format(getattr(args, "load_format", "auto"), model, "--load-format")
    return model


def check_load_format(fmt: str | None, model: str | None, name: str = "load_format") -> None:
    """vLLM's load format, when given, must be the model's: a .gguf file's gguf, a folder's safetensors."""
    if model is not None and fmt not in (None, "auto") and (fmt == "gguf") != str(model).endswith(".gguf"):
        raise ValueError(f"{name} {fmt} does not match the model {str(model)!r} (a .gguf file is gguf, a folder "
                         "safetensors)")
