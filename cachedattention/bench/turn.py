"""`bench --mode turn`: time to first token of the next turn after H history tokens, per way of serving it.

Cells, measured side by side in one run: recompute; KV already on device; host hit loaded
synchronously; host hit loaded layer-wise; disk hit (files dropped from the page cache) layer-wise;
and the store's load alone. Each timed turn uses a fresh session whose history was stored first.
Repetitions are interleaved across cells (every cell's r-th before any cell's next), so the
medians of a noisy machine's slow spells fall on all cells alike.
The "queued" cells time a host hit that arrives while another job is running (one sequence at a
time, so it waits for that job's last decode steps), with and without the device read buffer:
with it, the history loads while the turn is still queued.
With `--remote-url`, the "remote" cell times a turn whose history another replica (a second
engine on the same remote tier) stored: the record is read, the segments fetched, then loaded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cachedattention.bench.models import bench_model
from cachedattention.bench.timing import fmt_ms, sync
from cachedattention.config import CacheConfig, EngineConfig, SchedulerConfig, StoreConfig
from cachedattention.engine.engine import LLMEngine
from cachedattention.model.loader import resolve_dtype
from cachedattention.sampling import SamplingParams

ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


@dataclass(frozen=True)
class Cell:
    name: str
    store: bool
    prefix_cache: bool
    layerwise: bool = True
    host_bytes: int = 64 << 30
    disk: bool = False
    queued: bool = False  # the timed turn arrives behind a running job
    preload: bool = True
    remote: bool = False  # the history was stored by another replica on the remote tier (--remote-url)


CELLS = [
    Cell("recompute", store=False, prefix_cache=False),
    Cell("device", store=False, prefix_cache=True),
    Cell("host-sync", store=True, prefix_cache=False, layerwise=False),
    Cell("host-layerwise", store=True, prefix_cache=False),
    Cell("disk-cold-layerwise", store=True, prefix_cache=False, host_bytes=0, disk=True),
    Cell("host-queued", store=True, prefix_cache=False, queued=True),
    Cell("host-queued-no-preload", store=True, prefix_cache=False, queued=True, preload=False),
]
REMOTE_CELL = Cell("remote", store=True, prefix_cache=False, remote=True)
BLOCKER_TOKENS, BLOCKER_STEPS = 64, 4  # the job a queued turn waits behind: its prompt, its answer


def _engine(cell: Cell, loaded, args, window: int, store_dir: str | None) -> LLMEngine:
    elt = torch.tensor([], dtype=resolve_dtype(args.dtype)).element_size()
    per_token = loaded.spec.kv_bytes_per_token(elt)
    pool_bytes = per_token * (2 * window + 1024)  # history + the timed turn, twice
    # room for a few histories: older repetitions' sessions are evicted, so the cells (all alive
    # at once, interleaved) hold a bounded amount of host memory at any history length
    host_bytes = min(cell.host_bytes, 3 * window * per_token)
    cfg = EngineConfig(
        device=args.device,
        dtype=args.dtype,
        max_model_len=window,
        cache=CacheConfig(enable_prefix_cache=cell.prefix_cache, memory_bytes=pool_bytes),
        scheduler=SchedulerConfig(max_num_batched_tokens=window, max_num_seqs=1),
        store=StoreConfig(
            enable=cell.store, layerwise=cell.layerwise, host_bytes=host_bytes, preload=cell.preload,
            store_dir=store_dir if cell.disk else None, disk_bytes=256 << 30, truncation="off",
            remote_url=args.remote_url if cell.remote else None,
        ),
    )
    return LLMEngine(cfg, loaded=loaded)


def _run(engine: LLMEngine, prompt: list[int], session: str | None) -> object:
    rid = engine.add_request(prompt, ONE_TOKEN, session_id=session)
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                if out.finish_reason == "error":  # (a benchmark measures answers: never time a failed one)
                    raise RuntimeError(f"request {rid} failed in the engine (logged above)")
                return out


def _start_blocker(engine: LLMEngine, rep: int, vocab: int) -> None:
    """A job that is running when the timed turn arrives: admitted, with decode steps still to go."""
    prompt = [(11 + 5 * i + 97 * rep) % (vocab - 100) + 50 for i in range(BLOCKER_TOKENS)]
    engine.add_request(prompt, SamplingParams(max_tokens=BLOCKER_STEPS, temperature=0, ignore_eos=True))
    engine.step()


def _drop_page_cache(store_dir: str) -> None:
    for f in Path(store_dir, "segments").glob("*.kv"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _history(h: int, rep: int, vocab: int) -> list[int]:
    # distinct histories per repetition so no cache outside the cell's own can help
    return [(1000 + 7 * i + 131 * rep) % (vocab - 100) + 50 for i in range(h)]


class CellRun:
    """One cell's engine and timings at one history length, one repetition at a time.

    The bench runs every cell's repetition r before any cell's r + 1, so a slow spell of this
    shared machine lands on all cells alike instead of on whichever cell was running.
    """

    def __init__(self, cell: Cell, loaded, args, h: int, window: int) -> None:
        self.cell, self.args, self.h = cell, args, h
        self.store_dir = tempfile.mkdtemp(prefix="ca-turn-") if cell.disk else None
        self.engine = _engine(cell, loaded, args, window, self.store_dir)
        # the replica that served the history: it publishes it to the remote tier
        self.writer = _engine(cell, loaded, args, window, None) if cell.remote else None
        self.ttfts: list[float] = []
        self.waits: list[float] = []
        self.busy: list[float] = []

    def repeat(self, rep: int) -> None:
        """Repetition `rep` (0 warms up and is not counted): store a fresh history, time the next turn."""
        cell, engine, args = self.cell, self.engine, self.args
        vocab = engine.spec.vocab_size
        hist = _history(self.h, rep, vocab)
        new = [(5 + 3 * i + rep) % (vocab - 100) + 50 for i in range(args.new_tokens)]
        session = f"s{rep}" if cell.store else None
        if cell.store or cell.prefix_cache:
            first = self.writer or engine
            _run(first, hist, session)  # turn 1: stores the history (on the other replica for "remote")
            if first.store is not None:
                first.store.store.flush()  # saved, written through, published
            if self.store_dir:
                _drop_page_cache(self.store_dir)
        if cell.queued:
            _start_blocker(engine, rep, vocab)
        sync(args.device)
        t = time.perf_counter()
        out = _run(engine, hist + new, session)
        sync(args.device)
        while engine.has_unfinished():  # a blocker outliving the turn would slow the next one
            engine.step()
        if rep:
            self.ttfts.append(time.perf_counter() - t)
            self.waits.append(out.metrics.load_s)
            self.busy.append(out.metrics.load_busy_s)
            if cell.name != "recompute" and out.metrics.num_cached_tokens < self.h - engine.config.cache.page_size:
                raise RuntimeError(f"{cell.name}: expected a hit of ~{self.h} tokens, got {out.metrics.cached_tokens}")

    def result(self) -> dict:
        """Medians over the counted repetitions."""
        return {"ttft_s": statistics.median(self.ttfts), "load_wait_s": statistics.median(self.waits),
                "load_alone_s": statistics.median(self.busy)}

    def close(self) -> None:
        self.engine.close()
        if self.writer is not None:
            self.writer.close()
        if self.store_dir is not None:  # a GPU cell's history is gigabytes of segments
            shutil.rmtree(self.store_dir, ignore_errors=True)


def measure_cells(cells: list[Cell], loaded, args, h: int, window: int) -> dict[str, dict]:
    """Every cell at history length h, repetitions interleaved across cells."""
    runs: list[CellRun] = []
    try:
        runs.extend(CellRun(c, loaded, args, h, window) for c in cells)
        for rep in range(args.repeats + 1):
            for run in runs:
                run.repeat(rep)
        return {run.cell.name: run.result() for run in runs}
    finally:
        for run in runs:
            run.close()
        # each engine's pool is gigabytes on a GPU, and a store engine sits in a reference cycle
        # (the store's connector holds its engine): free them now, not at the next collection
        runs.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_turn_bench(args: argparse.Namespace) -> int:
    loaded = bench_model(args)
    default = "512,1024,2048" if args.random_shape is None else "4096,16384,32768"
    hs = [int(x) for x in (args.history or default).split(",")]
    if args.quick:
        hs, args.repeats = hs[:2], 1
    window = max(hs) + args.new_tokens + 8
    cells = CELLS + ([REMOTE_CELL] if args.remote_url else [])
    if args.cells:
        wanted = args.cells.split(",")
        unknown = set(wanted) - {c.name for c in cells}
        if unknown:
            hint = " (remote needs --remote-url)" if "remote" in unknown else ""
            raise ValueError(f"unknown cells {sorted(unknown)}; choose from {[c.name for c in cells]}{hint}")
        cells = [c for c in cells if c.name in wanted or c.name == "recompute"]
    results: dict[str, dict[str, dict]] = {}
    for h in hs:
        results[str(h)] = measure_cells(cells, loaded, args, h, window)
        print(f"H={h} done", flush=True)
    print(_table(results, loaded.name, args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": loaded.name, "device": args.device, "dtype": args.dtype,
                                               "new_tokens": args.new_tokens, "history": results}, indent=2))
    return 0


def _table(results: dict, name: str, args) -> str:
    names = list(next(iter(results.values())))
    lines = [
        f"Time to first token of the next turn ({name}, {args.device}, {args.dtype}, {args.new_tokens} new tokens; "
        f"median of {args.repeats}; ms, and ratio to recompute)",
        "",
        "| history | " + " | ".join(names)
        + " | load alone | layer-wise / sync | layer-wise / max(load, device) | queued: preload / none |",
        "|---|" + "---|" * (len(names) + 4),
    ]
    for h, row in results.items():
        base = row["recompute"]["ttft_s"]
        cells = [f"{fmt_ms(row[n]['ttft_s'])} ({row[n]['ttft_s'] / base:.2f}x)" for n in names]
        lw_cell, sync_cell, dev = row.get("host-layerwise"), row.get("host-sync"), row.get("device")
        alone = (sync_cell or lw_cell or {}).get("load_alone_s")
        lw = f"{lw_cell['ttft_s'] / sync_cell['ttft_s']:.2f}" if lw_cell and sync_cell else "-"
        bound = f"{lw_cell['ttft_s'] / max(alone, dev['ttft_s']):.2f}" if lw_cell and dev and alone else "-"
        alone_txt = fmt_ms(alone) if alone else "-"
        q, nq = row.get("host-queued"), row.get("host-queued-no-preload")
        queued = f"{q['ttft_s'] / nq['ttft_s']:.2f}" if q and nq else "-"
        lines.append(f"| {h} | " + " | ".join(cells) + f" | {alone_txt} | {lw} | {bound} | {queued} |")
    return "\n".join(lines)
