"""The remote tier: segments and session records in a Redis-protocol store shared by replicas.

Any server that speaks Redis's protocol serves (Redis, Valkey, KeyDB, Dragonfly); its own memory
limit and eviction (e.g. `maxmemory` with `allkeys-lru`) are the tier's budget. Keys are namespaced
by a hash of the model fingerprint, and every value carries the fingerprint and its checksums, so
replicas of another model, or a damaged value, are never served. The store calls this tier from
its own threads only; after a failed call, calls pause for a few seconds (the replica serves from
its local tiers meanwhile) instead of waiting for a timeout on every turn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
from collections import OrderedDict

from cachedattention.store import segment_format
from cachedattention.store.remote_url import check_remote_url
from cachedattention.store.segment import KVLayout, SegmentKV
from cachedattention.store.write_pause import WritePause

log = logging.getLogger(__name__)

_CHECKED_WRITES = 4096  # the latest writes check_integrity() verifies
RECORD_READ_TIMEOUT_S = 0.25  # the engine's thread reads records: a hung server holds it at most this long


def block_keys(tokens: list[int], block: int, tag: str = "") -> list[str]:
    """Chained hashes of the full blocks of `tokens`, the same in every process and on every machine
    (Python's hash() is not promised to be): a prompt's blocks find the records that share them. The
    chain starts from a salted prefix's tag (store.session.salt_tag), so only its salt's prompts find it."""
    out, chain = [], tag.encode()
    for lo in range(0, len(tokens) - block + 1, block):
        chain = hashlib.blake2b(chain + struct.pack(f"<{block}q", *tokens[lo : lo + block]), digest_size=16).digest()
        out.append(chain.hex())
    return out


class RemoteError(OSError):
    """A call to the remote store failed (down, unreachable, timed out, refused the value)."""


def connect(url: str, timeout_s: float):
    """A client of the server at `url` (nothing is sent yet)."""
    check_remote_url(url)
    try:
        import redis
    except ImportError as e:
        raise ValueError(
            "the remote tier needs the `redis` client: pip install 'cachedattention[remote]' (or pip install redis)"
        ) from e
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


class RemoteTier:
    """contains / put / get / evict / stats over segments (and session records) in a shared store.

    Contract: `put` stores a segment under its id (every value self-checking: header, segment id,
    fingerprint, per-layer checksums); `get` returns it, None if the store does not hold it (never
    stored, or evicted by the server), or raises CorruptSegment if its value fails a check; `evict`
    deletes it. A record is replaced only by a newer one (its `stamp`). Every call that cannot reach
    the store raises RemoteError (an OSError). The budget is the server's: this tier holds no bytes
    of its own. Checksums catch damage, not forgery: whoever may write to the server is trusted.
    """

    def __init__(
        self,
        url: str,
        fingerprint: str,
        layout: KVLayout,
        *,
        timeout_s: float = 2.0,
        ttl_s: float | None = None,
        namespace: str = "cachedattention",
        client=None,
    ) -> None:
        self.url = url
        self.fingerprint = fingerprint
        self.layout = layout
        self.ttl_ms = int(ttl_s * 1000) if ttl_s is not None else None
        self.client = client if client is not None else connect(url, timeout_s)
        # records are read on the engine's thread while it plans a turn: a hung server may hold it this long
        self.record_client = client if client is not None else connect(url, min(timeout_s, RECORD_READ_TIMEOUT_S))
        self.prefix = f"{namespace}:{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}"
        # reads and writes pause apart: a server refusing writes (out of memory) still serves reads
        self.reads = WritePause(what="remote store read", meanwhile="turns are served from the local tiers")
        # a record read's short timeout must not pause the segment fetches of a server that is only slow
        self.record_reads = WritePause(what="remote record read", meanwhile="sessions are not taken from it")
        self.writes = WritePause(what="remote store write", meanwhile="turns are not shared meanwhile")
        self.bytes_written = 0
        self.bytes_read = 0
        self._lock = threading.Lock()  # _written: the publish and fetch threads change it, tests read it
        self._written: OrderedDict[str, int] = OrderedDict()  # segment key -> value size, the latest writes

    # -- keys -----------------------------------------------------------------------------------
    def segment_key(self, seg_id: str) -> str:
        # the format's version in the key: replicas of another version (a rolling upgrade) miss
        # each other's values, rather than finding them unreadable and deleting them as corrupt
        return f"{self.prefix}:seg{segment_format.VERSION}:{seg_id}"

    def record_key(self, key: str) -> str:
        return f"{self.prefix}:rec:{key}"

    def block_key(self, block_hash: str) -> str:
        return f"{self.prefix}:blk:{block_hash}"

    # -- calls ----------------------------------------------------------------------------------
    def _call(self, pause: WritePause, fn, *args, **kwargs):
        pause.check()  # raises while paused (an OSError), without waiting for a timeout
        import redis  # connect() imported it already

        try:
            result = fn(*args, **kwargs)
        except (redis.RedisError, OSError) as e:
            pause.failed(e)
            raise RemoteError(f"remote store {self.url}: {e}") from e
        pause.succeeded()
        return result

    # -- segments -------------------------------------------------------------------------------
    def contains_many(self, seg_ids: list[str]) -> list[bool]:
        """Which segments the server holds; with a TTL, their expiry starts over (a session's first
        segments live as long as its latest)."""
        pipe = self.client.pipeline(transaction=False)
        for seg in seg_ids:
            if self.ttl_ms is None:
                pipe.exists(self.segment_key(seg))
            else:
                pipe.pexpire(self.segment_key(seg), self.ttl_ms)  # 0 when the key is not there
        return [bool(n) for n in self._call(self.reads, pipe.execute)]

    def contains(self, seg_id: str) -> bool:
        return self.contains_many([seg_id])[0]

    def put(self, seg_id: str, kv: SegmentKV) -> int:
        """Store a segment; its value's size."""
        value = segment_format.encode_bytes(seg_id, kv, self.fingerprint, self.layout)
        key = self.segment_key(seg_id)
        self._call(self.writes, self.client.set, key, value, px=self.ttl_ms)
        with self._lock:
            self.bytes_written += len(value)
            self._written[key] = len(value)
            self._written.move_to_end(key)
            while len(self._written) > _CHECKED_WRITES:
                self._written.popitem(last=False)
        return len(value)

    def get(self, seg_id: str) -> SegmentKV | None:
        value = self._call(self.reads, self.client.get, self.segment_key(seg_id))
        if value is None:
            return None
        with self._lock:
            self.bytes_read += len(value)
        return segment_format.decode_bytes(value, seg_id, self.fingerprint, self.layout, f"remote segment {seg_id}")

    def evict(self, seg_id: str) -> None:
        self._call(self.writes, self.client.delete, self.segment_key(seg_id))
        with self._lock:
            self._written.pop(self.segment_key(seg_id), None)

    # -- session records ------------------------------------------------------------------------
    def put_record(self, key: str, body: dict) -> bool:
        """Store the session's record unless the server holds a newer one (a later turn another
        replica published while this one was on its way); whether it was stored."""
        name = self.record_key(key)
        value = json.dumps({**body, "fingerprint": self.fingerprint}).encode()

        def newest_wins(pipe) -> bool:
            held = pipe.get(name)  # WATCHed: a write by anyone until EXEC makes the transaction retry
            if held is not None and _stamp(held) > body["stamp"]:
                return False
            pipe.multi()
            pipe.set(name, value, px=self.ttl_ms)
            return True

        stored = self._call(self.writes, self.client.transaction, newest_wins, name, value_from_callable=True)
        if stored:
            with self._lock:
                self.bytes_written += len(value)
        return stored

    def get_record(self, key: str) -> dict | None:
        """The session's record as another replica (or this one) last published it; None if there is
        none, or if it is not a record of this model (a warning: a damaged value is not served)."""
        value = self._call(self.record_reads, self.record_client.get, self.record_key(key))
        if value is None:
            return None
        try:
            body = json.loads(value)
            if not isinstance(body, dict) or body.get("fingerprint") != self.fingerprint:
                raise ValueError("model fingerprint differs")
            return body
        except ValueError as e:
            log.warning("store: the remote record of session %r is unreadable (%s); not served", key, e)
            return None

    def drop_segments(self, seg_ids: list[str]) -> None:
        """Delete these segments (a client asked to forget their conversation)."""
        names = [self.segment_key(s) for s in seg_ids]
        if names:
            self._call(self.writes, self.client.delete, *names)
        with self._lock:
            for name in names:
                self._written.pop(name, None)

    # -- the anonymous-prefix index: block hash -> the anonymous record whose prefix it ends ------
    def put_block_owners(self, hashes: list[str], key: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        for h in hashes:
            pipe.set(self.block_key(h), key, px=self.ttl_ms)
        self._call(self.writes, pipe.execute)

    def block_owners(self, hashes: list[str]) -> list[str | None]:
        """Each block's record key (None where no replica published one); one round trip, on the
        engine's thread (the record reads' short timeout)."""
        values = self._call(self.record_reads, self.record_client.mget, [self.block_key(h) for h in hashes])
        return [v.decode() if isinstance(v, bytes) else v for v in values]

    # -- stored responses (the Responses API): a conversation continued on any replica ------------
    def response_key(self, response_id: str) -> str:
        return f"{self.prefix}:resp:{response_id}"

    def put_response(self, response_id: str, value: bytes) -> None:
        self._call(self.writes, self.client.set, self.response_key(response_id), value, px=self.ttl_ms)
        with self._lock:
            self.bytes_written += len(value)

    def get_response(self, response_id: str) -> bytes | None:
        value = self._call(self.reads, self.client.get, self.response_key(response_id))
        if value is not None:
            with self._lock:
                self.bytes_read += len(value)
        return value

    def delete_response(self, response_id: str) -> bool:
        """Whether the server held it."""
        return bool(self._call(self.writes, self.client.delete, self.response_key(response_id)))

    # -- accounting -----------------------------------------------------------------------------
    def footprint(self) -> int:
        """Bytes of every value of this namespace and model on the server (every replica's)."""
        keys = list(self.client.scan_iter(match=f"{self.prefix}:*", count=1000))
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.strlen(key)
        return sum(self._call(self.reads, pipe.execute)) if keys else 0

    def drop_all(self) -> None:
        """Delete every value of this namespace and model (a benchmark's run, once it is over)."""
        keys = list(self.client.scan_iter(match=f"{self.prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            self._call(self.writes, self.client.delete, *keys[i : i + 1000])
        with self._lock:
            self._written.clear()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "remote_bytes_written": self.bytes_written,
                "remote_bytes_read": self.bytes_read,
                "remote_failed_calls": self.reads.failures + self.record_reads.failures + self.writes.failures,
            }

    def check_integrity(self) -> None:
        """Each of this tier's latest segment writes is on the server at the size written, or gone
        (evicted or expired by the server)."""
        with self._lock:
            written = list(self._written.items())
        pipe = self.client.pipeline(transaction=False)
        for key, _ in written:
            pipe.strlen(key)
        try:
            sizes = self._call(self.reads, pipe.execute)
        except OSError:  # unreachable: nothing to check (what the replica serves comes from its local tiers)
            return
        for (key, size), now in zip(written, sizes):
            if now not in (0, size):
                raise RuntimeError(f"remote tier: {key} holds {now} bytes, {size} were written")

    def close(self) -> None:
        for client in {id(c): c for c in (self.client, self.record_client)}.values():
            try:
                client.close()
            except Exception as e:  # closing must never fail a shutdown
                log.debug("store: closing the remote client failed (%s)", e)


def _stamp(value: bytes) -> float:
    """A stored record's stamp (0 for one without, or unreadable: any record may replace it)."""
    try:
        stamp = json.loads(value).get("stamp", 0.0)
        return float(stamp) if isinstance(stamp, (int, float)) else 0.0
    except (ValueError, AttributeError):
        return 0.0
