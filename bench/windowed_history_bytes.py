"""Host bytes a sliding-window model's conversations take in the store, with the windowed layers'
KV of history past every window dropped (the default) and kept, the same conversations side by
side in one run, each turn's tokens compared. Random weights of a named shape (`gemma3-110m`:
12 layers, 10 of them windowed over 512 keys). A diagnostic, not a benchmark mode (CPU):

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/windowed_history_bytes.py [turns] [tokens] [shape]

Each turn adds `tokens` new prompt tokens and an answer of `tokens` tokens.
"""

import argparse
import sys
import time

from cachedattention.bench.models import bench_model
from cachedattention.config import CacheConfig, EngineConfig, SchedulerConfig, StoreConfig
from cachedattention.engine.engine import LLMEngine
from cachedattention.sampling import SamplingParams


def _engine(loaded, drop: bool, window: int) -> LLMEngine:
    per_token = loaded.spec.kv_bytes_per_token(4)
    cfg = EngineConfig(
        device="cpu", dtype="float32", max_model_len=window,
        cache=CacheConfig(enable_prefix_cache=False, memory_bytes=per_token * (window + 256)),
        scheduler=SchedulerConfig(max_num_batched_tokens=window, max_num_seqs=1),
        store=StoreConfig(host_bytes=64 << 30, truncation="off", windowed_history="drop" if drop else "keep"),
    )  # fmt: skip
    return LLMEngine(cfg, loaded=loaded)


def _turn(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> tuple[list[int], float, int]:
    """The answer, its time to first token and the host tokens it reused."""
    t = time.perf_counter()
    rid = engine.add_request(prompt, params, session_id="s")
    ttft = None
    while True:
        for out in engine.step():
            if out.request_id == rid and ttft is None:
                ttft = time.perf_counter() - t
            if out.request_id == rid and out.finished:
                engine.store.store.flush()
                return out.token_ids, ttft, out.metrics.cached_tokens["host"]


def main(turns: int, tokens: int, shape: str) -> None:
    args = argparse.Namespace(model=None, random_shape=shape, device="cpu", dtype="float32", seed=0)
    loaded = bench_model(args)
    spec = loaded.spec
    window = 2 * turns * tokens + 16
    engines = {"dropped": _engine(loaded, True, window), "kept": _engine(loaded, False, window)}
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    vocab = spec.vocab_size
    conv: list[int] = []
    print(f"{loaded.name}: {spec.num_layers} layers, {len(spec.window_layers)} windowed over {spec.sliding_window} keys; "
          f"{turns} turns of {tokens} prompt and {tokens} answer tokens")  # fmt: skip
    print("| turn | history tokens | host MB, dropped | host MB, kept | dropped / kept | TTFT ms, dropped | TTFT ms, kept | reused, both |")
    print("|---|---|---|---|---|---|---|---|")
    for t in range(turns):
        conv = conv + [(7 * i + 13 * t) % (vocab - 100) + 50 for i in range(tokens)]
        got = {name: _turn(e, conv, params) for name, e in engines.items()}
        answers = {tuple(a) for a, _, _ in got.values()}
        if len(answers) != 1:
            raise SystemExit(f"turn {t}: the two engines' answers differ")
        reused = {h for _, _, h in got.values()}
        if len(reused) != 1:
            raise SystemExit(f"turn {t}: the two engines reused {sorted(reused)} tokens")
        used = {name: e.store.store.host.used_bytes() / 1e6 for name, e in engines.items()}
        print(f"| {t + 1} | {len(conv)} | {used['dropped']:.1f} | {used['kept']:.1f} | {used['dropped'] / used['kept']:.2f} "
              f"| {got['dropped'][1] * 1000:.0f} | {got['kept'][1] * 1000:.0f} | {reused.pop()} |")  # fmt: skip
        conv = conv + got["dropped"][0]


if __name__ == "__main__":
    argv = sys.argv[1:]
    main(int(argv[0]) if argv else 8, int(argv[1]) if len(argv) > 1 else 256, argv[2] if len(argv) > 2 else "gemma3-110m")
