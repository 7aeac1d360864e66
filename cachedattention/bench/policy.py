"""`bench --mode policy`: look-ahead vs LRU vs FIFO over a synthetic multi-turn trace, through the simulator.

The default setting mirrors the paper's: LLaMA-65B KV (2.5 MB per token), host and disk budgets
of 128 GB and 10 TB for a trace of 12,000 sessions arriving at 8 per second, scaled down with
everything else (sessions, arrival rate, service speed and both budgets) by `--sessions / 12000`
so the trace's KV volume keeps the same ratio to the budgets. Hit rates are reported over the
whole run and over its loaded middle (after a 100 s warm-up, until the last session arrives), and
how many of look-ahead's disk hits were jobs that started the moment they arrived (an empty queue),
and a reference: look-ahead with clairvoyant eviction (Belady's rule, each session's next arrival
read from the trace; not an optimum with sessions of different sizes), what eviction with perfect
foresight of arrivals wins.
Disk -> host reads are instant unless `--disk-read-gbps` gives the bandwidth at the paper's full
scale (scaled like the rest); a prefetch still in flight when its job starts is then a disk hit.
`--windowed-share` models a KV of the same size per token with sliding-window layers holding that share
of it (Gemma 3: 5 layers in 6): host copies keep those layers only for the turns a later turn's
windows reach (`--window-reach` tokens back), as the store's `windowed_history` does.
It also prints look-ahead's read demand and the lead time its prefetches get from the queue,
against the bytes they carry: the disk bandwidth this trace needs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from cachedattention.bench.workload import WorkloadSpec, generate_workload
from cachedattention.sim import SimConfig, simulate, trace_from_workload, trace_kv_bytes
from cachedattention.store.policy import PolicyConfig

POLICIES = ("lookahead", "lru", "fifo")
PAPER_SESSIONS = 12_000
BYTES_PER_TOKEN = 2 * 80 * 8192 * 2  # LLaMA-65B, fp16: K and V, 80 layers, hidden 8192
HOST, DISK = 128e9, 10e12
RATE, SERVICE_TOK_S, RUNNING = 8.0, 1600.0, 8


def run_policy_bench(args: argparse.Namespace) -> int:
    n = args.sessions or (1500 if args.quick else 3000)
    f = n / PAPER_SESSIONS
    wl = generate_workload(WorkloadSpec(num_sessions=n, seed=args.seed, session_rate=RATE * f))
    trace = trace_from_workload(wl)
    last_arrival = max(s.arrival_s for s in wl.sessions)
    volume = trace_kv_bytes(trace, BYTES_PER_TOKEN)
    host, disk = int(HOST * f), int(DISK * f)
    gbps = getattr(args, "disk_read_gbps", None)
    if gbps is not None and not gbps > 0:
        raise ValueError(f"--disk-read-gbps must be > 0, got {gbps}")
    read_bytes_s = gbps * 1e9 * f if gbps else None  # I/O demand shrinks with the job rate: scale it alike
    reads = f"disk reads {gbps} GB/s (full scale)" if gbps else "disk reads instant"
    share, reach = getattr(args, "windowed_share", 0.0), getattr(args, "window_reach", 1040)
    windows = dict(windowed_share=share, window_reach_tokens=reach)
    layout = f"; {share:.1%} of the KV in windowed layers, reaching {reach} tokens back" if share else ""
    print(f"trace: {n} sessions, {len(trace)} turns, KV volume {volume / 1e12:.2f} TB; "
          f"default budgets host {host / 1e9:.1f} GB, disk {disk / 1e12:.2f} TB (128 GB : 10 TB scaled by {f:.3f}); "
          f"{reads}{layout}")
    t0 = time.perf_counter()
    default = {p: _simulate(trace, host, disk, p, f, last_arrival, read_bytes_s, **windows) for p in POLICIES}
    foresight = _simulate(trace, host, disk, "lookahead", f, last_arrival, read_bytes_s, clairvoyant=True, **windows)
    sweep = []
    if not args.quick:
        for hx in (0.25, 0.5, 1.0, 2.0):
            for dx in (0.5, 1.0):
                for p in POLICIES:
                    r = default[p] if (hx, dx) == (1.0, 1.0) else _simulate(
                        trace, int(host * hx), int(disk * dx), p, f, last_arrival, read_bytes_s, **windows)
                    sweep.append({"host_bytes": int(host * hx), "disk_bytes": int(disk * dx), "policy": p, **r})
    print(_table(default, sweep))
    look = default["lookahead"]  # where its disk hits come from: the queue cannot help a job that never waits
    print(f"\nlookahead: {look['disk_hits_on_arrival']} of its {look['disk_hits']} disk hits are jobs that started "
          "the moment they arrived (nothing queued to look ahead at)")
    print(_foresight_line(foresight, look))
    print(_reads_line(look, f))
    print(f"\n({time.perf_counter() - t0:.0f} s; `cachedattention bench --mode policy"
          f"{' --quick' if args.quick else ''} --sessions {n} --seed {args.seed}"
          f"{f' --disk-read-gbps {gbps}' if gbps else ''}"
          f"{f' --windowed-share {share} --window-reach {reach}' if share else ''}`)")
    if args.json:
        out = {"policies": default, "references": {"clairvoyant": foresight}, "sweep": sweep, "setting": {
            "sessions": n, "turns": len(trace), "kv_volume_bytes": volume, "host_bytes": host, "disk_bytes": disk,
            "bytes_per_token": BYTES_PER_TOKEN, "session_rate": RATE * f, "service_tok_s": SERVICE_TOK_S * f,
            "max_running": RUNNING, "seed": args.seed, "disk_read_gbps_full_scale": gbps, **windows}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def _simulate(trace, host: int, disk: int, policy: str, f: float, last_arrival: float,
              read_bytes_s: float | None = None, clairvoyant: bool = False, **windows: Any) -> dict:
    base = dict(host_bytes=host, disk_bytes=disk, bytes_per_token=BYTES_PER_TOKEN, policy=PolicyConfig(name=policy),
                service_tok_s=SERVICE_TOK_S * f, max_running=RUNNING, disk_read_bytes_s=read_bytes_s,
                clairvoyant=clairvoyant, **windows)
    whole = simulate(trace, SimConfig(**base)).to_dict()
    loaded = simulate(trace, SimConfig(**base, measure_from_s=100.0, measure_until_s=last_arrival)).to_dict()
    return {**whole, "hit_rate_loaded": loaded["hit_rate"], "host_hit_share_loaded": loaded["host_hit_share"]}


def _foresight_line(r: dict, look: dict) -> str:
    """Look-ahead with clairvoyant eviction next to look-ahead: what foresight of arrivals wins here."""
    return (f"with foresight: look-ahead with clairvoyant eviction (Belady's rule: each session's next arrival read "
            f"from the trace; not a policy a server can run): hit rate {r['hit_rate']:.1%}, {r['host_hit_share']:.1%} "
            f"of hits from host ({r['disk_hits_on_arrival']} of its {r['disk_hits']} disk hits on arrival), "
            f"against look-ahead's {look['hit_rate']:.1%} and {look['host_hit_share']:.1%}")


def _reads_line(r: dict, f: float) -> str:
    """Look-ahead's disk reads at the paper's full scale: the average demand, and what its prefetches need.

    The scaled trace runs every rate at f times the full one, so its intervals are 1/f longer:
    full-scale seconds are scaled ones times f, full-scale rates scaled ones over f.
    """
    gb = 1e9 * f
    return (f"lookahead reads disk -> host at {r['read_demand_bytes_s'] / gb:.1f} GB/s on average (full scale); "
            f"its {r['prefetches_used']} prefetches had a lead time (issue to job start) of "
            f"p50 {r['prefetch_lead_p50_s'] * f:.2f} s / p10 {r['prefetch_lead_p10_s'] * f:.2f} s, so landing each "
            f"in time alone needs p50 {r['prefetch_rate_p50_bytes_s'] / gb:.0f} GB/s, "
            f"p90 {r['prefetch_rate_p90_bytes_s'] / gb:.0f} GB/s (full scale)")


def _table(default: dict, sweep: list[dict]) -> str:
    lines = ["| policy | hit rate | hits from host | hit rate (loaded) | from host (loaded) | prefetched / written back (TB) |",
             "|---|---|---|---|---|---|"]
    for p, r in default.items():
        lines.append(f"| {p} | {r['hit_rate']:.1%} | {r['host_hit_share']:.1%} | {r['hit_rate_loaded']:.1%} | "
                     f"{r['host_hit_share_loaded']:.1%} | {r['bytes_prefetched'] / 1e12:.2f} / {r['bytes_written_back'] / 1e12:.2f} |")
    if sweep:
        lines += ["", "Sweep (hit rate, share of hits from host):", "",
                  "| host GB | disk TB | " + " | ".join(POLICIES) + " |", "|---|---|" + "---|" * len(POLICIES)]
        keys = sorted({(r["host_bytes"], r["disk_bytes"]) for r in sweep})
        for h, d in keys:
            cells = [next(r for r in sweep if (r["host_bytes"], r["disk_bytes"], r["policy"]) == (h, d, p)) for p in POLICIES]
            lines.append(f"| {h / 1e9:.1f} | {d / 1e12:.2f} | " + " | ".join(
                f"{c['hit_rate']:.1%} ({c['host_hit_share']:.0%})" for c in cells) + " |")
    return "\n".join(lines)
