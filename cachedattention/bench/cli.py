"""`cachedattention bench --mode throughput | turn | policy | workload`: arguments and dispatch."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cachedattention.bench.shapes import SHAPES
from cachedattention.cli_types import POSITIVE, RATE, SECONDS, lengths, number
from cachedattention.config import SchedulerConfig


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="workload", choices=["throughput", "turn", "policy", "workload"])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--random-shape", default=None, choices=list(SHAPES),
                   help="random weights of this shape instead of a checkpoint (no download)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for --random-shape (default: the embedded one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    p.add_argument("--out", default="bench-out", help="folder for plots and saved workloads")
    p.add_argument("--quick", action="store_true", help="a small run that finishes in a couple of minutes on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=POSITIVE, default=3, help="timed repetitions per cell (median reported)")
    # turn mode
    p.add_argument("--history", type=lengths, default=None, help="comma-separated history lengths (turn mode)")
    p.add_argument("--new-tokens", type=POSITIVE, default=32, help="new tokens of the timed turn (turn mode)")
    p.add_argument("--cells", default=None, help="comma-separated subset of the turn-mode cells")
    p.add_argument("--remote-url", default=None, metavar="URL",
                   help="a Redis-protocol server: adds the turn-mode cell of a history another replica stored "
                        "there; the replicas+remote system's shared tier (workload mode)")
    # workload mode
    p.add_argument("--sessions", type=POSITIVE, default=None, help="number of sessions (workload and policy modes)")
    p.add_argument("--workload", default=None, help="ShareGPT JSON or a saved workload JSON (workload mode)")
    p.add_argument("--systems", default=None,
                   help="comma-separated systems (workload mode; default: all but the replicas systems)")
    p.add_argument("--replicas", type=number(int, 2, "an integer >= 2"), default=2,
                   help="replicas of the replicas systems (workload mode)")
    p.add_argument("--url", default=None, help="drive an OpenAI-compatible server over HTTP instead (workload mode)")
    p.add_argument("--api", default="chat", choices=["chat", "responses"],
                   help="with --url: each turn to /v1/chat/completions with the whole conversation (chat), or to "
                        "/v1/responses with the new message and previous_response_id (responses)")
    p.add_argument("--time-scale", type=float, default=None, help="multiply arrival gaps and think times (workload)")
    p.add_argument("--max-answer-tokens", type=POSITIVE, default=None, help="cap answer lengths (workload; CPU runs)")
    p.add_argument("--session-rate", type=RATE, default=None, help="sessions arriving per second (workload)")
    p.add_argument("--think-time", type=SECONDS, default=None, help="mean think time between turns, s (workload)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--long-prefill-token-threshold", type=int, default=SchedulerConfig.long_prefill_token_threshold,
                   help="most prompt tokens one request computes per step, for every system (workload)")
    # policy mode
    p.add_argument("--disk-read-gbps", type=float, default=None,
                   help="time disk->host reads at this bandwidth, GB/s at the paper's full scale (policy; default: instant)")
    p.add_argument("--windowed-share", type=number(float, 0.0, "a share in [0, 1]", 1.0), default=0.0,
                   help="share of a token's KV in sliding-window layers, whose history past every window host "
                        "drops (policy; 0.833 for Gemma 3's 5 windowed layers in 6; default: 0, none)")
    p.add_argument("--window-reach", type=number(int, 0, "an integer >= 0"), default=1040,
                   help="how far back a turn's windows read: the window and a page (policy, with --windowed-share)")


def check_writable(path: str | None, flag: str) -> None:
    """A file the run will write at its end, checked at its start: a run of minutes is not lost to a
    directory given, or a folder that cannot be written."""
    if not path:  # (none given, or empty: no file, as before)
        return
    target = Path(path).absolute()
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a directory: give a file name")
    folder = next(p for p in target.parents if p.exists())  # (the folders below it are made for the file)
    if not folder.is_dir() or not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{flag} {path} cannot be written ({folder} is not a folder this user may write in)")


def run_bench(args: argparse.Namespace) -> int:
    check_writable(args.json, "--json")
    if args.mode != "policy" and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # before a model is built on it, with a clear word
            raise ValueError(f"--device {args.device} asked for, but this PyTorch sees no CUDA device")
    if args.mode == "throughput":
        from cachedattention.bench.throughput import run_throughput_bench

        return run_throughput_bench(args)
    if args.mode == "turn":
        from cachedattention.bench.turn import run_turn_bench

        return run_turn_bench(args)
    if args.mode == "policy":
        from cachedattention.bench.policy import run_policy_bench

        return run_policy_bench(args)
    from cachedattention.bench.workload_bench import run_workload_bench

    return run_workload_bench(args)
