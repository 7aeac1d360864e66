"""Where look-ahead's disk hits fall in the policy bench's default setting: the warm-up (the first
100 s), the loaded middle (until the last session arrives) and the drain after it, through the same
simulator and budgets as `cachedattention bench --mode policy`.

A diagnostic, not a benchmark mode:

    .venv/bin/python bench/policy_phases.py [sessions]
"""

import sys

from cachedattention.bench import policy as bench
from cachedattention.bench.workload import WorkloadSpec, generate_workload
from cachedattention.sim import SimConfig, simulate, trace_from_workload
from cachedattention.store.policy import PolicyConfig


def main(sessions: int) -> None:
    f = sessions / bench.PAPER_SESSIONS
    wl = generate_workload(WorkloadSpec(num_sessions=sessions, seed=0, session_rate=bench.RATE * f))
    trace = trace_from_workload(wl)
    last = max(s.arrival_s for s in wl.sessions)
    base = dict(host_bytes=int(bench.HOST * f), disk_bytes=int(bench.DISK * f), bytes_per_token=bench.BYTES_PER_TOKEN,
                policy=PolicyConfig(name="lookahead"), service_tok_s=bench.SERVICE_TOK_S * f,
                max_running=bench.RUNNING)
    after_all = 10 * max(t.arrival_s for t in trace)
    for name, lo, hi in [("whole run", 0.0, None), ("warm-up [0, 100 s)", 0.0, 100.0),
                         (f"loaded [100 s, {last:.0f} s)", 100.0, last), (f"drain [{last:.0f} s, end)", last, after_all)]:
        r = simulate(trace, SimConfig(**base, measure_from_s=lo, measure_until_s=hi))
        print(f"{name}: {r.turns_with_history} turns with history, {r.hits} hits: {r.host_hits} from host, "
              f"{r.disk_hits} from disk ({r.disk_hits_on_arrival} on arrival to an empty queue); "
              f"host share {r.host_hit_share:.1%}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
