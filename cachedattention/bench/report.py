"""Benchmark reports: a markdown comparison table, a JSON dump and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cachedattention.bench.metrics import TIERS, SystemSummary


def markdown_table(summaries: Mapping[str, SystemSummary], baseline: str = "RE") -> str:
    """One row per system; ratio columns compare against `baseline` (e.g. recomputation)."""
    if baseline not in summaries:
        raise ValueError(f"baseline {baseline!r} not among systems {sorted(summaries)}")
    base = summaries[baseline]
    header = [
        "system",
        "TTFT mean (s)",
        "p50 (s)",
        "p90 (s)",
        "p99 (s)",
        "TTFT turns≥2 (s)",
        f"TTFT vs {baseline}",
        "prefill tok/s",
        f"prefill ×{baseline}",
        "decode tok/s",
        "hit rate",
        "host share",
        "cost $",
        f"cost vs {baseline}",
    ]
    rows = [header, ["---"] * len(header)]
    for name, s in summaries.items():
        rows.append(
            [
                name,
                _num(s.ttft_mean_s),
                _num(s.ttft_p50_s),
                _num(s.ttft_p90_s),
                _num(s.ttft_p99_s),
                _num(s.ttft_later_mean_s),
                _ratio(s.ttft_mean_s, base.ttft_mean_s),
                f"{s.prefill_tok_s:.1f}",
                _ratio(s.prefill_tok_s, base.prefill_tok_s),
                f"{s.decode_tok_s:.1f}",
                f"{s.hit_rate:.1%}",
                f"{s.hit_rate_by_tier['host']:.1%}",
                f"{s.cost_usd:.4f}",
                _ratio(s.cost_usd, base.cost_usd),
            ]
        )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def write_json(
    path: str | Path,
    summaries: Mapping[str, SystemSummary],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `{"systems": {name: summary.to_dict()}, **extra}` and return the path."""
    extra = dict(extra or {})
    if "systems" in extra:
        raise ValueError(
            "write_json: 'systems' is reserved for the summaries; rename that extra key"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"systems": {name: s.to_dict() for name, s in summaries.items()}, **extra}
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    return path


def write_plots(
    out_dir: str | Path, summaries: Mapping[str, SystemSummary]
) -> list[Path]:
    """TTFT by turn, hit rate by tier and cost plots as PNGs in `out_dir`; returns their paths."""
    if not summaries:
        raise ValueError("write_plots: no summaries to plot")
    # Figure + Agg canvas directly: no pyplot, so no global backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(summaries)
    paths = []

    def save(fig: Figure, filename: str) -> None:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=120)
        paths.append(out_dir / filename)

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, s in summaries.items():
        turns = sorted(s.ttft_by_turn)
        ax.plot(
            [t + 1 for t in turns],
            [s.ttft_by_turn[t] for t in turns],
            marker="o",
            label=name,
        )
    ax.set(xlabel="turn (1 = first)", ylabel="mean TTFT (s)", title="TTFT by turn")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    save(fig, "ttft_by_turn.png")

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    bottom = [0.0] * len(names)
    for tier in TIERS:
        share = [summaries[n].hit_rate_by_tier[tier] for n in names]
        ax.bar(names, share, bottom=bottom, label=tier)
        bottom = [b + v for b, v in zip(bottom, share)]
    ax.set(
        ylabel="share of prompt tokens", ylim=(0, 1), title="KV cache hit rate by tier"
    )
    ax.legend()
    save(fig, "hit_rate_by_tier.png")

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    bottom = [0.0] * len(names)
    for part in ("gpu_usd", "dram_usd", "ssd_usd"):
        value = [getattr(summaries[n].cost, part) for n in names]
        ax.bar(names, value, bottom=bottom, label=part.removesuffix("_usd").upper())
        bottom = [b + v for b, v in zip(bottom, value)]
    ax.set(ylabel="USD", title="Serving cost")
    ax.legend()
    save(fig, "cost.png")
    return paths


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}×" if base > 0 else "-"
