"""Byte ledger of the store tiers: which tier(s) hold each session's KV, within budgets.

The ledger only does accounting; it never decides what to evict (that is the policy's
job, see `policy.py`) and never moves bytes (that is the store's). Every mutation keeps
`host_used <= host_bytes` and `disk_used <= disk_bytes`; a put that would not fit raises
ValueError, so callers make room first.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass
class LedgerEntry:
    """What the ledger knows about one session's stored KV."""

    session_id: str
    nbytes: int  # the session's KV bytes (all its tokens)
    in_host: bool
    in_disk: bool
    created_s: float  # first put (FIFO order)
    last_access_s: float  # last lookup/put (LRU order)
    host_nbytes: int = 0  # bytes of the host copy (== nbytes unless the copies differ)
    disk_nbytes: int = 0  # bytes of the disk copy
    seq: int = 0  # when it entered the ledger: sessions() order, which host_sessions() keeps


# the orders disk_in_order() keeps: an entry's key in each (ties: the ledger's own order, seq)
DISK_ORDERS: dict[str, Callable[[LedgerEntry], tuple]] = {
    "lru": lambda e: (e.last_access_s, e.created_s),
    "fifo": lambda e: (e.created_s, e.last_access_s),
}


class TierLedger:
    """Byte accounting of which tier(s) hold each session's KV. Never exceeds its budgets.

    A session may be in host only (not yet written back), disk only, or both (a host copy
    of a disk record). An entry with neither copy is removed.
    """

    def __init__(self, host_bytes: int, disk_bytes: int) -> None:
        if host_bytes < 0 or disk_bytes < 0:
            raise ValueError(f"tier budgets must be >= 0 bytes, got host={host_bytes} disk={disk_bytes}")
        self.host_bytes = int(host_bytes)
        self.disk_bytes = int(disk_bytes)
        self._entries: dict[str, LedgerEntry] = {}
        # the entries with a host copy: host eviction and prefetch look only at these, not at every
        # disk record (a disk tier may hold a hundred times the segments host does)
        self._in_host: dict[str, LedgerEntry] = {}
        self._next_seq = 0
        # per order asked for: a heap of (key, seq, id) over the disk copies, kept across calls (a full
        # disk makes room at every write: ordering every segment each time cost ~2 us a segment);
        # an entry's old items stay until popped, and are then skipped as stale
        self._disk_heaps: dict[str, list[tuple[tuple, int, str]]] = {}
        self._host_used = 0
        self._disk_used = 0
        self._nbytes_sum = 0  # sum of entry.nbytes, for mean_nbytes in O(1)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def host_used(self) -> int:
        return self._host_used

    @property
    def disk_used(self) -> int:
        return self._disk_used

    @property
    def host_free(self) -> int:
        return self.host_bytes - self._host_used

    @property
    def disk_free(self) -> int:
        return self.disk_bytes - self._disk_used

    @property
    def mean_nbytes(self) -> float:
        """Average session size (0.0 when empty): sizes the prefetch window."""
        return self._nbytes_sum / len(self._entries) if self._entries else 0.0

    # ---- queries -----------------------------------------------------------------------
    def entry(self, session_id: str) -> LedgerEntry | None:
        return self._entries.get(session_id)

    def sessions(self) -> list[LedgerEntry]:
        """All entries, in insertion order (a copy of the list; entries are live)."""
        return list(self._entries.values())

    def host_sessions(self) -> list[LedgerEntry]:
        """The entries with a host copy, in insertion order (as sessions() lists them)."""
        return sorted(self._in_host.values(), key=lambda e: e.seq)

    def disk_in_order(self, order: str) -> Iterator[LedgerEntry]:
        """The entries with a disk copy in DISK_ORDERS[order]'s order (ties in insertion order),
        lazily: a caller that stops early pays for what it read. Do not mutate the ledger while
        iterating; what was read is put back when the iteration ends."""
        heap = self._disk_heap(order)
        key = DISK_ORDERS[order]
        read: dict[str, LedgerEntry] = {}
        try:
            while heap:
                k, seq, sid = heapq.heappop(heap)
                e = self._entries.get(sid)
                if e is None or not e.in_disk or e.seq != seq or key(e) != k or sid in read:
                    continue  # stale (dropped, re-entered, touched since) or a duplicate
                read[sid] = e
                yield e
        finally:
            for e in read.values():  # (still valid for later calls; a victim the caller drops goes stale)
                heapq.heappush(heap, (key(e), e.seq, e.session_id))

    def _disk_heap(self, order: str) -> list[tuple[tuple, int, str]]:
        heap = self._disk_heaps.get(order)
        return self._rebuilt(order) if heap is None else heap

    def _rebuilt(self, order: str) -> list[tuple[tuple, int, str]]:
        """The order's heap made anew from the entries (first use, or mostly stale items)."""
        key = DISK_ORDERS[order]
        heap = [(key(e), e.seq, e.session_id) for e in self._entries.values() if e.in_disk]
        heapq.heapify(heap)
        self._disk_heaps[order] = heap
        return heap

    def _note_disk_key(self, entry: LedgerEntry) -> None:
        """An entry's disk copy came, or its key changed: its new place in each kept order (a heap
        grown to twice the entries is rebuilt, so that touches between reads cannot grow it unbounded)."""
        if entry.in_disk:
            for order, heap in self._disk_heaps.items():
                heapq.heappush(heap, (DISK_ORDERS[order](entry), entry.seq, entry.session_id))
                if len(heap) > 2 * len(self._entries) + 64:
                    self._rebuilt(order)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._entries

    # ---- mutations ---------------------------------------------------------------------
    def put_host(self, session_id: str, nbytes: int, now: float, *, touch: bool = True) -> None:
        """Add or replace the host copy. ValueError if it does not fit (make room first).

        `touch=False` for moves that are not accesses (prefetch), so LRU order stays true.
        """
        entry = self._prepare_put(session_id, nbytes, now, "host")
        old = entry.host_nbytes if entry.in_host else 0
        if nbytes - old > self.host_free:
            raise ValueError(
                f"host tier: {session_id!r} needs {nbytes - old} more bytes, only {self.host_free} "
                f"of {self.host_bytes} free; evict first"
            )
        self._host_used += nbytes - old
        entry.in_host, entry.host_nbytes = True, nbytes
        self._commit_put(entry, nbytes, now, touch)
        self._in_host[session_id] = entry

    def put_disk(self, session_id: str, nbytes: int, now: float, *, touch: bool = True) -> None:
        """Add or replace the disk copy. ValueError if it does not fit (make room first).

        `touch=False` for moves that are not accesses (write-back on eviction).
        """
        entry = self._prepare_put(session_id, nbytes, now, "disk")
        old = entry.disk_nbytes if entry.in_disk else 0
        if nbytes - old > self.disk_free:
            raise ValueError(
                f"disk tier: {session_id!r} needs {nbytes - old} more bytes, only {self.disk_free} "
                f"of {self.disk_bytes} free; evict first"
            )
        self._disk_used += nbytes - old
        was_on_disk = entry.in_disk
        entry.in_disk, entry.disk_nbytes = True, nbytes
        self._commit_put(entry, nbytes, now, touch)
        if not was_on_disk:
            self._note_disk_key(entry)

    def drop_host(self, session_id: str) -> None:
        """Remove the host copy (the disk copy, if any, stays)."""
        entry = self._require(session_id)
        if not entry.in_host:
            raise ValueError(f"session {session_id!r} has no host copy to drop")
        self._host_used -= entry.host_nbytes
        entry.in_host, entry.host_nbytes = False, 0
        del self._in_host[session_id]
        self._settle(entry)

    def drop_disk(self, session_id: str) -> None:
        """Remove the disk copy (the host copy, if any, stays)."""
        entry = self._require(session_id)
        if not entry.in_disk:
            raise ValueError(f"session {session_id!r} has no disk copy to drop")
        self._disk_used -= entry.disk_nbytes
        entry.in_disk, entry.disk_nbytes = False, 0
        self._settle(entry)

    def forget(self, session_id: str) -> None:
        """Drop the session from both tiers."""
        entry = self._require(session_id)
        self._host_used -= entry.host_nbytes if entry.in_host else 0
        self._disk_used -= entry.disk_nbytes if entry.in_disk else 0
        self._nbytes_sum -= entry.nbytes
        del self._entries[session_id]
        self._in_host.pop(session_id, None)

    def touch(self, session_id: str, now: float) -> None:
        """Record an access (lookup) for LRU order."""
        entry = self._require(session_id)
        if entry.last_access_s != now:
            entry.last_access_s = now
            self._note_disk_key(entry)

    def check_integrity(self) -> None:
        """Recompute used bytes from the entries; RuntimeError with detail on any mismatch."""
        host = sum(e.host_nbytes for e in self._entries.values() if e.in_host)
        disk = sum(e.disk_nbytes for e in self._entries.values() if e.in_disk)
        problems = []
        if sum(e.nbytes for e in self._entries.values()) != self._nbytes_sum:
            problems.append(f"nbytes sum {self._nbytes_sum} does not match the entries")
        if host != self._host_used:
            problems.append(f"host_used={self._host_used} but entries hold {host}")
        if disk != self._disk_used:
            problems.append(f"disk_used={self._disk_used} but entries hold {disk}")
        if host > self.host_bytes:
            problems.append(f"host holds {host} > budget {self.host_bytes}")
        if disk > self.disk_bytes:
            problems.append(f"disk holds {disk} > budget {self.disk_bytes}")
        if self._in_host != {sid: e for sid, e in self._entries.items() if e.in_host}:
            problems.append("the host index does not list exactly the entries with a host copy")
        for sid, e in self._entries.items():
            if sid != e.session_id:
                problems.append(f"entry keyed {sid!r} names {e.session_id!r}")
            if not (e.in_host or e.in_disk):
                problems.append(f"{sid!r} is in no tier")
            if (not e.in_host and e.host_nbytes) or (not e.in_disk and e.disk_nbytes):
                problems.append(f"{sid!r} counts bytes for a tier it is not in")
        if problems:
            raise RuntimeError("ledger integrity: " + "; ".join(problems))

    # ---- helpers -----------------------------------------------------------------------
    def _require(self, session_id: str) -> LedgerEntry:
        entry = self._entries.get(session_id)
        if entry is None:
            raise ValueError(f"unknown session {session_id!r} (not in the ledger)")
        return entry

    def _prepare_put(self, session_id: str, nbytes: int, now: float, tier: str) -> LedgerEntry:
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ValueError(f"{tier} tier: nbytes must be an int >= 0, got {nbytes!r}")
        entry = self._entries.get(session_id)
        if entry is None:  # not inserted until the put succeeds (see _commit_put)
            entry = LedgerEntry(session_id, 0, False, False, now, now)
        return entry

    def _commit_put(self, entry: LedgerEntry, nbytes: int, now: float, touch: bool) -> None:
        if entry.session_id not in self._entries:
            entry.seq, self._next_seq = self._next_seq, self._next_seq + 1
            self._entries[entry.session_id] = entry
        self._set_nbytes(entry, nbytes)  # the newest copy defines the session's size
        if touch and entry.last_access_s != now:
            entry.last_access_s = now
            self._note_disk_key(entry)

    def _settle(self, entry: LedgerEntry) -> None:
        if not (entry.in_host or entry.in_disk):
            self._nbytes_sum -= entry.nbytes
            del self._entries[entry.session_id]
        else:  # the surviving copy defines the session's size
            self._set_nbytes(entry, entry.host_nbytes if entry.in_host else entry.disk_nbytes)

    def _set_nbytes(self, entry: LedgerEntry, nbytes: int) -> None:
        self._nbytes_sum += nbytes - entry.nbytes
        entry.nbytes = nbytes
