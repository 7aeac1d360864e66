"""Where one system's engine time goes in the workload benchmark: the step's parts, forward passes
by how many sequences decode and how many tokens are prefilled in them, and why turns wait to be
admitted (no pages for the queue head, max_num_seqs, the step's token budget, or the current step).

A diagnostic, not a benchmark mode (CPU, embedded model, a saved workload):

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/workload_profile.py \\
        [docs/results/cpu/workload.json] [CachedAttention]
"""

import argparse
import collections
import sys
import tempfile
import time

from cachedattention.bench import workload_bench
from cachedattention.bench.replay import replay
from cachedattention.bench.systems import build_systems
from cachedattention.config import EngineConfig
from cachedattention.engine import engine as engine_mod
from cachedattention.engine import runner as runner_mod
from cachedattention.engine import scheduler as scheduler_mod
from cachedattention.engine.engine import LLMEngine
from cachedattention.store import connector as connector_mod
from cachedattention.store import store as store_mod
from cachedattention.store import transfer as transfer_mod

totals: collections.defaultdict[str, float] = collections.defaultdict(float)
forwards: collections.defaultdict[tuple[int, int], list[float]] = collections.defaultdict(list)
# queued turns x seconds of the steps that left them queued, by why the queue head was not admitted
held: collections.defaultdict[str, float] = collections.defaultdict(float)


def timed(owner, name: str, key: str) -> None:
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def _prefill_bucket(tokens: int) -> int:
    """The bucket's lower bound: none, 1-127 (a short prompt mixed in), then by 128 up to 512+."""
    return 0 if tokens == 0 else 1 if tokens < 128 else 128 * min(tokens // 128, 4)


def instrument() -> None:
    real_run = runner_mod.ModelRunner.run

    def run(self, batch):
        start = time.perf_counter()
        out = real_run(self, batch)
        seconds = time.perf_counter() - start
        decoders = sum(g.rows.shape[0] for g in batch.decode) + sum(1 for s in batch.seqs if s.num_new == 1)
        decoders += batch.paged_decode.rows.shape[0] if batch.paged_decode is not None else 0
        prefill = sum(s.num_new for s in batch.seqs if s.num_new > 1)
        forwards[(min(decoders, 8), _prefill_bucket(prefill))].append(seconds)
        totals["forward"] += seconds
        return out

    runner_mod.ModelRunner.run = run
    real_schedule, real_step = scheduler_mod.Scheduler.schedule, engine_mod.LLMEngine.step
    pending: list[tuple[float, int, str]] = []

    def schedule(self):
        before = dict(self.steps_blocked)
        out = real_schedule(self)
        if self.waiting:
            why = next((k for k in ("pages", "seqs") if self.steps_blocked[k] > before[k]), "budget")
            pending.append((time.perf_counter(), len(self.waiting), why))
        return out

    def step(self):
        pending.clear()
        out = real_step(self)
        for start, waiting, why in pending:
            held[why] += waiting * (time.perf_counter() - start)
        return out

    scheduler_mod.Scheduler.schedule = schedule
    engine_mod.LLMEngine.step = step
    timed(runner_mod.ModelRunner, "build_batch", "build_batch")
    timed(scheduler_mod.Scheduler, "schedule", "schedule")
    timed(engine_mod, "sample_batch", "sample")
    timed(engine_mod.LLMEngine, "step", "step")
    for name in ("begin_step", "end_step", "preload", "publish_queue", "request_finished", "lookup",
                 "_capture_from_pages", "_load_job"):
        timed(connector_mod.StoreConnector, name, "store." + name)
    timed(store_mod.AttentionStore, "wait_saved", "store.wait_saved")
    timed(transfer_mod.Loader, "submit", "store.loader.submit")  # on a CPU, host-tier loads run right here


def load_saved_workload(workload_path: str):
    """The embedded model, a saved workload, the bench's tier budgets for it and the base engine config."""
    args = argparse.Namespace(model=None, device="cpu", dtype="float32", quick=False, sessions=None, seed=0,
                              workload=workload_path, max_model_len=8192, random_shape=None)
    loaded = workload_bench._load_model(args)
    workload = workload_bench.build_workload(args, loaded.tokenizer)
    budgets, _ = workload_bench.plan_budgets(loaded, workload, 8192, "float32")
    base = EngineConfig(model=None, device="cpu", dtype="float32", max_model_len=8192, seed=0)
    return loaded, workload, budgets, base


def main(workload_path: str, system: str) -> None:
    loaded, workload, budgets, base = load_saved_workload(workload_path)
    instrument()
    with tempfile.TemporaryDirectory() as root:
        spec = build_systems([system], budgets, root)[0]
        engine = LLMEngine(spec.engine_config(base), loaded=loaded)
        try:
            result = replay(engine, workload, system, progress=False)
        finally:
            engine.close()
    later = [r.ttft_s for r in result.records if r.turn_index >= 1]
    print(f"{system}: compute {result.compute_s:.1f} s, TTFT turns>=2 {sum(later) / len(later):.3f} s")
    queued = sum(r.queue_s or 0.0 for r in result.records)
    after = sum(r.ttft_s - (r.queue_s or 0.0) for r in result.records)
    print(f"  TTFT of all turns, summed: {queued:.1f} s queued + {after:.1f} s from admission to first token;")
    print("  queued while a step ran without admitting them, by why the queue head waited: "
          + ", ".join(f"{why} {seconds:.1f} s" for why, seconds in sorted(held.items(), key=lambda kv: -kv[1]))
          + f" (the rest, {queued - sum(held.values()):.1f} s: arriving during a step and waiting for its end)")
    for key in sorted(totals, key=lambda k: -totals[k]):
        print(f"  {key:22s} {totals[key]:7.1f} s")
    decode_only = sum(sum(v) for (_, p), v in forwards.items() if p < 128)
    print(f"  forward passes with under 128 prefilled tokens (decode steps): {decode_only:.1f} s")
    for (decoders, prefill), times in sorted(forwards.items()):
        print(f"  {decoders}{'+' if decoders == 8 else ''} decoding, {f'{prefill}+' if prefill else 'no'} prefilled: {len(times)} steps, "
              f"mean {1000 * sum(times) / len(times):.1f} ms, total {sum(times):.1f} s")


if __name__ == "__main__":
    argv = sys.argv[1:]
    main(argv[0] if argv else "docs/results/cpu/workload.json", argv[1] if len(argv) > 1 else "CachedAttention")
