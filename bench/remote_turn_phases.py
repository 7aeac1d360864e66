"""Where a remote hit's time goes: the history stored by one engine (a replica) on the remote tier, the
next turn served by another, five times; prints each turn's TTFT, the wait for its fetch (queued) and
the time from admission to its first token.

    python bench/remote_turn_phases.py HISTORY REMOTE_URL    # e.g. 512 unix:///tmp/rsrv/redis.sock
"""

from __future__ import annotations

import argparse
import sys
import time

from cachedattention.bench.models import bench_model
from cachedattention.bench.turn import REMOTE_CELL, _engine, _history, _run


def main() -> None:
    h, url = int(sys.argv[1]), sys.argv[2]
    args = argparse.Namespace(model=None, random_shape=None, tokenizer=None, device="cpu", dtype="float32", seed=0,
                              remote_url=url, new_tokens=32)
    loaded = bench_model(args)
    window = h + args.new_tokens + 8
    writer, reader = (_engine(REMOTE_CELL, loaded, args, window, None) for _ in range(2))
    vocab = reader.spec.vocab_size
    stamp = time.time_ns()  # sessions of this run only
    for rep in range(5):
        hist = _history(h, rep + 50, vocab)
        new = [(5 + 3 * i + rep) % (vocab - 100) + 50 for i in range(args.new_tokens)]
        session = f"phases-{stamp}-{rep}"
        _run(writer, hist, session)
        writer.store.store.flush()  # saved and published
        start = time.perf_counter()
        m = _run(reader, hist + new, session).metrics
        print(f"TTFT {1e3 * (time.perf_counter() - start):.0f} ms: queued (fetch) {1e3 * (m.scheduled_s - m.arrival_s):.0f} ms, "
              f"admission to first token {1e3 * (m.first_token_s - m.scheduled_s):.0f} ms; cached {m.cached_tokens}")
    writer.close()
    reader.close()


if __name__ == "__main__":
    main()
