"""A/B on the workload: the CachedAttention system with decoders in one padded attention group
against groups of similar length (the CPU default), alternating in one process, two rounds.

A diagnostic, not a benchmark mode (CPU, embedded model, a saved workload; ~3 minutes per run):

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/decode_groups_ab.py [workload.json]
"""

import sys
import tempfile

from workload_profile import load_saved_workload  # the script beside this one

from cachedattention.bench.replay import replay
from cachedattention.bench.systems import build_systems
from cachedattention.engine.engine import LLMEngine
from cachedattention.engine.runner import CPU_GROUP_CALL_ROWS


def main(workload_path: str) -> None:
    loaded, workload, budgets, base = load_saved_workload(workload_path)
    for round_ in range(2):
        for rows in (None, CPU_GROUP_CALL_ROWS):
            with tempfile.TemporaryDirectory() as root:
                spec = build_systems(["CachedAttention"], budgets, root)[0]
                engine = LLMEngine(spec.engine_config(base), loaded=loaded)
                engine.runner.group_call_rows = rows
                try:
                    result = replay(engine, workload, "CachedAttention", progress=False)
                finally:
                    engine.close()
            later = [r.ttft_s for r in result.records if r.turn_index >= 1]
            label = "one group" if rows is None else f"groups ({rows} rows per call)"
            print(f"round {round_}, {label}: compute {result.compute_s:.1f} s, "
                  f"TTFT turns>=2 {sum(later) / len(later):.3f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/results/cpu/workload.json")
