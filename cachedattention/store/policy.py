"""Cache policies of the store: which sessions to demote, drop or prefetch, and when.

A policy is pure: it reads a `TierLedger` and the scheduler's look-ahead hint (the
session ids of the queued jobs, first to run first) and returns session ids in order.
It never mutates the ledger; the store (or the simulator) carries the moves out.

Policies:
- ``lookahead`` (default; the paper's scheduler-aware policy) uses the queue: it demotes
  sessions with no queued job first, then queued ones farthest back in the queue, and
  prefetches disk-only sessions of the next jobs (the prefetch window) into host.
- ``lru`` demotes the least recently accessed sessions, ignoring the queue; no prefetch.
- ``fifo`` demotes the sessions stored first, ignoring the queue; no prefetch.

Every policy also drops disk records older than `disk_ttl_s` (if set) first.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

from cachedattention.store.ledger import LedgerEntry, TierLedger

POLICY_NAMES = ("lookahead", "lru", "fifo")


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "lookahead"  # "lookahead" | "lru" | "fifo"
    prefetch_window: int | None = None  # sessions; None -> reserved host bytes // avg session bytes
    # Share of host the window may span. The whole host by default: prefetches then start as far
    # ahead as host room allows, and a slow disk gets that much more lead time (the policy bench's
    # timed-disk runs: 10 % gave the jobs a one-session window and a 0.02 s lead).
    prefetch_reserve_frac: float = 1.0
    host_free_threshold: float = 0.05  # evict host->disk when free host falls below this share
    disk_ttl_s: float | None = None

    def __post_init__(self) -> None:
        if self.name not in POLICY_NAMES:
            raise ValueError(f"unknown cache policy {self.name!r}; valid: {', '.join(POLICY_NAMES)}")
        if self.prefetch_window is not None and self.prefetch_window < 0:
            raise ValueError(f"prefetch_window must be >= 0 or None, got {self.prefetch_window}")
        if not 0.0 <= self.prefetch_reserve_frac <= 1.0:
            raise ValueError(f"prefetch_reserve_frac must be in [0, 1], got {self.prefetch_reserve_frac}")
        if not 0.0 <= self.host_free_threshold < 1.0:
            raise ValueError(f"host_free_threshold must be in [0, 1), got {self.host_free_threshold}")
        if self.disk_ttl_s is not None and not self.disk_ttl_s > 0:
            raise ValueError(f"disk_ttl_s must be > 0 or None, got {self.disk_ttl_s}")


class CachePolicy(ABC):
    """Contract shared by every policy (the store and the simulator rely on it).

    - Methods are pure: they read the ledger and return session ids; they never change its
      accounting (reading its kept disk order only reorders that cache).
    - ``queue``: session ids of the waiting jobs in queue order (first runs first).
    - ``host_victims``: sessions holding a host copy, in demotion order, just enough that
      ``ledger.host_free`` plus their host bytes reaches ``need_bytes`` ([] if it already
      does; every candidate if even that is not enough). The caller writes each one back to
      disk if it has no disk copy, then drops its host copy.
    - ``disk_victims``: sessions holding a disk copy, in drop order, likewise for
      ``disk_free``; TTL-expired records come first and are always included.
    - Sessions in ``protect`` (e.g. the running jobs) are never returned.
    - ``prefetch``: disk-only sessions to copy disk->host now, in order (lookahead only).
    - ``host_free_target``: free host bytes to keep; below it the caller demotes ahead of need.
    """

    name: str
    # the ledger's kept order (ledger.DISK_ORDERS) that is this policy's disk order without a TTL, so
    # that a full disk's room is found without a key for every segment (None: the key over every
    # candidate, for a policy whose order the ledger does not keep); queued sessions, where the
    # policy puts them after the others (`queue_last`), go farthest back first
    disk_order: str | None = "lru"
    queue_last: bool = False

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    def host_victims(
        self,
        ledger: TierLedger,
        need_bytes: int,
        queue: Sequence[str],
        now: float,
        protect: Collection[str] = (),
    ) -> list[str]:
        if ledger.host_free >= need_bytes:
            return []
        cands = [e for e in ledger.host_sessions() if e.session_id not in protect]
        order = _ordered(cands, self._host_key(ledger, queue))
        return _take(order, need_bytes - ledger.host_free, lambda e: e.host_nbytes)

    def disk_victims(
        self,
        ledger: TierLedger,
        need_bytes: int,
        queue: Sequence[str],
        now: float,
        protect: Collection[str] = (),
    ) -> list[str]:
        if self.config.disk_ttl_s is None and ledger.disk_free >= need_bytes:
            return []  # fast path: the common case needs no scan
        if self.disk_order is not None:
            return self._disk_victims_in_order(ledger, need_bytes - ledger.disk_free, queue, now, protect)
        cands = [e for e in ledger.sessions() if e.in_disk and e.session_id not in protect]
        expired = [e for e in cands if self._expired(e, now)]
        expired.sort(key=lambda e: (e.last_access_s, e.created_s))
        freed = sum(e.disk_nbytes for e in expired)
        victims = [e.session_id for e in expired]
        rest = [e for e in cands if not self._expired(e, now)]
        order = _ordered(rest, self._disk_key(ledger, queue))
        victims += _take(order, need_bytes - ledger.disk_free - freed, lambda e: e.disk_nbytes)
        return victims

    def _disk_victims_in_order(self, ledger: TierLedger, short: int, queue: Sequence[str], now: float,
                               protect: Collection[str]) -> list[str]:  # fmt: skip
        """disk_victims read lazily from the ledger's kept orders: the same victims as ordering every
        candidate by the policy's key (ties in the ledger's order). Expired ones first: the oldest
        accesses, the head of the LRU order."""
        victims: list[str] = []
        expired: set[str] = set()
        if self.config.disk_ttl_s is not None:
            order = ledger.disk_in_order("lru")
            try:
                for e in order:
                    if not self._expired(e, now):
                        break
                    if e.session_id not in protect:
                        victims.append(e.session_id)
                        expired.add(e.session_id)
                        short -= e.disk_nbytes
            finally:
                order.close()
        pos = _positions(queue) if self.queue_last else {}
        queued: list[LedgerEntry] = []
        order = ledger.disk_in_order(self.disk_order)
        try:
            for e in order:
                if short <= 0:
                    break
                if e.session_id in protect or e.session_id in expired:
                    continue
                if e.session_id in pos:
                    queued.append(e)
                    continue
                victims.append(e.session_id)
                short -= e.disk_nbytes
        finally:
            order.close()  # (puts back what it read before the caller drops the victims)
        for e in sorted(queued, key=lambda e: -pos[e.session_id]):  # (all of them: the order ran out)
            if short <= 0:
                break
            victims.append(e.session_id)
            short -= e.disk_nbytes
        return victims

    def expired(self, ledger: TierLedger, now: float, protect: Collection[str] = ()) -> list[str]:
        """Disk records past `disk_ttl_s` (oldest access first); [] without a TTL."""
        return self.disk_victims(ledger, 0, (), now, protect) if self.config.disk_ttl_s else []

    def prefetch(self, ledger: TierLedger, queue: Sequence[str]) -> list[str]:
        """Disk-only sessions to fetch disk->host now, in order (none by default)."""
        return []

    def host_free_target(self, ledger: TierLedger) -> int:
        """Free host bytes to keep: below this the store demotes ahead of need."""
        return int(self.config.host_free_threshold * ledger.host_bytes)

    def prefetch_window(self, ledger: TierLedger) -> int:
        """How many of the first queued sessions the prefetcher (and eviction) look at."""
        if self.config.prefetch_window is not None:
            return self.config.prefetch_window
        avg = ledger.mean_nbytes
        if avg <= 0:  # empty ledger (or only empty records): look at the next job at least
            return 1
        return max(1, int(ledger.host_bytes * self.config.prefetch_reserve_frac // avg))

    def protected(self, ledger: TierLedger, queue: Sequence[str]) -> set[str]:
        """Host copies the store should keep when it makes room for itself (threshold eviction,
        storing a finished job, loading or prefetching): none by default."""
        return set()

    def _expired(self, entry: LedgerEntry, now: float) -> bool:
        ttl = self.config.disk_ttl_s
        return ttl is not None and now - entry.last_access_s > ttl

    @abstractmethod
    def _host_key(self, ledger: TierLedger, queue: Sequence[str]) -> Callable[[LedgerEntry], tuple]:
        """Sort key: smaller is demoted from host first."""

    def _disk_key(self, ledger: TierLedger, queue: Sequence[str]) -> Callable[[LedgerEntry], tuple]:
        """Sort key: smaller is dropped from disk first (same order as host by default)."""
        return self._host_key(ledger, queue)


class LookaheadPolicy(CachePolicy):
    """Scheduler-aware: keeps what queued jobs need, most of all the next ones (the window)."""

    name = "lookahead"
    queue_last = True

    def _host_key(self, ledger: TierLedger, queue: Sequence[str]) -> Callable[[LedgerEntry], tuple]:
        # (0, lru) for sessions with no queued job, then (1, -position): farthest back first.
        # The window is the queue's front, so it is reached only when nothing else remains.
        pos = _positions(queue)
        return lambda e: (0, e.last_access_s, e.created_s) if e.session_id not in pos else (1, -pos[e.session_id], 0.0)

    def protected(self, ledger: TierLedger, queue: Sequence[str]) -> set[str]:
        """The prefetch window: demoting it would only undo the next prefetch."""
        return set(self._window(ledger, queue))

    def prefetch(self, ledger: TierLedger, queue: Sequence[str]) -> list[str]:
        window = self._window(ledger, queue)
        wanted = [sid for sid in window if _disk_only(ledger.entry(sid))]
        if not wanted:
            return []
        # room: free host plus the host copies that could be displaced without touching the window
        # (the budget less what the window holds)
        inside = set(window)
        room = ledger.host_bytes - sum(e.host_nbytes for sid in inside if (e := ledger.entry(sid)) and e.in_host)
        chosen = []
        for sid in wanted:  # queue order: stop at the first that does not fit (no overtaking)
            nbytes = ledger.entry(sid).disk_nbytes
            if nbytes > room:
                break
            chosen.append(sid)
            room -= nbytes
        return chosen

    def _window(self, ledger: TierLedger, queue: Sequence[str]) -> list[str]:
        """The first `prefetch_window` distinct queued sessions."""
        size = self.prefetch_window(ledger)
        window: dict[str, None] = {}
        for sid in queue:  # stop early: the queue can be far longer than the window
            if len(window) >= size:
                break
            window.setdefault(sid)
        return list(window)


class LRUPolicy(CachePolicy):
    name = "lru"

    def _host_key(self, ledger: TierLedger, queue: Sequence[str]) -> Callable[[LedgerEntry], tuple]:
        return lambda e: (e.last_access_s, e.created_s)


class FIFOPolicy(CachePolicy):
    name = "fifo"
    disk_order = "fifo"

    def _host_key(self, ledger: TierLedger, queue: Sequence[str]) -> Callable[[LedgerEntry], tuple]:
        return lambda e: (e.created_s, e.last_access_s)


_POLICIES: dict[str, type[CachePolicy]] = {"lookahead": LookaheadPolicy, "lru": LRUPolicy, "fifo": FIFOPolicy}


def make_policy(config: PolicyConfig) -> CachePolicy:
    """The policy named by `config.name`; ValueError for an unknown name."""
    cls = _POLICIES.get(config.name)
    if cls is None:  # PolicyConfig validates too; kept for configs built around __post_init__
        raise ValueError(f"unknown cache policy {config.name!r}; valid: {', '.join(POLICY_NAMES)}")
    return cls(config)


def _positions(queue: Sequence[str]) -> dict[str, int]:
    """First queue position of each session (a session may have several queued jobs)."""
    pos: dict[str, int] = {}
    for i, sid in enumerate(queue):
        pos.setdefault(sid, i)
    return pos


def _disk_only(entry: LedgerEntry | None) -> bool:
    return entry is not None and entry.in_disk and not entry.in_host


def _ordered(cands: list[LedgerEntry], key: Callable[[LedgerEntry], tuple]) -> Iterator[LedgerEntry]:
    """Candidates in key order, lazily (heap: only as many pops as victims are needed)."""
    heap = [(key(e), i, e) for i, e in enumerate(cands)]
    heapq.heapify(heap)
    while heap:
        yield heapq.heappop(heap)[2]


def _take(order: Iterable[LedgerEntry], short: int, size: Callable[[LedgerEntry], int]) -> list[str]:
    """Session ids from `order` until their bytes cover `short` (all of them if they never do)."""
    victims: list[str] = []
    if short <= 0:  # before touching `order`: building the heap is the costly part
        return victims
    for e in order:
        if short <= 0:
            break
        victims.append(e.session_id)
        short -= size(e)
    return victims
