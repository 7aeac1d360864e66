import pytest

from cachedattention.bench.workload import Session, Turn, Workload, WorkloadSpec, generate_workload
from cachedattention.sim import SimConfig, TraceTurn, simulate, sweep, trace_from_workload, trace_kv_bytes
from cachedattention.store.policy import PolicyConfig

POLICIES = ("lookahead", "lru", "fifo")


def config(host, disk, name="lookahead", **kw):
    return SimConfig(host_bytes=host, disk_bytes=disk, bytes_per_token=1, policy=PolicyConfig(name=name), **kw)


def two_turns(sid="a", t0=0.0, first=100, second=10, think=1.0):
    return [TraceTurn(sid, t0, 0, first, 0), TraceTurn(sid, t0 + 5.0, first, second, 1, think)]


def test_trace_from_workload_adds_history_and_think_times():
    wl = Workload((Session("s", 2.0, (Turn(3, 4, 0.0), Turn(5, 6, 10.0), Turn(1, 1, 1.0))),), 0, "test")
    trace = trace_from_workload(wl, turn_latency_s=0.5)
    assert [(t.arrival_s, t.history_tokens, t.new_tokens, t.think_s) for t in trace] == [
        (2.0, 0, 7, 0.0),
        (12.5, 7, 11, 10.0),
        (14.0, 18, 2, 1.0),
    ]
    assert trace_kv_bytes(trace, bytes_per_token=3) == 20 * 3


def test_host_hit_disk_hit_and_miss():
    # ample host: the second turn finds its history in host
    r = simulate(two_turns(), config(1000, 1000), check=True)
    assert (r.turns, r.turns_with_history, r.hits, r.host_hits, r.misses) == (2, 1, 1, 1, 0)
    # no store at all: a miss
    r = simulate(two_turns(), config(0, 0), check=True)
    assert (r.hits, r.misses, r.sessions_lost) == (0, 1, 2)  # both turns had nowhere to go
    # host too small for the 100-byte session: written to disk, loaded back on demand
    r = simulate(two_turns(), config(50, 1000), check=True)
    # (then served from disk, as host cannot hold it; its 110-byte result goes to disk too)
    assert (r.hits, r.disk_hits, r.bytes_written_back, r.bytes_loaded) == (1, 1, 100 + 110, 100)


def test_lookahead_prefetches_a_queued_session_into_host():
    # b's first turn runs long, so a's second turn waits in the queue behind it; host holds one
    # session, so a is demoted when b finishes... unless the queue says a comes next.
    trace = [
        TraceTurn("a", 0.0, 0, 100, 0),
        TraceTurn("b", 0.5, 0, 100, 0),
        TraceTurn("c", 0.6, 0, 100, 0),
        TraceTurn("a", 0.7, 100, 10, 1),
    ]
    kw = dict(service_tok_s=100.0, max_running=1, closed_loop=False)
    look = simulate(trace, config(120, 1000, "lookahead", **kw), check=True)
    lru = simulate(trace, config(120, 1000, "lru", **kw), check=True)
    assert look.host_hits == 1 and look.bytes_prefetched == 100
    assert lru.disk_hits == 1 and lru.bytes_loaded == 100 and lru.bytes_prefetched == 0
    assert lru.disk_hits_on_arrival == 0  # that job waited in the queue: look-ahead could have fetched it
    # a slow disk: the prefetch (issued at t=2) lands at t=4, a second after the job started
    slow = simulate(trace, config(120, 1000, "lookahead", disk_read_bytes_s=50.0, **kw), check=True)
    assert slow.disk_hits == 1 and slow.makespan_s == pytest.approx(look.makespan_s + 1.0)
    # the prefetch was issued at t=2 and its job started at t=3: a 1 s lead for 100 bytes
    assert (look.prefetches_used, look.prefetch_lead_p50_s, look.prefetch_rate_p50_bytes_s) == (1, 1.0, 100.0)
    assert look.read_demand_bytes_s == pytest.approx(100 / look.makespan_s)
    assert lru.prefetches_used == 0 and lru.read_demand_bytes_s == pytest.approx(100 / lru.makespan_s)


def test_a_starting_job_reads_before_the_prefetches_in_flight():
    from cachedattention.sim.simulator import _Sim

    sim = _Sim(config(1000, 1000, disk_read_bytes_s=10.0), check=True)
    sim.ledger.put_disk("x", 50, 0.0)
    sim.ready_s["y"], sim.ready_s["z"], sim.io_free_s = 0.5, 3.0, 3.0  # y landed, z in flight
    assert sim.load_on_demand("x", now=1.0) == pytest.approx(5.0)  # 50 bytes at 10 B/s, first in line
    assert sim.ready_s == {"y": 0.5, "z": pytest.approx(8.0)} and sim.io_free_s == pytest.approx(8.0)
    sim.ledger.put_disk("w", 20, 0.0)
    assert sim.load_on_demand("w", now=2.0) == pytest.approx(6.0)  # behind x's read (ends at 6), then 2 s
    assert sim.ready_s["z"] == pytest.approx(10.0) and sim.io_free_s == pytest.approx(10.0)


def test_measure_window_counts_only_turns_arriving_inside_it():
    trace = two_turns("a", 0.0) + two_turns("b", 100.0)
    full = simulate(trace, config(1000, 1000, closed_loop=False))
    late = simulate(trace, config(1000, 1000, closed_loop=False, measure_from_s=50.0))
    assert (full.turns, full.hits, late.turns, late.hits) == (4, 2, 2, 1)
    assert late.bytes_written_back == full.bytes_written_back  # bytes moved cover the whole run


def test_disk_ttl_expires_idle_records():
    trace = [TraceTurn("a", 0.0, 0, 100, 0), TraceTurn("a", 50.0, 100, 10, 1)]
    policy = PolicyConfig(name="lookahead", disk_ttl_s=10.0)
    cfg = SimConfig(host_bytes=50, disk_bytes=1000, bytes_per_token=1, policy=policy, closed_loop=False)
    r = simulate(trace, cfg, check=True)
    assert (r.misses, r.disk_evictions) == (1, 1)


def loaded_trace(num_sessions=400):
    # ShareGPT-like lengths; with the service speeds below, jobs wait longer than users think
    spec = WorkloadSpec(num_sessions=num_sessions, seed=1, session_rate=2.0, mean_think_time_s=10.0)
    return trace_from_workload(generate_workload(spec))


@pytest.mark.parametrize("name", POLICIES)
def test_budgets_hold_after_every_event_when_both_tiers_overflow(name):
    trace = loaded_trace(120)
    volume = trace_kv_bytes(trace, 1)
    host, disk = volume // 100, volume // 20
    r = simulate(trace, config(host, disk, name, service_tok_s=500.0, max_running=2), check=True)
    assert r.turns == len(trace) and r.hits + r.misses == r.turns_with_history
    assert r.peak_host_used <= host and r.peak_disk_used <= disk
    assert r.host_evictions > 0 and r.disk_evictions > 0 and r.sessions_lost > 0  # both overflowed
    assert r.max_queue_len > 5


def test_lookahead_beats_lru_and_fifo_on_a_loaded_trace():
    trace = loaded_trace()
    disk = trace_kv_bytes(trace, 1) * 60 // 400  # room for ~60 of the 400 sessions' final KV
    host = disk // 10
    results = [simulate(trace, config(host, disk, n, service_tok_s=450.0, max_running=2)) for n in POLICIES]
    look, lru, fifo = results
    assert look.mean_wait_s > 20 and look.max_queue_len > 100  # loaded: jobs queue
    # Same trace, budgets and queueing: only the use of the queue differs.
    assert look.hit_rate > max(lru.hit_rate, fifo.hit_rate) + 0.2
    assert look.host_hit_share > 0.8 > 0.2 > max(lru.host_hit_share, fifo.host_hit_share)


def test_result_dict_sweep_and_config_errors():
    rows = sweep(two_turns(), [50, 1000], [1000], ["lru", PolicyConfig(name="lookahead")], bytes_per_token=1)
    assert [(r["host_bytes"], r["policy"]) for r in rows] == [
        (50, "lru"),
        (50, "lookahead"),
        (1000, "lru"),
        (1000, "lookahead"),
    ]
    assert {"hit_rate", "host_hit_share", "bytes_prefetched", "bytes_written_back", "bytes_loaded"} <= rows[0].keys()
    assert rows[-1]["hit_rate"] == 1.0 and rows[-1]["host_hit_share"] == 1.0
    with pytest.raises(ValueError, match="equal lists"):
        sweep(two_turns(), [1, 2], [1], ["lru"], bytes_per_token=1, pairs=True)
    with pytest.raises(ValueError, match="max_running"):
        config(1, 1, max_running=0)
    with pytest.raises(ValueError, match="new_tokens"):
        TraceTurn("a", 0.0, 0, 0)


def test_open_loop_keeps_a_sessions_turns_in_order():
    # the second turn "arrives" before the first is served: it must still run after it
    trace = [TraceTurn("a", 0.0, 0, 100, 0), TraceTurn("a", 0.1, 100, 10, 1)]
    r = simulate(trace, config(1000, 1000, service_tok_s=10.0, closed_loop=False), check=True)
    assert r.host_hits == 1 and r.makespan_s == pytest.approx(11.0)
    r = simulate(trace, config(1000, 1000, service_tok_s=10.0), check=True)  # closed loop: think after end
    assert r.makespan_s == pytest.approx(11.0)



def test_disk_hits_of_jobs_that_never_waited_are_counted_apart():
    """a is demoted for b; a's next turn arrives to an empty queue, so no look-ahead could fetch it."""
    trace = [
        TraceTurn("a", 0.0, 0, 40, 0),  # ends 0.4
        TraceTurn("b", 1.0, 0, 100, 0),  # ends 2.0: a demoted to disk to make room
        TraceTurn("a", 5.0, 40, 10, 1),  # arrives to an empty queue and starts at once
    ]
    cfg = SimConfig(host_bytes=120, disk_bytes=1000, bytes_per_token=1, service_tok_s=100.0, closed_loop=False)
    r = simulate(trace, cfg, check=True)
    assert (r.disk_hits, r.disk_hits_on_arrival) == (1, 1)


def conversation(sid, turns, t0=0.0):
    """One session's turns of these sizes, back to back."""
    out, history = [], 0
    for k, new in enumerate(turns):
        out.append(TraceTurn(sid, t0 + k, history, new, k))
        history += new
    return out


def test_a_windowed_models_host_copy_keeps_its_windowed_layers_only_within_reach():
    from cachedattention.sim.simulator import _Sim

    sim = _Sim(config(1000, 1000, windowed_share=0.5, window_reach_tokens=60), check=True)
    # newest turn starts at 160: the turn ending at 60 is past reach (100 > 60); first and newest kept whole
    assert sim.host_nbytes([10, 50, 50, 50, 20]) == 180 - 50 // 2
    assert sim.host_nbytes([10, 50, 50, 70, 20]) == 200 - 100 // 2  # (newest at 180: ends 60 and 110 past reach)
    assert sim.host_nbytes([10, 500, 100, 20]) == 630 - 500 // 2
    assert sim.host_nbytes([10, 500, 20]) == 530  # (the turn before the newest: the newest's window reads it)
    assert sim.host_nbytes([500, 20]) == 520  # (the first turn: a prompt other conversations share)
    dense = _Sim(config(1000, 1000), check=True)
    assert dense.host_nbytes([10, 50, 50, 50, 20]) == 180
    # demoted, its disk copy holds every layer; read back, a copy reads only the layers host keeps
    sim.turns_of["x"] = [10, 500, 100, 20]
    sim.ledger.put_host("x", sim.host_nbytes(sim.turns_of["x"]), 0.0)
    sim.demote("x", [], 1.0)
    assert sim.result.bytes_written_back == sim.ledger.entry("x").disk_nbytes == 630
    sim.load_on_demand("x", 2.0)
    assert sim.result.bytes_loaded == sim.ledger.entry("x").host_nbytes == 630 - 500 // 2
    sim.ledger.drop_host("x")
    sim.prefetch(["x"], 3.0)
    assert sim.result.bytes_prefetched == sim.ledger.entry("x").host_nbytes == 630 - 500 // 2
    sim.ledger.check_integrity()


def test_a_windowed_model_fits_more_history_in_host():
    """Two conversations take turns; host holds both only with the windowed layers of history dropped.
    Disk copies hold every layer; a copy read back into host reads only the layers it keeps."""
    trace = sorted(conversation("a", [40, 200, 200, 200, 20, 20]) + conversation("b", [40, 200, 200, 200, 20, 20], 0.5),
                   key=lambda t: t.arrival_s)
    kw = dict(service_tok_s=1e6, closed_loop=False)
    dense = simulate(trace, config(1000, 10_000, "lru", **kw), check=True)
    windowed = simulate(trace, config(1000, 10_000, "lru", windowed_share=5 / 6, window_reach_tokens=50, **kw), check=True)
    assert dense.hits == windowed.hits == 10
    assert windowed.host_hits == 10 and dense.host_hits < 8 and dense.host_evictions > 0 == windowed.host_evictions
    assert windowed.peak_host_used < 1000 < 2 * 680  # (each conversation's 680 tokens, whole)
    with pytest.raises(ValueError, match="windowed_share"):
        config(1, 1, windowed_share=1.5)
