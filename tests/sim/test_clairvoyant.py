"""The clairvoyant bound: look-ahead's prefetching, evicting by each session's next arrival."""

import pytest

from cachedattention.sim import SimConfig, TraceTurn, simulate
from cachedattention.sim.clairvoyant import ClairvoyantPolicy
from cachedattention.store.ledger import TierLedger
from cachedattention.store.policy import PolicyConfig


def config(clairvoyant, **kw):
    return SimConfig(host_bytes=250, disk_bytes=1000, bytes_per_token=1, policy=PolicyConfig(name="lookahead"),
                     service_tok_s=100.0, max_running=1, clairvoyant=clairvoyant, **kw)


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
    # with nothing queued) demotes a, the oldest; a comes back first (at t=10), so the bound demotes b.
    trace = [TraceTurn("a", 0.0, 0, 100, 0), TraceTurn("b", 1.5, 0, 100, 0), TraceTurn("c", 3.0, 0, 100, 0),
             TraceTurn("a", 10.0, 100, 10, 1)]
    if b_again is not None:
        trace.append(TraceTurn("b", b_again, 100, 10, 1))
    look = simulate(trace, config(False, closed_loop=False), check=True)
    bound = simulate(trace, config(True, closed_loop=False), check=True)
    assert bound.policy == "clairvoyant" and look.policy == "lookahead"
    assert (look.host_hits, look.disk_hits) == (0, 1 + (b_again is not None))
    assert (bound.host_hits, bound.disk_hits) == (1, b_again is not None)
    assert bound.hits == look.hits  # only where the hits come from differs


def test_closed_loop_reads_the_next_arrival_from_the_think_time():
    # a's second turn comes 6 s after its first ends (t=7), b's 30 s after its own (t=32): a stays in
    # host. (A later turn's arrival_s only orders the trace in a closed loop.)
    trace = [TraceTurn("a", 0.0, 0, 100, 0), TraceTurn("b", 0.5, 0, 100, 0), TraceTurn("c", 3.0, 0, 100, 0),
             TraceTurn("a", 5.0, 100, 10, 1, think_s=6.0), TraceTurn("b", 5.0, 100, 10, 1, think_s=30.0)]
    look = simulate(trace, config(False), check=True)
    bound = simulate(trace, config(True), check=True)
    assert (look.host_hits, look.disk_hits) == (0, 2)
    assert (bound.host_hits, bound.disk_hits) == (1, 1)
    assert look.makespan_s == bound.makespan_s == pytest.approx(32.1)


def test_needs_lookahead():
    with pytest.raises(ValueError, match="clairvoyant eviction extends look-ahead"):
        SimConfig(host_bytes=1, disk_bytes=1, bytes_per_token=1, policy=PolicyConfig(name="lru"), clairvoyant=True)
    with pytest.raises(ValueError, match="extends look-ahead's prefetching"):
        ClairvoyantPolicy(PolicyConfig(name="fifo"), {})
