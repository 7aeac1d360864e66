import random

import pytest

from cachedattention.store.ledger import TierLedger
from cachedattention.store.policy import PolicyConfig, make_policy


def host_ledger(host_bytes=60):
    """Six 10-byte sessions in host: created in order a..f, accessed in order c, a, f, b, e, d."""
    led = TierLedger(host_bytes=host_bytes, disk_bytes=1000)
    for i, sid in enumerate("abcdef"):
        led.put_host(sid, 10, now=float(i))
    for t, sid in enumerate("cafbed"):
        led.touch(sid, 10.0 + t)
    return led


def policy(name, **kw):
    return make_policy(PolicyConfig(name=name, **kw))


@pytest.mark.parametrize(
    "name, queue, expected",
    [
        ("lru", ["c", "a"], list("cafbed")),  # access order, queue ignored
        ("fifo", ["a", "b"], list("abcdef")),  # creation order, queue ignored
        # lookahead: unqueued by LRU (f, e, d), then queued farthest back first (b, c, a)
        ("lookahead", ["a", "c", "b"], list("fedbca")),
    ],
)
def test_host_victim_order(name, queue, expected):
    led = host_ledger()
    assert policy(name).host_victims(led, need_bytes=60, queue=queue, now=20.0) == expected


def test_host_victims_stop_once_enough_is_free_and_skip_protected():
    led = host_ledger(host_bytes=70)  # 10 free
    pol = policy("lru")
    assert pol.host_victims(led, need_bytes=10, queue=[], now=20.0) == []
    assert pol.host_victims(led, need_bytes=25, queue=[], now=20.0) == ["c", "a"]
    assert pol.host_victims(led, need_bytes=25, queue=[], now=20.0, protect={"c"}) == ["a", "f"]
    # not enough even with everything: every candidate, so the caller sees the shortfall
    assert pol.host_victims(led, need_bytes=500, queue=[], now=20.0, protect={"d"}) == list("cafbe")


def test_lookahead_keeps_the_prefetch_window_while_anything_else_remains():
    led = host_ledger()
    pol = policy("lookahead", prefetch_window=2)
    queue = ["d", "e", "a"]  # window = d, e
    victims = pol.host_victims(led, need_bytes=40, queue=queue, now=20.0)
    assert victims == ["c", "f", "b", "a"] and not {"d", "e"} & set(victims)
    # only window sessions left: then (and only then) the one farther back goes first
    assert pol.host_victims(led, need_bytes=60, queue=queue, now=20.0)[-2:] == ["e", "d"]


def test_lookahead_window_invariant_on_random_ledgers():
    rng = random.Random(0)
    for _ in range(200):
        led = TierLedger(host_bytes=1000, disk_bytes=1000)
        sids = [f"s{i}" for i in range(rng.randint(1, 12))]
        for sid in sids:
            led.put_host(sid, rng.randint(1, 60), now=rng.random())
        queue = rng.sample(sids, rng.randint(0, len(sids)))
        protect = set(rng.sample(sids, rng.randint(0, min(2, len(sids)))))
        pol = policy("lookahead", prefetch_window=rng.randint(0, 4))
        window = set(queue[: pol.prefetch_window(led)])
        need = rng.randint(0, 1200)
        victims = pol.host_victims(led, need, queue, now=1.0, protect=protect)
        assert len(set(victims)) == len(victims) and not set(victims) & protect
        cands = [s for s in sids if s not in protect]
        freed = sum(led.entry(s).nbytes for s in victims)
        assert led.host_free + freed >= need or sorted(victims) == sorted(cands)
        first_window = next((i for i, s in enumerate(victims) if s in window), len(victims))
        if first_window < len(victims):  # a window session only once every other candidate is taken
            assert set(cands) - window <= set(victims[:first_window])


def disk_ledger():
    """Disk-only sessions a..e (10 bytes each, last access 1..5) and x in both tiers."""
    led = TierLedger(host_bytes=30, disk_bytes=60)
    for i, sid in enumerate("abcde"):
        led.put_disk(sid, 10, now=float(i + 1))
    led.put_disk("x", 10, now=0.5)
    led.put_host("x", 10, now=0.5)
    return led


def test_disk_victim_order_and_ttl():
    led = disk_ledger()
    assert policy("lru").disk_victims(led, 20, ["x", "a"], now=10.0) == ["x", "a"]
    assert policy("lookahead").disk_victims(led, 30, ["a", "c"], now=10.0) == ["x", "b", "d"]
    assert policy("lookahead").disk_victims(led, 60, ["a", "c"], now=10.0)[-2:] == ["c", "a"]
    # TTL: records idle for > 6.5 s (x, a, b, c at now=10) always go, first, even if room is not needed
    ttl = policy("lookahead", disk_ttl_s=6.5)
    assert ttl.disk_victims(led, 0, ["a"], now=10.0) == ["x", "a", "b", "c"]
    assert ttl.expired(led, now=10.0, protect={"b"}) == ["x", "a", "c"]
    assert policy("lru").expired(led, now=1e9) == []


def test_prefetch_takes_disk_only_window_sessions_in_queue_order():
    led = disk_ledger()  # host: x (10 of 30 bytes)
    pol = policy("lookahead", prefetch_window=4)
    # window = e, x, a, d; x is already in host; host room = 20 free + x is inside the window
    assert pol.prefetch(led, ["e", "x", "a", "d", "b"]) == ["e", "a"]
    led.put_host("z", 10, now=9.0)  # outside the window z may be displaced: room stays 10 free + 10
    assert pol.prefetch(led, ["e", "x", "a", "d", "z"]) == ["e", "a"]
    assert pol.prefetch(led, ["e", "x", "z", "a", "d"]) == ["e"]  # z in the window: room is 10
    assert policy("lru").prefetch(led, ["e"]) == [] and policy("fifo").prefetch(led, ["e"]) == []


def test_prefetch_window_is_derived_from_the_reserve():
    led = TierLedger(host_bytes=100, disk_bytes=100)
    pol = policy("lookahead", prefetch_reserve_frac=0.2)
    assert pol.prefetch_window(led) == 1  # empty ledger: at least the next job
    led.put_disk("a", 5, now=0.0)
    led.put_disk("b", 15, now=0.0)
    assert pol.prefetch_window(led) == 2  # 20 reserved bytes // 10 average
    assert policy("lookahead", prefetch_window=7).prefetch_window(led) == 7


def test_unknown_policy_and_bad_config():
    with pytest.raises(ValueError, match="valid: lookahead, lru, fifo"):
        make_policy(PolicyConfig(name="random"))
    with pytest.raises(ValueError, match="prefetch_reserve_frac"):
        PolicyConfig(prefetch_reserve_frac=1.5)
    with pytest.raises(ValueError, match="disk_ttl_s"):
        PolicyConfig(disk_ttl_s=0)
    assert {make_policy(PolicyConfig(name=n)).name for n in ("lookahead", "lru", "fifo")} == {
        "lookahead",
        "lru",
        "fifo",
    }



def test_host_free_target_is_the_threshold_share_of_host():
    led = TierLedger(host_bytes=200, disk_bytes=1000)
    assert policy("lookahead").host_free_target(led) == 10  # 5% by default
    assert policy("lru", host_free_threshold=0.25).host_free_target(led) == 50


@pytest.mark.parametrize("ttl", [None, 40.0])
@pytest.mark.parametrize("name", ["lookahead", "lru", "fifo"])
def test_a_full_disk_s_victims_from_the_kept_order_equal_ordering_every_segment(name, ttl):
    """disk_victims reads the ledger's kept orders lazily; the victims (expired ones first, with a
    TTL) must be those of the policy's key over every candidate, through puts, touches and drops."""
    rng = random.Random(7)
    fast = make_policy(PolicyConfig(name=name, disk_ttl_s=ttl))
    full = make_policy(PolicyConfig(name=name, disk_ttl_s=ttl))
    full.disk_order = None  # (the key over every candidate)
    led = TierLedger(host_bytes=400, disk_bytes=2000)
    now = 0.0
    for step in range(3000):
        now += rng.choice([0.0, 0.5, 1.0])  # (equal times: ties fall to the ledger's order)
        sid = f"s{rng.randrange(120)}"
        op = rng.random()
        e = led.entry(sid)
        if op < 0.3 and led.disk_free >= 40 and (e is None or not e.in_disk):
            led.put_disk(sid, 40, now, touch=rng.random() < 0.5)
        elif op < 0.45 and led.host_free >= 40 and (e is None or not e.in_host):
            led.put_host(sid, 40, now)
        elif op < 0.7 and e is not None:
            led.touch(sid, now)
        elif op < 0.8 and e is not None and e.in_disk:
            led.drop_disk(sid)
        elif op < 0.85 and e is not None:
            led.forget(sid)
        queue = rng.sample([f"s{i}" for i in range(120)], rng.randrange(6))
        protect = set(rng.sample([f"s{i}" for i in range(120)], rng.randrange(4)))
        need = rng.choice([0, 40, 200, 2500])
        got = fast.disk_victims(led, need, queue, now, protect)
        assert got == full.disk_victims(led, need, queue, now, protect), step
        assert fast.expired(led, now, protect) == full.expired(led, now, protect), step
        if step % 500 == 0:
            led.check_integrity()
    assert [e.session_id for e in led.disk_in_order("lru")] == [
        e.session_id for e in sorted((e for e in led.sessions() if e.in_disk), key=lambda e: (e.last_access_s, e.created_s, e.seq))]
