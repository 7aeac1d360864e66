"""The replicas behind a router: their addresses, which are up (by health checks and by failed
connections), and how many requests each has in flight through this router."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from cachedattention.router.affinity import bounded_load_order, rendezvous_order

DEFAULT_LOAD_FACTOR = 1.25


@dataclass(frozen=True)
class RouterConfig:
    replicas: tuple[str, ...]  # base URLs (http://host:port), each an OpenAI-compatible server
    load_factor: float = DEFAULT_LOAD_FACTOR  # bounded loads: at most this times the average in flight per replica (0: off)
    health_interval_s: float = 5.0  # how often every replica's /health is asked
    health_timeout_s: float = 5.0  # a /health slower than this counts as a failed probe
    health_failures: int = 3  # timed-out probes in a row that mark a replica down (busy is not down)
    connect_timeout_s: float = 5.0
    memory_entries: int = 100_000  # responses' and prefixes' replicas remembered (least recently used dropped)
    max_body_bytes: int = 64 << 20  # a larger request body is refused (413) before it is read whole

    def __post_init__(self) -> None:
        if not self.replicas:
            raise ValueError("a router needs at least one replica: give --replica URL")
        for url in self.replicas:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/") or parts.query:
                raise ValueError(f"a replica is a server's base URL such as http://10.0.0.5:8000, got {url!r}")
        if len(set(normalized(self.replicas))) != len(self.replicas):
            raise ValueError(f"a replica is named twice in {list(self.replicas)}")
        if self.load_factor != 0 and self.load_factor < 1:
            raise ValueError(f"load_factor must be >= 1 (or 0: no bound), got {self.load_factor}")
        if self.health_interval_s <= 0 or self.health_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("health_interval_s, health_timeout_s and connect_timeout_s must be > 0")
        if self.health_failures < 1:
            raise ValueError(f"health_failures must be >= 1, got {self.health_failures}")
        if self.memory_entries < 1 or self.max_body_bytes < 1:
            raise ValueError("memory_entries and max_body_bytes must be >= 1")


def normalized(urls: Sequence[str]) -> list[str]:
    return [u.rstrip("/") for u in urls]


class ReplicaSet:
    """Up or down, and requests in flight, per replica. Single-threaded: the router's event loop."""

    def __init__(self, urls: Sequence[str], load_factor: float) -> None:
        self.urls = normalized(urls)
        self.load_factor = load_factor
        self.up = dict.fromkeys(self.urls, True)  # until a health check or a connection says otherwise
        self.in_flight = dict.fromkeys(self.urls, 0)

    def mark(self, url: str, up: bool) -> None:
        self.up[url] = up

    def healthy(self) -> list[str]:
        return [u for u in self.urls if self.up[u]]

    def order(self, key: str | None, preferred: str | None = None) -> list[str]:
        """The replicas to try, best first: `preferred` (where the key's KV was last seen) if it is up
        and within its bound; else the key's rendezvous order among the healthy ones under bounded
        loads (no key: the least loaded first); the replicas marked down last (their state may be stale)."""
        up = self.healthy()
        # (no key: least loaded first, ties in the configured order)
        order = rendezvous_order(key, up) if key is not None else sorted(up, key=lambda u: self.in_flight[u])
        if preferred in up:
            order.remove(preferred)
            order.insert(0, preferred)
        order = bounded_load_order(order, self.in_flight, self.load_factor)
        return order + [u for u in self.urls if not self.up[u]]
