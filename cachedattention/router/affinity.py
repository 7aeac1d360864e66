"""Which replica serves a request: the same one for every turn of a conversation, so that its KV is
reused from that replica's device and host tiers, spread evenly over the replicas, and moved off a
replica only when it is down or far busier than the others.

Rendezvous hashing gives each key an order of preference over the replicas that depends only on the
key and the replicas' names: every router (and a restarted one) agrees, and when a replica leaves,
only the keys it held move. Bounded loads (Mirrokni et al., "Consistent Hashing with Bounded Loads")
take the first replica in that order whose in-flight requests stay within `load_factor` times the
average, so a hot conversation cannot pile up on one replica while the others idle.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence


def rendezvous_order(key: str, replicas: Sequence[str]) -> list[str]:
    """The replicas in `key`'s order of preference (highest random weight first)."""

    def weight(replica: str) -> bytes:
        return hashlib.blake2b(f"{replica}\x00{key}".encode(), digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)


def bounded_load_order(order: Sequence[str], in_flight: Mapping[str, int], load_factor: float) -> list[str]:
    """`order` with the replicas already at their bound moved behind the others (each group keeping
    its order): a replica may hold at most ceil(load_factor * (requests + 1) / replicas) requests,
    counting the one being placed. `load_factor` 0 keeps the order as it is (pure affinity)."""
    if load_factor <= 0 or not order:
        return list(order)
    total = sum(in_flight.get(r, 0) for r in order) + 1
    bound = math.ceil(load_factor * total / len(order))
    fits = [r for r in order if in_flight.get(r, 0) < bound]
    return fits + [r for r in order if r not in fits]


class BoundedMap:
    """A dict that forgets its least recently used keys beyond `capacity` (the router's memory of
    which replica holds what is a hint: a forgotten one falls back to hashing)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, str] = OrderedDict()

    def get(self, key: str) -> str | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: str) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


PREFIX_BLOCK_CHARS = 64  # characters per block of a prompt's chained hashes


def prefix_blocks(text: str, block: int = PREFIX_BLOCK_CHARS) -> list[str]:
    """Chained hashes of `text`'s full blocks: equal hashes, equal prefixes (up to collisions)."""
    out, chain = [], b""
    for lo in range(0, len(text) - block + 1, block):
        chain = hashlib.blake2b(chain + text[lo : lo + block].encode(), digest_size=12).digest()
        out.append(chain.hex())
    return out


class PrefixTable:
    """Which replica last served each prefix of a plain prompt (completions), so that a prompt that
    continues an earlier one (a conversation sent as raw text) goes where its KV is."""

    def __init__(self, capacity: int, min_share: float = 0.5) -> None:
        self.blocks = BoundedMap(capacity)
        self.min_share = min_share  # of the prompt's blocks the match must cover to count

    def lookup(self, text: str) -> str | None:
        """The replica of the longest known prefix, if it covers at least `min_share` of the prompt
        (a shared few-shot header alone does not tie every prompt to one replica)."""
        blocks = prefix_blocks(text)
        for depth in range(len(blocks), 0, -1):
            if depth < self.min_share * len(blocks):
                break
            if (replica := self.blocks.get(blocks[depth - 1])) is not None:
                return replica
        return None

    def record(self, text: str, replica: str) -> None:
        for h in prefix_blocks(text):
            self.blocks.put(h, replica)
