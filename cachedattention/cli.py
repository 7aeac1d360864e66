"""`cachedattention serve | chat | generate | demo | router | bench`: the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from cachedattention.cli_config import ConfigFileParser
from cachedattention.cli_types import (
    PORT,
    POSITIVE,
    RATE,
    SECONDS,
    context_length,
    human_int,
    json_object,
    name,
    text,
)
from cachedattention.cli_vllm import DTYPES as DTYPE_CHOICES
from cachedattention.cli_vllm import (
    add_negations,
    add_vllm_engine_args,
    add_vllm_server_args,
    dtype_name,
    model_arg,
    offloading_host_bytes,
)
from cachedattention.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig, StoreConfig
from cachedattention.router.replicas import DEFAULT_LOAD_FACTOR


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="a Hugging Face folder, a .gguf file, or a model id (ORG/NAME) in the local Hugging Face "
                        "cache (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", type=dtype_name, default="float32", metavar="|".join(DTYPE_CHOICES),
                   help="float32 (the default), bfloat16 or float16 (half), or vLLM's auto: float32 on a CPU; on "
                        "CUDA the checkpoint's 16-bit dtype, float16 for a float32 one")
    p.add_argument("--max-model-len", type=context_length, default=None, metavar="N",
                   help="the window in tokens, as vLLM's: 32768, 32k (x1000), 32K (x1024), or auto / -1 for the "
                        "model's window lowered to what the KV pool holds (default: the model's window)")
    p.add_argument("--generation-config", default="auto", metavar="auto|vllm|FOLDER",
                   help="sampling defaults where a request sets none: the model's generation_config.json (auto), "
                        "none (vllm), or a folder's (as vLLM's)")
    p.add_argument("--override-generation-config", type=generation_overrides, default=None, metavar="JSON",
                   help="sampling defaults laid over the generation config's, in its names, e.g. "
                        "'{\"temperature\": 0.5}' (as vLLM's)")
    p.add_argument("--chat-template", default=None, metavar="TEMPLATE",
                   help="a Jinja chat template, or a file holding one, instead of the tokenizer's (as vLLM's)")
    p.add_argument("--page-size", "--block-size", type=int, default=16, help="tokens per KV page (vLLM's --block-size)")
    p.add_argument("--kv-cache-memory-bytes", type=human_int, default=None, metavar="BYTES",
                   help="vLLM's name for --kv-pool-bytes (both given: they must agree)")
    p.add_argument("--kv-pool-bytes", type=human_int, default=None,
                   help="device KV pool budget; wins over --gpu-memory-utilization (default: on CUDA half the free "
                        "memory, on a CPU 1 GiB, no more than --max-num-seqs full windows take)")
    p.add_argument("--max-num-batched-tokens", type=human_int, default=512,
                   help="tokens computed per step (default 512; vLLM's 8k, 8K forms)")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="the waiting queue's order: arrival (fcfs), or each request's `priority` (lower first, "
                        "then arrival; the running request of the lowest priority is the one preempted), as vLLM's")
    p.add_argument("--long-prefill-token-threshold", type=int, default=SchedulerConfig.long_prefill_token_threshold,
                   help="most prompt tokens one request computes per step, so short prompts are not held "
                        "behind a long one (0: up to the whole step's budget)")
    add_vllm_engine_args(p)
    g = p.add_argument_group("AttentionStore")
    g.add_argument("--no-store", action="store_true", help="plain engine: recompute every turn's history")
    g.add_argument("--store-dir", default=None, help="disk tier folder (default: no disk tier)")
    g.add_argument("--host-bytes", type=int, default=None,
                   help=f"the host tier's budget (default {StoreConfig.host_bytes}; vLLM's --kv-offloading-size "
                        "sets it in GiB)")
    g.add_argument("--disk-bytes", type=int, default=StoreConfig.disk_bytes)
    g.add_argument("--storage-dtype", default=None, choices=["float32", "bfloat16", "float16"])
    g.add_argument("--policy", default="lookahead", choices=["lookahead", "lru", "fifo"])
    g.add_argument("--no-layerwise", action="store_true", help="load the whole history before the forward")
    g.add_argument("--write-back", action="store_true", help="write host segments to disk only on eviction or shutdown")
    g.add_argument("--no-preload", action="store_true", help="do not load the queue head's KV before it is admitted")
    g.add_argument("--prefetch-window", type=int, default=None,
                   help="queued sessions fetched disk -> host ahead of their turn (default: from the host budget)")
    g.add_argument("--host-free-threshold", type=float, default=StoreConfig.host_free_threshold,
                   help="demote host -> disk ahead of need when free host falls below this share")
    g.add_argument("--disk-ttl-s", type=float, default=None,
                   help="forget sessions whose KV has not been used for this many seconds (default: keep)")
    g.add_argument("--truncation", default="reuse", choices=["reuse", "recompute", "off"])
    g.add_argument("--session-branches", type=int, default=StoreConfig.session_branches,
                   help="earlier branches kept per session (a turn that edits, regenerates or forks the "
                        "conversation keeps the one it left, so that going back reuses its KV); 0: none")
    g.add_argument("--windowed-history", default=StoreConfig.windowed_history, choices=["disk", "drop", "keep"],
                   help="sliding-window models: history no later turn's window reaches keeps only the layers "
                        "without a window in host memory, once its file holds them all (disk: a turn resuming "
                        "further back reads them there), or also without a disk tier (drop: such a turn resumes "
                        "before it); keep: every layer stays")
    g.add_argument("--remote-url", default=None, metavar="URL",
                   help="remote tier shared by replicas: a Redis-protocol server (redis://HOST:PORT/DB, rediss://..., "
                        "unix:///PATH.sock); each turn is published there, and a session another replica served is "
                        "fetched from there (needs `pip install redis`)")
    g.add_argument("--remote-wait-s", type=float, default=StoreConfig.remote_wait_s,
                   help="longest wait at admission for a turn's KV still coming from the remote tier (then recompute)")
    g.add_argument("--remote-timeout-s", type=float, default=StoreConfig.remote_timeout_s,
                   help="a call to the remote tier gives up after this long")
    g.add_argument("--remote-namespace", default=StoreConfig.remote_namespace,
                   help="prefix of the remote tier's keys: deployments sharing one server keep apart")
    g.add_argument("--remote-ttl-s", type=float, default=None,
                   help="the remote server forgets values not written again for this long (default: its own eviction)")


def lora_flags(args: argparse.Namespace) -> LoRAConfig:
    """--enable-lora and its limits; --lora-modules without it is refused."""
    enable = getattr(args, "enable_lora", False)
    if getattr(args, "lora_modules", None) and not enable:
        raise ValueError("--lora-modules needs --enable-lora")
    return LoRAConfig(enable=enable, max_loras=getattr(args, "max_loras", 1),
                      max_lora_rank=getattr(args, "max_lora_rank", 16),
                      max_cpu_loras=getattr(args, "max_cpu_loras", None))  # fmt: skip


def host_bytes(args: argparse.Namespace) -> int:
    """--host-bytes, or vLLM's --kv-offloading-size in GiB (both: they must agree)."""
    size = getattr(args, "kv_offloading_size", None)
    if size is None:
        return args.host_bytes if args.host_bytes is not None else StoreConfig.host_bytes
    if args.no_store:
        raise ValueError("--kv-offloading-size keeps KV in the store's host tier, which --no-store switches off")
    return offloading_host_bytes(size, args.host_bytes)


def pool_bytes(args: argparse.Namespace) -> int | None:
    """--kv-pool-bytes, or vLLM's --kv-cache-memory-bytes (both: they must agree)."""
    ours, theirs = args.kv_pool_bytes, getattr(args, "kv_cache_memory_bytes", None)
    if ours is not None and theirs is not None and ours != theirs:
        raise ValueError(f"--kv-pool-bytes ({ours}) and --kv-cache-memory-bytes ({theirs}) both size the KV pool: "
                         "give one")  # fmt: skip
    return ours if ours is not None else theirs


def rope_overrides(args: argparse.Namespace) -> dict | None:
    """--hf-overrides with vLLM's older --rope-scaling and --rope-theta laid over it, as vLLM lays them."""
    overrides = dict(getattr(args, "hf_overrides", None) or {})
    if getattr(args, "rope_scaling", None) is not None:
        overrides["rope_scaling"] = args.rope_scaling
    if getattr(args, "rope_theta", None) is not None:
        overrides["rope_theta"] = args.rope_theta
    return overrides or None


def engine_config(args: argparse.Namespace) -> EngineConfig:
    from cachedattention.llm_args import local_model_args

    given = model_arg(args)
    model, tokenizer, dtype = local_model_args(
        given, getattr(args, "tokenizer", None), args.dtype, args.device, revision=getattr(args, "revision", None),
        tokenizer_revision=getattr(args, "tokenizer_revision", None), download_dir=getattr(args, "download_dir", None),
        hf_overrides=rope_overrides(args),
    )
    return EngineConfig(
        model=model,
        model_given=given,
        tokenizer=tokenizer,
        device=args.device,
        dtype=dtype,
        max_model_len=args.max_model_len,
        seed=getattr(args, "engine_seed", None),  # serve's --seed (generate's and chat's is a request's)
        max_logprobs=args.max_logprobs,
        cache=CacheConfig(page_size=args.page_size, memory_bytes=pool_bytes(args),
                          enable_prefix_cache=args.enable_prefix_caching,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto")),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                                  long_prefill_token_threshold=args.long_prefill_token_threshold,
                                  policy=args.scheduling_policy),
        chat_template=getattr(args, "chat_template", None),
        chat_template_content_format=getattr(args, "chat_template_content_format", "auto"),
        generation_config=getattr(args, "generation_config", "auto"),
        override_generation_config=getattr(args, "override_generation_config", None),
        hf_overrides=rope_overrides(args),
        disable_sliding_window=getattr(args, "disable_sliding_window", False),
        reasoning_parser=getattr(args, "reasoning_parser", None),
        lora=lora_flags(args),
        speculative=getattr(args, "speculative_config", None),
        store=StoreConfig(
            enable=not args.no_store,
            store_dir=args.store_dir,
            host_bytes=host_bytes(args),
            disk_bytes=args.disk_bytes,
            storage_dtype=args.storage_dtype,
            policy=args.policy,
            layerwise=not args.no_layerwise,
            preload=not args.no_preload,
            prefetch_window=args.prefetch_window,
            host_free_threshold=args.host_free_threshold,
            disk_ttl_s=args.disk_ttl_s,
            write_through=not args.write_back,
            truncation=args.truncation,
            session_branches=args.session_branches,
            windowed_history=args.windowed_history,
            remote_url=args.remote_url,
            remote_wait_s=args.remote_wait_s,
            remote_timeout_s=args.remote_timeout_s,
            remote_ttl_s=args.remote_ttl_s,
            remote_namespace=args.remote_namespace,
        ),
    )


SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")  # fmt: skip


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """The sampling flags of `generate` and `chat`. One not given takes the model's generation config's
    value (or --override-generation-config's), else SamplingParams', but greedy and `max_tokens`."""
    p.set_defaults(cli_max_tokens=max_tokens)
    p.add_argument("--max-tokens", type=int, default=None, help=f"default: the generation config's, else {max_tokens}")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 is greedy; default: the generation config's, else 0")  # fmt: skip
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None, help="0: off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None, help="as vLLM's: > 1 discourages repeats")
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--frequency-penalty", type=float, default=None)


def sampling_flags_given(args: argparse.Namespace) -> dict[str, object]:
    return {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name, None) is not None}


def check_sampling_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The sampling flags given, checked as SamplingParams checks them: a usage error before any model
    loads (a negative --max-tokens, --top-p 2, a temperature of nan)."""
    from cachedattention.sampling import SamplingParams

    try:
        SamplingParams(**sampling_flags_given(args))
    except ValueError as e:
        parser.error(str(e))


def build_parser() -> argparse.ArgumentParser:
    parser = ConfigFileParser(prog="cachedattention", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt")
    add_engine_args(gen)
    gen.add_argument("--prompt", type=text, required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message")
    add_sampling_args(gen, max_tokens=64)

    chat = sub.add_parser("chat", help="interactive multi-turn chat in the terminal")
    add_engine_args(chat)
    add_sampling_args(chat, max_tokens=128)
    chat.add_argument("--system", type=text, default=None)
    chat.add_argument("--session-id", type=name, default="terminal")

    demo = sub.add_parser("demo", help="scripted multi-turn chat on the embedded model, with per-turn reuse")
    add_engine_args(demo)
    demo.add_argument("--max-tokens", type=POSITIVE, default=48)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(serve)
    add_vllm_server_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=PORT, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="the names requests may give (as vLLM's: answers carry the first)")
    serve.add_argument("--max-body-bytes", type=POSITIVE, default=1 << 20)
    serve.add_argument("--body-timeout-s", type=RATE, default=30.0,
                       help="answer 408 when no part of a request body arrives for this long")
    serve.add_argument("--api-key", action="append", default=None, metavar="KEY",
                       help="the /v1 routes answer 401 unless sent 'Authorization: Bearer KEY' (repeat for more keys; "
                            "as vLLM's --api-key; default: $CACHEDATTENTION_API_KEY or $VLLM_API_KEY, if set)")
    serve.add_argument("--allowed-origins", type=json_list, default=["*"], metavar="ORIGINS",
                       help="origins whose pages may call the server (CORS): a JSON list as vLLM takes it, or "
                            "comma-separated; '[]' for none (default: any origin, as vLLM)")
    serve.add_argument("--allowed-methods", type=json_list, default=["*"], metavar="METHODS",
                       help="HTTP methods browsers may use (CORS): a JSON list as vLLM takes it, or comma-separated")
    serve.add_argument("--allowed-headers", type=json_list, default=["*"], metavar="HEADERS",
                       help="request headers browsers may send (CORS): a JSON list or comma-separated")
    serve.add_argument("--allow-credentials", action="store_true",
                       help="let browsers send cookies and credentials (CORS), as vLLM's")
    serve.add_argument("--trust-request-chat-template", action="store_true",
                       help="render a request's own chat_template (in transformers' sandbox), as vLLM's; "
                            "refused by default")
    serve.add_argument("--shutdown-grace-s", type=SECONDS, default=30.0,
                       help="on SIGTERM, wait this long for in-flight requests (0: abort them at once)")
    serve.add_argument("--responses-store-bytes", type=int, default=256 << 20, metavar="N",
                       help="memory for /v1/responses' stored responses (previous_response_id, GET), least recently "
                            "used dropped first; 0 keeps none")

    for p in (gen, chat, demo, serve):
        add_negations(p)

    router = sub.add_parser("router", help="one address in front of several servers, each conversation kept on one")
    router.add_argument("--replica", action="append", required=True, metavar="URL",
                        help="a server's base URL, e.g. http://10.0.0.5:8000 (repeat for each replica)")
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--port", type=PORT, default=8000)
    router.add_argument("--load-factor", type=float, default=DEFAULT_LOAD_FACTOR,
                        help="a replica takes at most this times the average requests in flight before a "
                             "conversation of its moves on (0: never moves while the replica is up)")
    router.add_argument("--health-interval-s", type=RATE, default=5.0, help="how often each replica's /health is asked")
    router.add_argument("--health-timeout-s", type=RATE, default=5.0,
                        help="a /health slower than this is a failed probe (a refused connection fails at once)")
    router.add_argument("--health-failures", type=POSITIVE, default=3,
                        help="timed-out health probes in a row that mark a replica down")
    router.add_argument("--max-body-bytes", type=POSITIVE, default=64 << 20,
                        help="a larger request body is answered 413 (the replicas' own limit may be smaller)")

    bench = sub.add_parser("bench", help="benchmarks: throughput | turn | policy | workload")
    from cachedattention.bench.cli import add_bench_args

    add_bench_args(bench)
    return parser


def json_list(text: str) -> list[str]:
    """--allowed-origins, --allowed-methods, --allowed-headers: a JSON list (vLLM's form) or comma-separated."""
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise argparse.ArgumentTypeError("a JSON list of non-empty strings was expected")
        return value
    return [o.strip() for o in text.split(",") if o.strip()]



def generation_overrides(text: str) -> dict:
    """--override-generation-config: a JSON object."""
    return json_object(text, example='{"temperature": 0.5}')


def _check_model_paths(args: argparse.Namespace) -> None:
    """A model or tokenizer given that is neither a path nor a model id in the local cache is named
    at once, as the loader would name it; so is a --quantization that is not the model's own."""
    from cachedattention.model.hub_cache import existing_local_path
    from cachedattention.model.quant_config import check_quantization

    cache_dir = getattr(args, "download_dir", None)
    found = {}
    for what, source, revision in (("model", model_arg(args), getattr(args, "revision", None)),
                                   ("tokenizer", getattr(args, "tokenizer", None),
                                    getattr(args, "tokenizer_revision", None))):  # fmt: skip
        if source is not None:
            found[what] = existing_local_path(source, what, revision, cache_dir)
    check_quantization(getattr(args, "quantization", None), found.get("model"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("generate", "chat", "serve"):
            _check_model_paths(args)  # (before torch and the engine load: seconds)
        if args.command in ("generate", "chat"):
            check_sampling_flags(parser, args)
        if args.command in ("generate", "chat", "demo"):
            from cachedattention import terminal

            return getattr(terminal, f"run_{args.command}")(args)
        if args.command == "serve":
            from cachedattention.server.app import serve

            return serve(args)
        if args.command == "router":
            from cachedattention.router.app import run_router

            return run_router(args)
        from cachedattention.bench.cli import run_bench

        return run_bench(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # (a store index the disk or SQLite cannot read, a folder that cannot be made...)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while a model loads (or an answer's second one): no traceback
        print("interrupted", file=sys.stderr)
        return 130  # the shell's code for a command ended by SIGINT


if __name__ == "__main__":
    sys.exit(main())
