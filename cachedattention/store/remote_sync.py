"""Keeps a replica's store and the shared remote tier in step: publishes each committed turn, and
adopts a session's record when another replica served it further.

Publishing runs on its own thread (a slow network never holds up saves or disk writes): a turn's
segments first, then the record naming them, so a record on the server only names segments that
were there when it was written. Adopting happens while a turn is planned (one small read of the
record, on the engine's thread, under a short timeout); the segments it lacks are fetched on a
second thread into the host tier. The turn is not admitted until they are there, or until
`remote_wait_s` has passed (then it recomputes what has not arrived); other requests are admitted
and running ones keep stepping meanwhile.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from cachedattention.store.remote import RemoteTier, block_keys
from cachedattention.store.segment import CorruptSegment, SegmentKV
from cachedattention.store.session import ANON_PREFIX, SessionRecord, Span, common_prefix, key_salt_tag, spans_while

if TYPE_CHECKING:
    from cachedattention.store.store import AttentionStore

log = logging.getLogger(__name__)

SAVE_WAIT_S = 30.0  # how long a publish waits for a turn's save to finish
PREFIX_TRIES = 2  # records read for one prompt's prefix (a block may name a record replaced since)
PUBLISHED_KEYS_KEPT = 10_000  # anonymous keys whose published blocks are remembered (the latest)


@dataclass
class RemoteStats:
    record_reads: int = 0
    records_adopted: int = 0  # sessions taken over from the remote store (served further elsewhere)
    records_published: int = 0
    records_superseded: int = 0  # not published: the server held a later turn of the session
    segments_published: int = 0
    segments_fetched: int = 0
    bytes_fetched: int = 0
    failed_fetches: int = 0  # gone from the server, unreachable, or failing a check


class RemoteSync:
    def __init__(self, store: AttentionStore, tier: RemoteTier, block: int) -> None:
        self.store = store
        self.tier = tier
        self.block = block  # tokens per block of the anonymous-prefix index
        self.stats = RemoteStats()
        self.fetching: dict[str, threading.Event] = {}  # segments on their way from remote (store lock)
        self.fresh: set[str] = set()  # fetched from remote, not yet reused by a turn: their hits count as remote
        self.landed = threading.Event()  # set whenever a fetch ends: an idle engine waits on it, not in a spin
        self._publish_q: queue.Queue = queue.Queue()
        self._blocks_published: OrderedDict[str, int] = OrderedDict()  # anonymous key -> its blocks on the server
        self._publish_queued: set[str] = set()
        self._fetch_q: queue.Queue = queue.Queue()
        self._threads = [
            threading.Thread(target=self._loop, args=(self._publish_q, self._publish), name="store-remote-publish", daemon=True),
            threading.Thread(target=self._loop, args=(self._fetch_q, self._fetch), name="store-remote-fetch", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- adopting another replica's turns ------------------------------------------------------------
    def read_record(self, key: str, strict: bool = False) -> SessionRecord | None:
        """The session's record on the remote store (None if none, or unreachable: `strict` raises
        OSError then). A session some replica forgot is dropped here too, if this replica's copy is
        older than the forgetting. Not under the store lock."""
        self.stats.record_reads += 1
        try:
            body = self.tier.get_record(key)
        except OSError as e:  # the tier warns once and pauses its calls
            if strict:
                raise
            log.debug("store: reading session %r's remote record failed (%s)", key, e)
            return None
        if body is None:
            return None
        if body.get("forgotten"):
            self.store.forgotten_elsewhere(key, body.get("stamp"))
            return None
        try:
            rec = SessionRecord.from_json(body)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("store: the remote record of session %r is malformed (%s); not served", key, e)
            return None
        rec.key = key
        return rec

    def read_prefix(self, prompt: list[int], tag: str = "") -> SessionRecord | None:
        """The anonymous record (any replica's) of the salt tagged `tag` that shares the longest
        block-aligned prefix with the prompt, verified token by token; None if none (or unreachable).
        Not under the store lock."""
        keys = block_keys(prompt[: len(prompt) - 1], self.block, tag)  # one token is always computed
        if not keys:
            return None
        try:
            owners = self.tier.block_owners(keys)
        except OSError as e:
            log.debug("store: looking up the prompt's prefix on the remote store failed (%s)", e)
            return None
        tried = set()
        for owner in reversed(owners):  # the deepest block first; a record replaced since is skipped
            if owner is None or owner in tried or len(tried) >= PREFIX_TRIES:
                continue
            tried.add(owner)
            rec = self.read_record(owner)
            ok = rec is not None and rec.key.startswith(ANON_PREFIX) and key_salt_tag(rec.key) == tag and not rec.truncated
            if ok and common_prefix(rec.logical, prompt) >= self.block:
                return rec
        return None

    def adopt(self, key: str, remote: SessionRecord) -> None:
        """Make the remote record the session's (the caller found it matches the prompt further) and
        start fetching the segments this replica lacks. Under the store lock."""
        store = self.store
        remote.key = key
        store._replace_record(remote)  # an anonymous record: its prefix is found from now on
        self.stats.records_adopted += 1
        for seg in remote.segment_ids():
            if store._tier_of(seg) is None and seg not in self.fetching:
                self.fetching[seg] = threading.Event()
                self._fetch_q.put(seg)
        if store.disk is not None:
            store._io.put(("record", key))

    def pending(self, spans: Sequence[Span]) -> bool:
        """Whether a segment of these spans is still on its way from remote."""
        with self.store._lock:
            return any(s.seg_id in self.fetching for s in spans)

    def wait_landed(self, timeout: float) -> None:
        """Nothing else to do: wait (at most `timeout`) until a fetch ends."""
        if self.fetching and self.landed.wait(timeout):
            self.landed.clear()

    def _fetch(self, seg_id: str) -> None:
        kv = None
        try:
            kv = self._read_segment(seg_id)
        finally:  # whatever happened, the segment is no longer on its way: turns waiting for it go on
            self._land(seg_id, kv)

    def _read_segment(self, seg_id: str) -> SegmentKV | None:
        kv = None
        try:
            kv = self.tier.get(seg_id)
            if kv is None:
                log.info("store: segment %s is gone from the remote store (evicted); recomputing from there", seg_id)
        except CorruptSegment as e:
            log.warning("store: remote segment %s is corrupt (%s); deleting it and recomputing from there", seg_id, e)
            self.store.stats.corrupt_segments += 1
            try:
                self.tier.evict(seg_id)
            except OSError:
                pass  # the tier warned; the next replica to read it finds it corrupt too
        except OSError as e:
            log.debug("store: fetching segment %s from the remote store failed (%s)", seg_id, e)
        return self.store.host.pinned(kv) if kv is not None else None  # on CUDA: not under the lock

    def _land(self, seg_id: str, kv: SegmentKV | None) -> None:
        """Place a fetched segment (if it is still named and not held); end its wait in any case."""
        with self.store._lock:
            done = self.fetching.pop(seg_id, None)
            try:
                if kv is None:
                    self.stats.failed_fetches += 1
                    self.store.cut_records_at(seg_id)  # nothing names what cannot be had
                elif seg_id in self.store._refs and self.store._tier_of(seg_id) is None and self.store._place(seg_id, kv):
                    self.fresh.add(seg_id)
                    self.stats.segments_fetched += 1
                    self.stats.bytes_fetched += kv.nbytes
            finally:
                if done is not None:
                    done.set()
                self.landed.set()

    def used(self, spans: Sequence[Span]) -> None:
        """A turn reused these spans: later hits on them are this replica's own. Under the store lock."""
        for s in spans:
            self.fresh.discard(s.seg_id)

    def forget(self, seg_id: str) -> None:
        self.fresh.discard(seg_id)

    def forget_session(self, key: str, records: Sequence[SessionRecord | None], stamp: float) -> None:
        """Replace the session's record on the server with a tombstone stamped `stamp` (other
        replicas drop their copies at their next turn of it; a turn planned before it, still running
        anywhere, is refused when it publishes) and delete the segments these records name. Not
        under the store lock; OSError when the server cannot be reached."""
        segs = list(dict.fromkeys(seg for rec in records if rec is not None for seg in rec.segment_ids()))
        self.tier.put_record(key, {"forgotten": True, "stamp": stamp})  # unless a turn planned later is there
        self.tier.drop_segments(segs)

    # -- publishing this replica's turns -------------------------------------------------------------
    def publish(self, key: str) -> None:
        """Queue the session's record for publishing (after its segments). Under the store lock."""
        if key not in self._publish_queued:
            self._publish_queued.add(key)
            self._publish_q.put(key)

    def _publish(self, key: str) -> None:
        store = self.store
        with store._lock:
            self._publish_queued.discard(key)
            rec = store.records.get(key)
            if rec is None:
                return
            rec = replace(rec, logical=list(rec.logical), spans=list(rec.spans))  # (a copy to read unlocked)
        segs = rec.segment_ids()
        for seg in segs:
            store.wait_saved(seg, SAVE_WAIT_S)
        uploaded: list[str] = []
        try:
            on_server = dict(zip(segs, self.tier.contains_many(segs)))
            for seg in segs:
                if on_server[seg]:
                    continue
                kv = self._local_copy(seg)
                if kv is None:
                    break
                self.tier.put(seg, kv)
                uploaded.append(seg)
                on_server[seg] = True
                self.stats.segments_published += 1
            kept = spans_while(rec.spans, on_server.__getitem__)
            if not kept:
                return
            rec.spans = kept
            if self.tier.put_record(key, rec.to_json()):
                self.stats.records_published += 1
                if key.startswith(ANON_PREFIX):  # its blocks lead other replicas' prompts to it
                    if any(seg != segs[-1] for seg in uploaded):  # the server lost earlier ones (flushed,
                        self._blocks_published.pop(key, None)  # restarted empty): their blocks' keys too
                    self._publish_blocks(key, rec)
            else:  # a later turn (or the session's forgetting) is there: what this one uploaded is no one's
                self.stats.records_superseded += 1
                self.tier.drop_segments(uploaded)
        except OSError as e:  # the tier warns once and pauses its calls; the next turn publishes again
            log.debug("store: publishing session %r failed (%s)", key, e)

    def _publish_blocks(self, key: str, rec: SessionRecord) -> None:
        """The record's blocks not published under this key before (an extended record: its new ones)."""
        blocks = block_keys(rec.logical[: rec.num_kv], self.block, key_salt_tag(key))
        done = self._blocks_published.pop(key, 0)
        self.tier.put_block_owners(blocks[done:], key)
        self._blocks_published[key] = len(blocks)
        while len(self._blocks_published) > PUBLISHED_KEYS_KEPT:
            self._blocks_published.popitem(last=False)

    def _local_copy(self, seg_id: str) -> SegmentKV | None:
        store = self.store
        with store._lock:
            kv = store.host.get(seg_id)
            on_disk = store.disk is not None and store.disk.contains(seg_id)
        if kv is not None and kv.layers is not None:  # whole or not at all: other replicas' loads may read every layer
            kv = None
        if kv is None and on_disk:
            try:
                kv = store.disk.get(seg_id)
            except (CorruptSegment, OSError) as e:
                log.debug("store: segment %s not published: its disk copy cannot be read (%s)", seg_id, e)
        if kv is not None and kv.layers is not None:
            log.debug("store: segment %s not published: no copy of it holds its windowed layers", seg_id)
            return None
        return kv

    # -- threads -------------------------------------------------------------------------------------
    def _loop(self, jobs: queue.Queue, run) -> None:
        while True:
            job = jobs.get()
            try:
                if job is None:
                    return
                run(job)
            except Exception:  # a thread must survive any single failure
                log.exception("store: remote job %s failed", job)
            finally:
                jobs.task_done()

    def join(self) -> None:
        """Wait until every queued publish and fetch is done (flush, tests)."""
        self._fetch_q.join()
        self._publish_q.join()

    def summary(self) -> dict:
        s = self.stats
        return {
            "remote_record_reads": s.record_reads,
            "remote_records_adopted": s.records_adopted,
            "remote_records_published": s.records_published,
            "remote_records_superseded": s.records_superseded,
            "remote_segments_published": s.segments_published,
            "remote_segments_fetched": s.segments_fetched,
            "remote_bytes_fetched": s.bytes_fetched,
            "remote_failed_fetches": s.failed_fetches,
            **self.tier.stats(),
        }

    def check_integrity(self) -> None:
        with self.store._lock:
            for seg in self.fresh:
                if seg not in self.store._refs:
                    raise RuntimeError(f"remote sync: fetched segment {seg} is named by no record")
        self.tier.check_integrity()

    def close(self) -> None:
        for q in (self._publish_q, self._fetch_q):
            q.put(None)
        for t in self._threads:
            t.join(timeout=10)
        self.tier.close()
