"""`cachedattention bench --mode workload`: one multi-turn workload replayed on every serving system.

Builds (or loads) the workload, saves it into `--out` so the run can be repeated with
`--workload`, replays it on each system (in process, sharing one loaded model, or against a
server with `--url`), then prints the Markdown table and the cost formula and writes the JSON
and the plots.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from cachedattention.bench.cost import COST_FORMULA
from cachedattention.bench.metrics import SystemSummary, summarize
from cachedattention.bench.replay import ReplayResult, replay, template_overhead
from cachedattention.bench.report import markdown_table, write_json, write_plots
from cachedattention.bench.systems import (
    PAGE_SIZE,
    Budgets,
    SystemSpec,
    build_systems,
    parse_system_names,
    session_tokens,
)
from cachedattention.bench.workload import Workload, WorkloadSpec, generate_workload, load_sharegpt
from cachedattention.config import EngineConfig, SchedulerConfig
from cachedattention.kvcache.kv_pool import KVPool
from cachedattention.model.loader import LoadedModel, load_model, resolve_dtype

DEFAULT_SESSIONS = 30
QUICK_SESSIONS = 8
WORKLOAD_FILE = "workload.json"


def run_workload_bench(args: argparse.Namespace) -> int:
    time_scale = 1.0 if args.time_scale is None else args.time_scale
    if not time_scale > 0:
        raise ValueError(f"--time-scale must be > 0, got {time_scale}")
    if args.sessions is not None and args.sessions < 1:
        raise ValueError(f"--sessions must be >= 1, got {args.sessions}")
    names = parse_system_names(args.systems)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.url:
        workload = build_workload(args, tokenizer=None)
        _save_workload(workload, out_dir)
        results, config = _run_http(args, workload, time_scale)
    else:
        loaded = _load_model(args)
        workload = build_workload(args, tokenizer=loaded.tokenizer)
        _save_workload(workload, out_dir)
        results, config = _run_local(args, loaded, workload, names, time_scale)
    summaries = _summaries(results, config["systems"])
    baseline = "RE" if "RE" in summaries else next(iter(summaries))
    print(markdown_table(summaries, baseline=baseline))
    print(COST_FORMULA)
    waits = [f"{n} {s.queue_later_mean_s:.3f} s of {s.ttft_later_mean_s:.3f} s" for n, s in summaries.items()
             if s.queue_later_mean_s is not None and s.ttft_later_mean_s is not None]
    if waits:  # where the TTFT of later turns goes: waiting to be admitted, or the steps after that
        print("TTFT turns>=2 spent waiting to be admitted (mean): " + "; ".join(waits))
    extra = {
        "workload": workload_stats(workload, out_dir / WORKLOAD_FILE),
        "config": config,
        "records": {r.system: [asdict(rec) for rec in r.records] for r in results},
    }
    if args.json:
        print(f"wrote {write_json(args.json, summaries, extra)}", file=sys.stderr)
    try:
        plots = write_plots(out_dir, summaries)
    except ImportError as e:  # a machine running from source without matplotlib: the table and JSON stand
        print(f"no plots ({e}); the table and JSON above are complete", file=sys.stderr)
        return 0
    for path in plots:
        print(f"wrote {path}", file=sys.stderr)
    return 0


# -- the workload -------------------------------------------------------------------------------
def build_workload(args: argparse.Namespace, tokenizer: Any | None) -> Workload:
    """`--workload` (a saved workload or ShareGPT JSON) or a synthetic one (`--quick`: small and short)."""
    shape = {k: v for k, v in (("max_answer_tokens", getattr(args, "max_answer_tokens", None)),
                               ("session_rate", getattr(args, "session_rate", None)),
                               ("mean_think_time_s", getattr(args, "think_time", None))) if v is not None}
    if args.quick:  # (the flags given shape it too)
        spec = replace(WorkloadSpec.quick(num_sessions=args.sessions or QUICK_SESSIONS, seed=args.seed), **shape)
    else:
        spec = WorkloadSpec(num_sessions=args.sessions or DEFAULT_SESSIONS, seed=args.seed, with_text=True, **shape)
    if args.workload is None:
        return generate_workload(spec)
    path = Path(args.workload)
    if not path.is_file():
        raise ValueError(f"--workload {path}: no such file (give a saved workload.json or a ShareGPT JSON)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--workload {path}: not a JSON file ({e})") from e
    if isinstance(data, list):  # ShareGPT: real texts and lengths, arrivals and pauses drawn from the spec
        count = tokenizer.encode if tokenizer is not None else None
        return load_sharegpt(path, max_sessions=args.sessions, tokenizer=count, spec=spec)
    workload = Workload.from_dict(data) if isinstance(data, dict) else None
    if workload is None:
        raise ValueError(f"--workload {path}: expected a saved workload (object) or ShareGPT (list)")
    if args.sessions is not None:
        workload = replace(workload, sessions=workload.sessions[: args.sessions])
    return workload


def workload_stats(workload: Workload, path: Path) -> dict[str, Any]:
    return {
        "path": str(path),
        "source": workload.source,
        "seed": workload.seed,
        "skipped": workload.skipped,
        "num_sessions": workload.num_sessions,
        "num_turns": workload.num_turns,
        "mean_turns": workload.mean_turns,
        "total_user_tokens": workload.total_user_tokens,
        "total_answer_tokens": workload.total_answer_tokens,
        "duration_s": max((s.arrival_s for s in workload.sessions), default=0.0),
    }


def _save_workload(workload: Workload, out_dir: Path) -> None:
    path = out_dir / WORKLOAD_FILE
    workload.to_json(path)
    print(f"workload: {workload.num_sessions} sessions, {workload.num_turns} turns -> {path}", file=sys.stderr)


# -- in process ---------------------------------------------------------------------------------
def _load_model(args: argparse.Namespace) -> LoadedModel:
    """Load once, shared by every system; random-shape weights borrow the embedded tokenizer to render chats."""
    if getattr(args, "random_shape", None) is None:
        return load_model(args.model, args.device, args.dtype)
    from cachedattention.bench.models import bench_model
    from cachedattention.model.embedded import embedded_model_dir
    from cachedattention.model.tokenizer import Tokenizer

    loaded = bench_model(args)
    tok = Tokenizer.from_pretrained(getattr(args, "tokenizer", None) or str(embedded_model_dir()))
    if len(tok.hf) > loaded.spec.vocab_size:
        raise ValueError(
            f"--random-shape {args.random_shape} has a {loaded.spec.vocab_size}-token vocabulary, smaller than the "
            f"embedded tokenizer's {len(tok.hf)}; use --model or another shape for the workload benchmark"
        )
    return replace(loaded, tokenizer=tok)


def plan_budgets(loaded: LoadedModel, workload: Workload, max_model_len: int, dtype: str) -> tuple[Budgets, int]:
    """Tier budgets from the workload's estimated KV (each session capped at the window); also KV bytes/token."""
    head, per_turn = template_overhead(loaded.tokenizer)
    tokens = [min(n, max_model_len) for n in session_tokens(workload, head, per_turn)]
    element = torch.tensor([], dtype=resolve_dtype(dtype)).element_size()
    per_token = loaded.spec.kv_bytes_per_token(element)
    return Budgets.for_workload(sum(tokens) * per_token, max(tokens) * per_token), per_token


def _run_local(
    args: argparse.Namespace, loaded: LoadedModel, workload: Workload, names: tuple[str, ...], time_scale: float
) -> tuple[list[ReplayResult], dict[str, Any]]:
    base = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
        scheduler=SchedulerConfig(long_prefill_token_threshold=args.long_prefill_token_threshold),
    )
    max_model_len = args.max_model_len or loaded.spec.default_context()
    budgets, per_token = plan_budgets(loaded, workload, max_model_len, args.dtype)
    # the pool holds every session of the workload (its largest, 1.5 times), not always a whole window:
    # the engines' window is then what it holds, which every turn fits either way
    element = torch.tensor([], dtype=resolve_dtype(args.dtype)).element_size()
    pool_tokens = KVPool.pages_for_budget(loaded.spec, PAGE_SIZE, budgets.device_bytes, element) * PAGE_SIZE
    if pool_tokens < max_model_len:
        max_model_len = pool_tokens
        base = replace(base, max_model_len=max_model_len)
    results, systems = [], {}
    with tempfile.TemporaryDirectory(prefix="cachedattention-bench-") as store_root:
        for spec in build_systems(names, budgets, store_root, replicas=args.replicas, remote_url=args.remote_url):
            result = _run_system(spec, base, loaded, workload, time_scale, args.seed)
            results.append(result)
            systems[spec.name] = _system_config(spec, result)
    config = {
        "mode": "in-process",
        "model": loaded.name,
        "device": args.device,
        "dtype": args.dtype,
        "max_model_len": max_model_len,
        "time_scale": time_scale,
        "seed": args.seed,
        "quick": bool(args.quick),
        "kv_bytes_per_token": per_token,
        "budgets": asdict(budgets),
        "cost_formula": COST_FORMULA,
        "systems": systems,
    }
    return results, config


def _run_system(
    spec: SystemSpec, base: EngineConfig, loaded: LoadedModel, workload: Workload, time_scale: float, seed: int
) -> ReplayResult:
    from cachedattention.engine.engine import LLMEngine

    engines = []
    try:
        engines.extend(LLMEngine(config, loaded=loaded) for config in spec.engine_configs(base))
        result = replay(engines, workload, spec.name, time_scale=time_scale, text_seed=seed, routing=spec.routing)
        if spec.store.remote_url is not None:  # the shared tier's memory is billed too; then the run's keys go
            for engine in engines:
                engine.store.store.flush()
            tier = engines[0].store.store.remote.tier
            result.remote_bytes = tier.footprint()
            tier.drop_all()
        return result
    finally:
        for engine in engines:
            engine.close()


def _system_config(spec: SystemSpec, result: ReplayResult) -> dict[str, Any]:
    return {
        "cache": asdict(spec.cache),
        "store": asdict(spec.store),
        "replicas": spec.replicas,
        # DRAM billed: every replica's host tier, and what the run left on the remote server (DRAM too)
        "host_bytes": spec.billed_host_bytes + result.remote_bytes,
        "remote_bytes": result.remote_bytes,
        "disk_bytes": spec.billed_disk_bytes,
        "compute_s": result.compute_s,
        "failed_turns": result.failed_turns,
        "engine_stats": _jsonable(result.stats),
    }


# -- over HTTP ----------------------------------------------------------------------------------
def _run_http(
    args: argparse.Namespace, workload: Workload, time_scale: float
) -> tuple[list[ReplayResult], dict[str, Any]]:
    from cachedattention.bench.http_replay import HttpTarget, replay_http

    target = HttpTarget(args.url, model=args.model, api=args.api)
    system = args.url if args.api == "chat" else f"{args.url} (responses)"
    result = replay_http(target, workload, system=system, time_scale=time_scale, text_seed=args.seed)
    if not result.records:
        raise ValueError(f"no turn succeeded against {args.url} ({result.failed_turns} failed)")
    # the server's tier budgets and busy time are unknown from outside: no storage billed, GPU = per-turn time
    system = {"host_bytes": 0, "disk_bytes": 0, "compute_s": None, "failed_turns": result.failed_turns}
    config = {
        "mode": "http",
        "url": args.url,
        "api": args.api,
        "model": result.stats.get("model"),
        "time_scale": time_scale,
        "seed": args.seed,
        "quick": bool(args.quick),
        "cost_formula": COST_FORMULA,
        "systems": {result.system: system},
    }
    return [result], config


# -- summaries ----------------------------------------------------------------------------------
def _summaries(results: list[ReplayResult], systems: Mapping[str, Mapping[str, Any]]) -> dict[str, SystemSummary]:
    out = {}
    for r in results:
        if not r.records:
            raise ValueError(f"system {r.system!r} finished no turn")
        billed = systems[r.system]
        out[r.system] = summarize(
            r.records,
            max(r.wall_s, 1e-9),
            r.system,
            compute_s=r.compute_s,
            host_bytes=billed["host_bytes"],
            disk_bytes=billed["disk_bytes"],
        )
    return out


def _jsonable(value: Any) -> Any:
    """Engine stats as plain JSON values (anything else becomes its string)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    return str(value)
