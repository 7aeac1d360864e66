import pytest

from cachedattention.store.ledger import TierLedger


def test_put_and_drop_account_bytes_per_tier():
    led = TierLedger(host_bytes=100, disk_bytes=1000)
    led.put_host("a", 40, now=1.0)
    led.put_disk("a", 40, now=2.0)
    led.put_disk("b", 300, now=3.0)
    assert (led.host_used, led.host_free, led.disk_used, led.disk_free) == (40, 60, 340, 660)
    a = led.entry("a")
    assert a.in_host and a.in_disk and a.created_s == 1.0 and a.last_access_s == 2.0
    led.drop_host("a")
    assert led.host_used == 0 and led.entry("a").in_disk and not led.entry("a").in_host
    led.drop_disk("a")
    assert led.entry("a") is None  # in no tier: gone
    assert [e.session_id for e in led.sessions()] == ["b"]
    led.check_integrity()


def test_replacing_a_copy_charges_only_the_difference():
    led = TierLedger(host_bytes=100, disk_bytes=0)
    led.put_host("a", 60, now=0.0)
    led.put_host("a", 100, now=1.0)  # grows by 40 into the 40 free bytes
    assert led.host_used == 100 and led.entry("a").nbytes == 100
    led.put_host("a", 10, now=2.0)
    assert led.host_used == 10
    led.check_integrity()


def test_overflow_raises_and_leaves_the_ledger_unchanged():
    led = TierLedger(host_bytes=100, disk_bytes=50)
    led.put_host("a", 80, now=0.0)
    with pytest.raises(ValueError, match="host tier.*evict first"):
        led.put_host("b", 21, now=1.0)
    with pytest.raises(ValueError, match="disk tier"):
        led.put_disk("a", 51, now=1.0)
    with pytest.raises(ValueError, match="host tier"):
        led.put_host("a", 101, now=1.0)
    assert led.entry("b") is None and led.host_used == 80 and led.disk_used == 0
    assert led.entry("a").in_disk is False and led.entry("a").nbytes == 80
    led.check_integrity()


@pytest.mark.parametrize("op", ["drop_host", "drop_disk", "forget"])
def test_unknown_session_is_a_value_error(op):
    led = TierLedger(10, 10)
    with pytest.raises(ValueError, match="unknown session 'nope'"):
        getattr(led, op)("nope")
    with pytest.raises(ValueError, match="unknown session"):
        led.touch("nope", 1.0)


def test_dropping_a_missing_copy_is_a_value_error():
    led = TierLedger(10, 10)
    led.put_host("a", 5, now=0.0)
    with pytest.raises(ValueError, match="no disk copy"):
        led.drop_disk("a")
    led.put_disk("a", 5, now=0.0)
    led.drop_host("a")
    with pytest.raises(ValueError, match="no host copy"):
        led.drop_host("a")


@pytest.mark.parametrize("nbytes", [-1, 1.5, True])
def test_bad_sizes_are_rejected(nbytes):
    with pytest.raises(ValueError, match="nbytes"):
        TierLedger(10, 10).put_host("a", nbytes, now=0.0)
    with pytest.raises(ValueError, match="budgets"):
        TierLedger(-1, 10)


def test_forget_touch_and_untouched_moves():
    led = TierLedger(100, 100)
    led.put_host("a", 10, now=1.0)
    led.put_disk("a", 10, now=5.0, touch=False)  # a write-back is not an access
    assert led.entry("a").last_access_s == 1.0
    led.touch("a", 7.0)
    assert led.entry("a").last_access_s == 7.0 and led.entry("a").created_s == 1.0
    led.forget("a")
    assert (led.host_used, led.disk_used, len(led)) == (0, 0, 0)


def test_mean_nbytes_follows_the_entries():
    led = TierLedger(100, 100)
    assert led.mean_nbytes == 0.0
    led.put_host("a", 10, now=0.0)
    led.put_disk("b", 30, now=0.0)
    assert led.mean_nbytes == 20.0
    led.forget("b")
    assert led.mean_nbytes == 10.0
    led.check_integrity()


def test_check_integrity_reports_drift():
    led = TierLedger(100, 100)
    led.put_host("a", 10, now=0.0)
    led._host_used = 11  # simulate a bookkeeping bug
    with pytest.raises(RuntimeError, match="host_used=11 but entries hold 10"):
        led.check_integrity()
    led._host_used = 10
    led.entry("a").host_nbytes = 200  # a copy larger than the budget
    with pytest.raises(RuntimeError, match="budget"):
        led.check_integrity()


def test_the_host_index_lists_the_host_copies_in_the_ledger_s_order():
    led = TierLedger(host_bytes=100, disk_bytes=1000)
    for sid in "abcd":
        led.put_disk(sid, 10, now=0.0)
    for sid in "dbc":  # into host in another order than the ledger's
        led.put_host(sid, 10, now=1.0)
    assert [e.session_id for e in led.host_sessions()] == ["b", "c", "d"]  # (as sessions() lists them)
    led.drop_host("c")
    led.forget("d")
    led.put_host("e", 10, now=2.0)
    assert [e.session_id for e in led.host_sessions()] == ["b", "e"]
    led.check_integrity()
    led._in_host.pop("b")  # simulate a bookkeeping bug
    with pytest.raises(RuntimeError, match="host index"):
        led.check_integrity()


def test_the_kept_disk_order_stays_bounded_through_touches():
    led = TierLedger(host_bytes=0, disk_bytes=1000)
    for i in range(10):
        led.put_disk(f"s{i}", 10, now=0.0)
    assert [e.session_id for e in led.disk_in_order("lru")][:2] == ["s0", "s1"]
    for t in range(1, 5000):  # touches between reads push the entry's new place
        led.touch(f"s{t % 10}", now=float(t))
    assert len(led._disk_heaps["lru"]) <= 2 * len(led) + 64
    assert [e.session_id for e in led.disk_in_order("lru")] == [f"s{i}" for i in range(10)]  # (last touched: s9)
