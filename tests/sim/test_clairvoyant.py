"""Clairvoyant eviction: look-ahead's prefetching, evicting by each session's next arrival."""

import pytest

from cachedattention.sim import SimConfig, TraceTurn, simulate
from cachedattention.sim.clairvoyant import ClairvoyantPolicy
from cachedattention.store.ledger import TierLedger
from cachedattention.store.policy import PolicyConfig


def config(clairvoyant, **kw):
    kw = {"service_tok_s": 100.0, "max_running": 1, **kw}
    return SimConfig(host_bytes=250, disk_bytes=1000, bytes_per_token=1, policy=PolicyConfig(name="lookahead"),
                     clairvoyant=clairvoyant, **kw)


def test_victims_are_the_never_used_then_the_farthest_next_use():
    ledger = TierLedger(300, 1000)
    for i, sid in enumerate("abc"):
        ledger.put_host(sid, 100, now=float(i))
    next_use = {"a": 50.0, "b": 9.0}  # c never comes back
    policy = ClairvoyantPolicy(PolicyConfig(name="lookahead"), next_use)
    assert policy.host_victims(ledger, 100, [], now=3.0) == ["c"]
    assert policy.host_victims(ledger, 200, [], now=3.0) == ["c", "a"]
    assert policy.host_victims(ledger, 200, [], now=3.0, protect={"c"}) == ["a", "b"]
    next_use["c"] = 100.0
    assert policy.host_victims(ledger, 100, [], now=3.0) == ["c"]
    assert policy.disk_victims(ledger, 1100, [], now=3.0) == []  # nothing on disk to drop


@pytest.mark.parametrize("b_again", [None, 20.0], ids=["b-never-again", "b-again-later"])
def test_keeps_in_host_the_session_that_comes_back_first(b_again):
    # a, b and c run one after another; c's result needs room for one of a and b. LRU order (look-ahead's,
    # with nothing queued) demotes a, the oldest; a comes back first (at t=10), so clairvoyant eviction demotes b.
    trace = [TraceTurn("a", 0.0, 0, 100, 0), TraceTurn("b", 1.5, 0, 100, 0), TraceTurn("c", 3.0, 0, 100, 0),
             TraceTurn("a", 10.0, 100, 10, 1)]
    if b_again is not None:
        trace.append(TraceTurn("b", b_again, 100, 10, 1))
    look = simulate(trace, config(False, closed_loop=False), check=True)
    seer = simulate(trace, config(True, closed_loop=False), check=True)
    assert seer.policy == "clairvoyant" and look.policy == "lookahead"
    assert (look.host_hits, look.disk_hits) == (0, 1 + (b_again is not None))
    assert (seer.host_hits, seer.disk_hits) == (1, b_again is not None)
    assert seer.hits == look.hits  # only where the hits come from differs


def test_closed_loop_reads_the_next_arrival_from_the_think_time():
    # a's second turn comes 6 s after its first ends (t=7), b's 30 s after its own (t=32): a stays in
    # host. (A later turn's arrival_s only orders the trace in a closed loop.)
    trace = [TraceTurn("a", 0.0, 0, 100, 0), TraceTurn("b", 0.5, 0, 100, 0), TraceTurn("c", 3.0, 0, 100, 0),
             TraceTurn("a", 5.0, 100, 10, 1, think_s=6.0), TraceTurn("b", 5.0, 100, 10, 1, think_s=30.0)]
    look = simulate(trace, config(False), check=True)
    seer = simulate(trace, config(True), check=True)
    assert (look.host_hits, look.disk_hits) == (0, 2)
    assert (seer.host_hits, seer.disk_hits) == (1, 1)
    assert look.makespan_s == seer.makespan_s == pytest.approx(32.1)


def test_a_running_jobs_copy_is_next_used_by_the_job_after():
    # r's second turn runs from t=1 (its 50-token copy read, to be replaced by 1050 tokens at the end);
    # s's result at t=2.6 needs room for 160 of 250: the running r's stale copy goes, and q's (back
    # at t=5) stays in host
    trace = [TraceTurn("r", 0.0, 0, 50, 0), TraceTurn("q", 0.0, 0, 50, 0), TraceTurn("r", 1.0, 50, 1000, 1),
             TraceTurn("s", 1.5, 0, 160, 0), TraceTurn("q", 5.0, 50, 10, 1)]
    seer = simulate(trace, config(True, closed_loop=False, max_running=2), check=True)
    assert (seer.host_hits, seer.disk_hits) == (2, 0)


def test_needs_lookahead():
    with pytest.raises(ValueError, match="clairvoyant eviction extends look-ahead"):
        SimConfig(host_bytes=1, disk_bytes=1, bytes_per_token=1, policy=PolicyConfig(name="lru"), clairvoyant=True)
    with pytest.raises(ValueError, match="clairvoyant eviction extends look-ahead's prefetching"):
        ClairvoyantPolicy(PolicyConfig(name="fifo"), {})
