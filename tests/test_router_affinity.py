"""The router's placement: rendezvous hashing (stable, even, minimal moves), bounded loads, the
prefix table of plain prompts, and the keys read from requests as the replicas read them."""

import pytest

from cachedattention.router.affinity import BoundedMap, PrefixTable, bounded_load_order, rendezvous_order
from cachedattention.router.keys import route_key
from cachedattention.router.replicas import ReplicaSet, RouterConfig

URLS = ["http://a:1", "http://b:1", "http://c:1"]


def test_rendezvous_spreads_keys_and_moves_only_a_removed_replica_s():
    keys = [f"session-{i}" for i in range(3000)]
    home = {k: rendezvous_order(k, URLS)[0] for k in keys}
    shares = [sum(1 for v in home.values() if v == u) / len(keys) for u in URLS]
    assert all(0.28 < s < 0.39 for s in shares), shares
    again = {k: rendezvous_order(k, list(reversed(URLS)))[0] for k in keys}  # (the order replicas are listed in)
    assert again == home
    without_b = {k: rendezvous_order(k, ["http://a:1", "http://c:1"])[0] for k in keys}
    moved = [k for k in keys if without_b[k] != home[k]]
    assert moved and all(home[k] == "http://b:1" for k in moved)
    assert len(moved) == sum(1 for v in home.values() if v == "http://b:1")


def test_bounded_loads_move_a_key_off_a_replica_far_busier_than_the_others():
    a, b, c = order = ["http://a:1", "http://b:1", "http://c:1"]
    assert bounded_load_order(order, {a: 1, b: 1}, 1.25) == order  # (bound: ceil(1.25 * 3 / 3) = 2)
    assert bounded_load_order(order, {a: 2, b: 1}, 1.25) == [b, c, a]  # (bound 2: a is at it)
    assert bounded_load_order(order, {a: 2, b: 1}, 2.0) == order  # (bound 3)
    assert bounded_load_order(order, {a: 5}, 0) == order  # (no bound: pure affinity)


def test_a_replica_set_tries_the_preferred_then_the_key_s_order_and_the_down_ones_last():
    rs = ReplicaSet(URLS, load_factor=1.25)
    first, second, third = rendezvous_order("k", URLS)
    assert rs.order("k") == [first, second, third]
    assert rs.order("k", preferred=third) == [third, first, second]
    rs.mark(first, False)
    assert rs.order("k") == [second, third, first] and rs.healthy() == [u for u in URLS if u != first]
    rs.mark(first, True)
    rs.in_flight[first] = 3  # (bound: ceil(1.25 * 4 / 3) = 2)
    assert rs.order("k") == [second, third, first]
    assert rs.order(None)[-1] == first  # (no key: the least loaded first)


def test_the_prefix_table_finds_a_continued_prompt_not_one_sharing_a_header():
    table = PrefixTable(capacity=1000)
    turn1 = "system: be brief.\n" * 10 + "user: what is a cat?\n"
    table.record(turn1, "http://a:1")
    assert table.lookup(turn1 + "assistant: an animal.\nuser: and a dog?\n") == "http://a:1"
    other = turn1[:70] + "x" * 400  # (shares its first block only)
    assert table.lookup(other) is None
    assert table.lookup("short") is None  # (no full block)


def test_the_maps_forget_their_least_recently_used_entries():
    m = BoundedMap(2)
    m.put("a", "1")
    m.put("b", "2")
    assert m.get("a") == "1"
    m.put("c", "3")
    assert m.get("b") is None and m.get("a") == "1" and len(m) == 2
    with pytest.raises(ValueError, match="capacity"):
        BoundedMap(0)


def test_route_keys_are_read_as_the_replicas_read_them():
    chat = "/v1/chat/completions"
    opening = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    later = opening + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    k1, k2 = route_key(chat, {}, {"messages": opening}), route_key(chat, {}, {"messages": later})
    assert k1.kind == "conversation" and k1 == k2  # (every turn of a conversation: one key)
    assert route_key(chat, {}, {"messages": opening, "cache_salt": "t"}) != k1
    other = [{"role": "system", "content": "s"}, {"role": "user", "content": "bye"}]
    assert route_key(chat, {}, {"messages": other}) != k1
    by_header = route_key(chat, {"x-session-id": "h"}, {"messages": opening})
    assert by_header.kind == "session" and by_header.value.startswith("h\x1e")
    by_body = route_key(chat, {"x-session-id": "h"}, {"messages": opening, "session_id": "b"})
    assert by_body.value.startswith("b\x1e")  # (the body wins)
    prev = route_key("/v1/responses", {}, {"input": "x", "previous_response_id": "resp_1"})
    assert (prev.kind, prev.value) == ("response", "resp_1")
    assert route_key("/v1/responses", {}, {"input": "hello"}).kind == "conversation"
    assert route_key("/v1/completions", {}, {"prompt": ["p1", "p2"]}).value.endswith("p1")
    ids = route_key("/v1/completions", {}, {"prompt": [1, 2, 3]})
    assert ids.kind == "prefix" and ids.value.endswith("1 2 3 ")
    assert route_key(chat, {}, None) is None and route_key(chat, {}, {"messages": "oops"}) is not None
    assert route_key(chat, {}, {"messages": []}) is None


@pytest.mark.parametrize("bad, match", [
    ({"replicas": ()}, "at least one replica"),
    ({"replicas": ("localhost:8000",)}, "base URL"),
    ({"replicas": ("http://a:1/v1",)}, "base URL"),
    ({"replicas": ("http://a:1", "http://a:1/")}, "named twice"),
    ({"replicas": ("http://a:1",), "load_factor": 0.5}, "load_factor"),
])  # fmt: skip
def test_router_config_refuses_what_cannot_work(bad, match):
    with pytest.raises(ValueError, match=match):
        RouterConfig(**bad)


def test_the_router_command_refuses_a_bad_replica_before_listening(capsys):
    from cachedattention.cli import main

    assert main(["router", "--replica", "http://a:1", "--replica", "localhost:8000"]) == 2
    assert "base URL" in capsys.readouterr().err
    assert main(["router", "--replica", "http://a:1", "--load-factor", "0.5"]) == 2
