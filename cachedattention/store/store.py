"""AttentionStore: session records and their KV segments across the host and disk tiers.

Thread model: the engine thread plans turns and commits records; the save thread adds
segments; the I/O thread writes through to disk and prefetches. One lock guards the metadata;
big copies and write-through files happen outside it (write-backs on eviction, rarer, under it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cachedattention.config import StoreConfig
from cachedattention.kvcache.hashing import block_hashes
from cachedattention.store.disk import DiskTier
from cachedattention.store.fresh_thread import call_in_fresh_thread
from cachedattention.store.host import HostTier
from cachedattention.store.ledger import TierLedger
from cachedattention.store.policy import PolicyConfig, make_policy
from cachedattention.store.remote import RemoteTier
from cachedattention.store.remote_sync import RemoteSync
from cachedattention.store.segment import CorruptSegment, KVLayout, SegmentKV
from cachedattention.store.session import (
    ANON_PREFIX,
    BRANCH_SEP,
    SessionRecord,
    Span,
    TurnPlan,
    branch_of,
    common_prefix,
    key_salt_tag,
    plan_turn,
    salt_tag,
    spans_while,
)

log = logging.getLogger(__name__)

ANON_BLOCK = 16  # tokens per block of the anonymous-prefix index
FORGOTTEN_KEPT = 100_000  # sessions whose forgetting time is remembered (turns begun before it are not kept)


@dataclass
class StoreStats:
    lookups: int = 0
    hit_tokens: dict[str, int] = field(default_factory=lambda: {"host": 0, "disk": 0, "remote": 0})
    lookup_tokens: int = 0
    host_evictions: int = 0
    disk_evictions: int = 0
    bytes_saved: int = 0
    bytes_loaded: dict[str, int] = field(default_factory=lambda: {"host": 0, "disk": 0})
    bytes_written_disk: int = 0
    bytes_prefetched: int = 0
    corrupt_segments: int = 0
    preloads: int = 0  # queue heads loaded into the device read buffer before admission
    threshold_demotions: int = 0  # host -> disk moves made ahead of need (free host under the threshold)
    expired_segments: int = 0  # segments forgotten by the disk TTL
    sessions_forgotten: int = 0  # sessions a client asked to forget
    windowed_bytes_dropped: int = 0  # host bytes freed by dropping windowed layers past every window


class AttentionStore:
    def __init__(self, config: StoreConfig, layout: KVLayout, fingerprint: str, pin: bool,
                 windowed: frozenset[int] = frozenset(), window_reach: int = 0) -> None:  # fmt: skip
        """`windowed`: the layers with a sliding window; `window_reach`: how far back from a turn's
        first new token a load reads them (the window and a page)."""
        self.config = config
        self.layout = layout
        self.fingerprint = fingerprint
        self.windowed = windowed if config.windowed_history != "keep" else frozenset()
        self.window_reach = window_reach
        self.host = HostTier(config.host_bytes, pin)
        self.disk = DiskTier(config.store_dir, config.disk_bytes, fingerprint, layout) if config.store_dir else None
        self.ledger = TierLedger(config.host_bytes, config.disk_bytes if self.disk else 0)
        self.policy = make_policy(
            PolicyConfig(
                name=config.policy,
                prefetch_window=config.prefetch_window,
                host_free_threshold=config.host_free_threshold,
                disk_ttl_s=config.disk_ttl_s,
            )
        )
        self.records: dict[str, SessionRecord] = {}
        self._namers: dict[str, set[str]] = {}  # segment -> keys of the records that name it
        self._branches: dict[str, list[str]] = {}  # session -> keys of its kept earlier branches, oldest first
        self._maybe_lost: set[str] = set()  # segments that may have left every tier (settled at the next step)
        self._windowless: set[str] = set()  # segments a copy of which lacks the windowed layers
        self._window_candidates: set[str] = set()  # segments of records just committed, maybe past every window
        self._refs: dict[str, int] = {}  # segment -> spans of records and plans in flight that name it
        self._pending: dict[str, threading.Event] = {}  # segments whose save is still running (write buffer)
        self._anon: dict[int, dict[str, None]] = {}  # block hash -> keys of the anonymous records there, latest last
        self._forgotten: list[str] = []  # sessions another replica forgot, their device blocks still to drop
        self._forgotten_at: OrderedDict[str, float] = OrderedDict()  # when sessions were forgotten (the latest)
        self._queue_keys: list[str] = []
        self._lock = threading.RLock()
        self.stats = StoreStats()
        self._io: queue.Queue = queue.Queue()
        self._fetching: set[str] = set()
        self._writing: set[str] = set()  # segments the I/O thread is writing through, outside the lock
        self._trim_queued = False
        self._next_expiry_s = 0.0  # monotonic time of the next TTL sweep
        # the remote client first: without the redis package it raises before any thread starts
        tier = None
        try:
            if config.remote_url is not None:
                tier = RemoteTier(config.remote_url, fingerprint, layout, timeout_s=config.remote_timeout_s,
                                  ttl_s=config.remote_ttl_s, namespace=config.remote_namespace)
            self._io_thread = threading.Thread(target=self._io_loop, name="store-io", daemon=True)
            self._io_thread.start()
            self.remote: RemoteSync | None = RemoteSync(self, tier, ANON_BLOCK) if tier is not None else None
            if self.disk is not None:
                self._restore()
        except BaseException:  # (the store folder is free again for a corrected start)
            self._io.put(None)  # (the I/O thread, if it started, ends)
            if self.disk is not None:
                self.disk.close()
            raise

    # -- restart ----------------------------------------------------------------------------
    def _restore(self) -> None:
        """Rebuild records and the ledger from the disk index (a previous process's sessions)."""
        now = time.monotonic()
        on_disk = set(self.disk.segment_ids())
        for key, body in self.disk.load_records():
            try:
                if body is None:
                    raise ValueError("not JSON")
                rec = SessionRecord.from_json(body)
                if rec.key != key:  # (a row copied under another key: forgetting one would leave the other)
                    raise ValueError(f"its row is keyed {key!r}")
            except ValueError as e:  # a damaged row: the session starts over, the others are served
                log.warning("store: a session record in the index is unreadable (%s); dropping it", e)
                if isinstance(key, str):
                    self._persist_record(key, None)
                continue
            # a kill between a record's row and its segment's file leaves a dangling span: cut it
            kept = spans_while(rec.spans, on_disk.__contains__)
            if len(kept) != len(rec.spans):
                rec.spans = kept
                self._persist_record(rec.key, rec.to_json() if kept else None)
                if not kept:
                    continue
            self.records[rec.key] = rec
            self._name_segments(rec, +1)
            self._index_anon(rec)
            for seg in rec.segment_ids():
                self._refs[seg] = self._refs.get(seg, 0) + 1
        for rec in sorted(self.records.values(), key=lambda r: r.stamp):
            if (session := branch_of(rec.key)) is not None:
                self._branches.setdefault(session, []).append(rec.key)
        for session in list(self._branches):  # this process's cap (a restart may lower it)
            self._trim_branches(session)
        held = sum(self.disk.size(seg) for seg in on_disk if seg in self._refs)
        if held > self.ledger.disk_bytes:
            raise ValueError(f"store_dir {str(self.disk.root)!r} holds {held} bytes of this model's KV, more than "
                             f"disk_bytes={self.ledger.disk_bytes}: give at least that much, or another store_dir "
                             "(a store's disk budget cannot be lowered below what it holds)")
        for seg in on_disk:
            if seg not in self._refs:
                self.disk.remove(seg)  # no record names it: an orphan of a turn that never committed
                continue
            self.ledger.put_disk(seg, self.disk.size(seg), now)
            if not self.disk.holds_every_layer(seg):
                self._windowless.add(seg)

    # -- planning a turn --------------------------------------------------------------------
    def plan(self, key: str | None, prompt: list[int], window: int, reserve: int, head_hint: int,
             mode: str | None = None, tail: int = 0, turn_starts: Sequence[int] = (),
             cache_salt: str | None = None) -> tuple[str, TurnPlan]:  # fmt: skip
        """Match a prompt against its session (or, without one, the longest anonymous prefix of its cache
        salt's) and truncate if needed (`mode`: plan_turn's, for a session; None: the configured
        truncation; `tail`: the prompt's last tokens truncation keeps, its newest turn; `turn_starts`:
        where a cut may end). With a remote tier, a session (or prefix) that another replica served
        further is adopted from there."""
        remote, tag = None, salt_tag(cache_salt)
        if self.remote is not None and key is not None:
            remote = self.remote.read_record(key)
        elif self.remote is not None and (held := self._anon_hit(prompt, tag, window, reserve)) < len(prompt) - 1:
            remote = self.remote.read_prefix(prompt, tag)  # another replica may hold a longer prefix
        with self._lock:
            if key is None:
                # another replica's anonymous record, if it serves more than what this one holds: the index then finds it
                if remote is not None and not remote.truncated:
                    if plan_turn(remote, prompt, window, reserve, 0, 1.0, "off").hit > held:
                        self.remote.adopt(remote.key, remote)
                remote = None
                key, record = self._find_anon(prompt, tag)
                mode = "off"
            else:
                record = self._continued_record(key, prompt)
                mode = mode or self.config.truncation
            cut = (self.config.drop_fraction, mode, tail, turn_starts)
            plan = plan_turn(record, prompt, window, reserve, head_hint, *cut)
            if remote is not None:  # adopt it if it serves more of this turn than what this replica holds
                theirs = plan_turn(remote, prompt, window, reserve, head_hint, *cut)
                if theirs.hit > self._held(plan.reuse):
                    self.remote.adopt(key, remote)
                    plan = theirs
            self._ref_spans(plan.reuse, +1)
            return key, plan

    def _continued_record(self, key: str, prompt: list[int]) -> SessionRecord | None:
        """The session's record, or the kept branch whose conversation the prompt continues furthest
        (the client went back to it: an edited or regenerated message, a fork). Chosen by the tokens
        alone, not by what the tiers hold now: the record also decides the prompt's truncation. Ties
        go to the session's record. Under the lock."""
        best = self.records.get(key)
        matched = common_prefix(best.logical, prompt) if best is not None else -1
        for branch in self._branches.get(key, ()):
            rec = self.records[branch]
            if (n := common_prefix(rec.logical, prompt)) > matched:
                best, matched = rec, n
        return best

    def _anon_hit(self, prompt: list[int], tag: str, window: int, reserve: int) -> int:
        """Tokens of the prompt the best anonymous prefix (of the salt tagged `tag`) this replica holds would serve."""
        with self._lock:
            _, local = self._find_anon(prompt, tag)
            return self._held(plan_turn(local, prompt, window, reserve, 0, 1.0, "off").reuse) if local else 0

    def cut_records_at(self, seg_id: str) -> None:
        """A segment no tier can supply (a fetch failed): records naming it end before it."""
        with self._lock:
            self._cut_records_at(seg_id)

    def _cut_records_at(self, seg_id: str) -> None:
        """Records naming the segment end before it; one left with nothing is dropped. Under the lock."""
        for key in sorted(self._namers.get(seg_id, ())):
            rec = self.records[key]
            kept = spans_while(rec.spans, lambda s: s != seg_id)
            if kept:
                self._replace_record(replace(rec, spans=kept))
                if self.disk is not None:
                    self._io.put(("record", key))
            else:
                self._drop_record(key)

    def _settle_lost(self) -> None:
        """Segments that may have left the last tier holding them (evicted, unwritable, corrupt, never
        placed): the records naming a lost one end before it, and a record left with nothing goes, with
        its index row. So a session whose KV has aged out of every tier costs no memory, and the later
        segments of a record whose first one is gone (never servable: reuse is a prefix) free their
        room. Settled at the engine's next step, not inside an eviction: freeing segments there would
        pull them from under the loop. With a remote tier the server may still hold them: records
        stay. Under the lock."""
        lost, self._maybe_lost = self._maybe_lost, set()
        if self.remote is not None:
            return
        for seg in lost:
            if seg in self._namers and seg not in self._writing and self._tier_of(seg) is None:
                self._cut_records_at(seg)

    def _held(self, spans: Sequence[Span]) -> int:
        """Tokens of the first spans whose segments this replica holds (in a tier, or still saving)."""
        return sum(s.length for s in spans_while(spans, lambda seg: self._tier_of(seg) is not None))

    def release(self, spans: Sequence[Span]) -> None:
        with self._lock:
            self._ref_spans(spans, -1)
            self._drop_windowed_history()

    def windowless(self, seg_id: str) -> bool:
        """Whether a copy of the segment lacks the windowed layers."""
        return seg_id in self._windowless

    def windowed_held(self, seg_id: str) -> bool:
        """Whether a load can read the segment's windowed layers: from host, or from its disk file."""
        if seg_id not in self._windowless:
            return True
        kv = self.host.get(seg_id)
        return (kv is not None and kv.layers is None) or self._whole_on_disk(seg_id)

    def _whole_on_disk(self, seg_id: str) -> bool:
        return self.disk is not None and self.disk.contains(seg_id) and self.disk.holds_every_layer(seg_id)

    def available(self, spans: Sequence[Span]) -> list[tuple[Span, str]]:
        """The usable prefix of `spans`, each with the tier it will be read from; stops at the first missing segment."""
        out = []
        with self._lock:
            for span in spans:
                tier = self._tier_of(span.seg_id)
                if tier is None:
                    break
                out.append((span, tier))
                if span.seg_id in self.ledger:
                    self.ledger.touch(span.seg_id, time.monotonic())
        return out

    def _tier_of(self, seg_id: str) -> str | None:
        if self.host.contains(seg_id) or seg_id in self._pending:
            return "remote" if self.remote is not None and seg_id in self.remote.fresh else "host"
        if self.disk is not None and self.disk.contains(seg_id):
            return "disk"
        return None

    # -- committing a turn ------------------------------------------------------------------
    def new_segment_id(self) -> str:
        return uuid.uuid4().hex

    def commit(self, key: str, logical: list[int], plan: TurnPlan, reuse: Sequence[Span], new: Span | None) -> None:
        """Replace the session's record: the reused spans, then this turn's new segment (maybe still saving)."""
        spans = list(reuse) + ([new] if new is not None and new.length > 0 else [])
        record = SessionRecord(key, logical, spans, plan.head, plan.dropped_until, plan.planned_at)
        with self._lock:
            if plan.planned_at < self._forgotten_at.get(key, float("-inf")):
                return  # planned before the session was forgotten (on another replica): it stays forgotten
            if new is not None and new.length > 0:
                self._pending[new.seg_id] = threading.Event()
            if not key.startswith(ANON_PREFIX):
                self._keep_branches(key, record)
            self._replace_record(record)
            if self.windowed:
                self._window_candidates.update(record.segment_ids())
            # a reused segment may have left every tier while the turn ran (and been settled before it
            # was named again): settle it with this record
            self._maybe_lost.update(s.seg_id for s in reuse if self._tier_of(s.seg_id) is None)
            if self.remote is not None:
                self.remote.used(reuse)
                self.remote.publish(key)
        if self.disk is not None:
            self._io.put(("record", key))

    def _keep_branches(self, key: str, new: SessionRecord) -> None:
        """Before `new` replaces the session's record: keep the old record as a branch when the new
        turn left it (an edited or regenerated message, a fork of a stored response), so that going
        back to it reuses its KV; drop the branches `new` continues (it serves them). At most
        `session_branches` per session, the oldest dropped first. Under the lock."""
        for branch in [b for b in self._branches.get(key, ()) if _continues(new, self.records[b])]:
            self._drop_record(branch)
        old = self.records.get(key)
        if self.config.session_branches and old is not None and old.num_kv > 0 and not _continues(new, old):
            branch = f"{key}{BRANCH_SEP}{uuid.uuid4().hex[:12]}"
            self._replace_record(replace(old, key=branch, spans=list(old.spans)))
            self._branches.setdefault(key, []).append(branch)
            if self.disk is not None:
                self._io.put(("record", branch))
        self._trim_branches(key)

    def _trim_branches(self, key: str) -> None:
        """At most `session_branches` kept branches for the session: the oldest go. Under the lock."""
        while len(branches := self._branches.get(key, ())) > self.config.session_branches:
            self._drop_record(branches[0])

    def add_segment(self, seg_id: str, kv: SegmentKV) -> None:
        """The save thread's hand-off: the segment's KV is complete; place it in the host tier."""
        with self._lock:
            try:
                if seg_id not in self._refs:  # superseded before its save finished
                    return
                self.stats.bytes_saved += kv.nbytes
                if not self._place(seg_id, kv):
                    self._maybe_lost.add(seg_id)  # no tier took it
            finally:
                # saving until placed: a load that waits for it (unlocked) must then find it in a tier,
                # not read a file that placing (moving older segments out of host first) has not written
                if (done := self._pending.pop(seg_id, None)) is not None:
                    done.set()

    def _place(self, seg_id: str, kv: SegmentKV) -> bool:
        """A new segment into host (room made by the policy), written through to disk if so configured;
        straight to disk if host cannot take it. Whether a tier took it. Under the lock."""
        if kv.layers is not None:  # (a value another replica published without its windowed layers)
            self._windowless.add(seg_id)
        if kv.nbytes <= self.host.budget and self._make_host_room(kv.nbytes, protect={seg_id}):
            self.host.put(seg_id, kv)
            self.ledger.put_host(seg_id, kv.nbytes, time.monotonic())
            if self.disk is not None and self.config.write_through:
                self._io.put(("write", seg_id))
            return True
        return self.disk is not None and self._write_to_disk(seg_id, kv)

    def add_segment_failed(self, seg_id: str) -> None:
        """The save thread could not build the segment: records naming it end before it."""
        with self._lock:
            done = self._pending.pop(seg_id, None)
            self._maybe_lost.add(seg_id)
            if done:
                done.set()

    def saving(self, seg_id: str) -> bool:
        """Whether the segment's save is still running (it sits in the write buffer)."""
        return seg_id in self._pending

    def wait_saved(self, seg_id: str, timeout: float | None = None) -> bool:
        ev = self._pending.get(seg_id)
        return ev is None or ev.wait(timeout)

    def segment_host(self, seg_id: str) -> SegmentKV | None:
        return self.host.get(seg_id)

    # -- windowed layers past every window --------------------------------------------------
    def _drop_windowed_history(self) -> None:
        """Drop the windowed layers' KV from the host copies of candidate segments that no later
        turn's window reaches. A segment still being saved, written, or read by a turn in flight
        waits for a later call. Under the lock."""
        for seg in list(self._window_candidates):
            state = self._window_state(seg)
            if state == "wait":
                continue
            self._window_candidates.discard(seg)
            if state == "drop":
                kv = self.host.get(seg)
                try:
                    slim = self.host.pinned(kv.without(self.windowed))  # (on CUDA: the full layers alone, small)
                except (RuntimeError, MemoryError) as e:  # (no memory for the copy: the whole one stays)
                    log.warning("store: segment %s keeps its windowed layers (%s)", seg, e)
                    continue
                self.host.shrink(seg, slim)
                self.ledger.put_host(seg, slim.nbytes, time.monotonic(), touch=False)
                self._windowless.add(seg)
                self.stats.windowed_bytes_dropped += kv.nbytes - slim.nbytes

    def _window_state(self, seg: str) -> str:
        """"drop" its windowed layers now, "wait" (a turn in flight reads it, or it is being saved or
        written), or "keep" them (some record's later turns may reach it through a window). Under the lock."""
        namers = self._namers.get(seg, ())
        if seg in self._windowless or not namers:
            return "keep"
        for key in namers:
            if not self._past_windows(self.records[key], seg):
                return "keep"
        if self._refs.get(seg, 0) > len(namers) or seg in self._pending or seg in self._writing:
            return "wait"
        if self.config.windowed_history == "disk" and not self._whole_on_disk(seg):
            return "keep"  # (write-back: until its file is written, host holds its only copy)
        return "drop" if self.host.contains(seg) else "keep"  # (a disk copy is left whole: disk is cheap)

    def _past_windows(self, rec: SessionRecord, seg: str) -> bool:
        """Whether no turn resuming in the record's newest segment (a follow-up, a regenerated or
        edited last message) reaches the segment through a window, nor a prompt sharing only its
        first segment (a system prompt) does."""
        if rec.spans[0].seg_id == seg:
            return False
        newest = rec.num_kv - rec.spans[-1].length
        pos = 0
        for span in rec.spans:
            if span.seg_id == seg and pos + span.length > newest - self.window_reach:
                return False
            pos += span.length
        return True

    # -- eviction ---------------------------------------------------------------------------
    def _queued_segments(self) -> list[str]:
        segs: list[str] = []
        for key in self._queue_keys:
            rec = self.records.get(key)
            if rec is not None:
                segs.extend(rec.segment_ids())
        return segs

    def _make_host_room(self, need: int, protect: set[str]) -> bool:
        protect = protect | self._writing  # their host copy is what is being written
        victims = self.policy.host_victims(self.ledger, need, self._queued_segments(), time.monotonic(), protect)
        for seg in victims:
            self._demote(seg)
        self._maybe_lost.update(victims)
        return self.ledger.host_free >= need

    def _demote(self, seg_id: str, keep_unsaved: bool = False) -> bool:
        """Host -> disk (write-back if it is not there yet), then drop the host copy. If the write
        fails (a full disk), the copy is kept when `keep_unsaved` (demoting ahead of need), else
        dropped (the room is needed now). Returns whether the host copy went."""
        if seg_id in self._writing:  # victims leave these out; its file is not there yet: keep the copy
            return False
        kv = self.host.get(seg_id)
        if kv is not None and self.disk is not None and not self.disk.contains(seg_id):
            if not self._write_to_disk(seg_id, kv) and keep_unsaved:
                return False
        self.host.evict(seg_id)
        entry = self.ledger.entry(seg_id)
        if entry is not None and entry.in_host:
            self.ledger.drop_host(seg_id)
        self.stats.host_evictions += 1
        return True

    def _write_to_disk(self, seg_id: str, kv: SegmentKV) -> bool:
        size = self._disk_room_for(seg_id, kv)
        if size is None:
            return False
        try:
            self.disk.put(seg_id, kv)
        except OSError as e:  # a full or failing disk costs this segment its disk copy, not the engine
            log.debug("store: segment %s not written to disk (%s)", seg_id, e)  # the disk tier warns once
            return False
        self.ledger.put_disk(seg_id, size, time.monotonic(), touch=False)  # a write-back is no access
        self.stats.bytes_written_disk += size
        return True

    def _disk_room_for(self, seg_id: str, kv: SegmentKV) -> int | None:
        """Make room on disk for the segment's file; its size, or None (warned) if it cannot fit."""
        size = self.disk.file_size(seg_id, kv)
        if size > self.disk.budget or not self._make_disk_room(size, protect={seg_id}):
            log.warning("store: segment %s (%d bytes) does not fit the disk budget; dropped", seg_id, size)
            return None
        return size

    def _write_through(self, seg_id: str) -> None:
        """The I/O thread's copy of a new host segment to disk. Room is made and reserved in the ledger
        under the lock, but the file is written and fsynced outside it: the engine's per-step calls
        (the queue hint, lookups, commits) would otherwise wait for the disk, for as long as an fsync
        of a large segment takes. The host copy stays while the file is written (victims skip it)."""
        with self._lock:
            kv = self.host.get(seg_id)
            if kv is None or self.disk.contains(seg_id) or seg_id not in self._refs or seg_id in self._writing:
                return
            size = self._disk_room_for(seg_id, kv)
            if size is None:
                return
            self.ledger.put_disk(seg_id, size, time.monotonic(), touch=False)  # the room, reserved
            self._writing.add(seg_id)
        written = False
        try:
            self.disk.put(seg_id, kv)
            written = True
        except OSError as e:  # a full or failing disk costs this segment its disk copy (the tier warns once)
            log.debug("store: segment %s not written to disk (%s)", seg_id, e)
        finally:  # whatever put raised: the reservation and the _writing mark never outlive the write
            self._end_write_through(seg_id, size, written)

    def _end_write_through(self, seg_id: str, size: int, written: bool) -> None:
        with self._lock:
            self._writing.discard(seg_id)
            if seg_id not in self._refs:  # forgotten while written (_forget_segment left the room reserved)
                self._windowless.discard(seg_id)  # (and its mark, for its file)
                if written:
                    self.disk.remove(seg_id)
                if seg_id in self.ledger:
                    self.ledger.forget(seg_id)
            elif written:
                self.stats.bytes_written_disk += size
            elif (entry := self.ledger.entry(seg_id)) is not None and entry.in_disk:
                self.ledger.drop_disk(seg_id)  # the reserved room goes back; the host copy stays

    def _make_disk_room(self, need: int, protect: set[str]) -> bool:
        protect = protect | self._writing  # their room is reserved and their file on its way
        victims = self.policy.disk_victims(self.ledger, need, self._queued_segments(), time.monotonic(), protect)
        for seg in victims:
            self.disk.remove(seg)
            self.ledger.drop_disk(seg)
            self.stats.disk_evictions += 1
        self._maybe_lost.update(victims)
        return self.ledger.disk_free >= need

    def drop_corrupt(self, seg_id: str, reason: str, file_only: bool = False) -> None:
        """A segment failed a check, or could not be read: forget every copy, so lookups stop before it.
        `file_only`: its file failed where a host copy without some layers read from it: the file
        goes, the host copy stays (lookups then stop before where they would read those layers)."""
        with self._lock:
            if file_only and self.host.contains(seg_id):
                log.warning("store: segment %s's file is unreadable (%s); its host copy stays", seg_id, reason)
                self.stats.corrupt_segments += 1
                self._windowless.add(seg_id)  # (what its host copy lacks is nowhere now: a retry stops before it)
                if self.disk is not None and self.disk.contains(seg_id):
                    self.disk.remove(seg_id)
                    self.ledger.drop_disk(seg_id)
                return
            in_host = self.host.evict(seg_id) is not None
            on_disk = self.disk is not None and self.disk.contains(seg_id)
            if not in_host and not on_disk:  # its save found no room in either tier (e.g. a full disk)
                log.warning("store: segment %s was kept by no tier; recomputing it", seg_id)
                return
            log.warning("store: segment %s is corrupt (%s); serving a shorter hit and recomputing", seg_id, reason)
            self.stats.corrupt_segments += 1
            if in_host:
                self.ledger.drop_host(seg_id)
            if on_disk:
                self.disk.remove(seg_id)
                self.ledger.drop_disk(seg_id)
            self._maybe_lost.add(seg_id)

    # -- look-ahead -------------------------------------------------------------------------
    def on_queue(self, keys: Sequence[str]) -> None:
        """The scheduler's hint: sessions of queued jobs in order. Prefetch the window's disk-only segments."""
        with self._lock:
            self._queue_keys = list(keys)
            self._settle_lost()
            if self.disk is None:
                return
            if not self._trim_queued and self.ledger.host_free < self.policy.host_free_target(self.ledger):
                self._trim_queued = True
                self._io.put(("trim", None))
            now = time.monotonic()
            if self.config.disk_ttl_s is not None and now >= self._next_expiry_s:
                self._next_expiry_s = now + min(self.config.disk_ttl_s, 1.0)  # sweep at most once a second
                self._io.put(("expire", None))
            for seg in self.policy.prefetch(self.ledger, self._queued_segments()):
                if seg not in self._fetching:
                    self._fetching.add(seg)
                    self._io.put(("fetch", seg))

    def _trim_host(self) -> None:
        """Demote host -> disk until free host is back at the threshold, ahead of need, so saves and
        prefetches find room without evicting on their own path. The policy picks the victims and
        keeps the prefetch window."""
        with self._lock:
            self._trim_queued = False
            target = self.policy.host_free_target(self.ledger)
            queued = self._queued_segments()
            protect = self.policy.protected(self.ledger, queued) | self._writing
            for seg in self.policy.host_victims(self.ledger, target, queued, time.monotonic(), protect):
                if not self._demote(seg, keep_unsaved=True):
                    break  # the disk takes nothing now: keep the host copies rather than lose them
                self.stats.threshold_demotions += 1

    def _expire(self) -> None:
        """Forget sessions whose KV has not been used for `disk_ttl_s`: their records go, and with
        them every copy of their segments (a turn in flight keeps what it reads until it ends).
        Queued sessions are kept whatever their age."""
        with self._lock:
            protect = set(self._queued_segments())
            expired = set(self.policy.expired(self.ledger, time.monotonic(), protect))
            for key in sorted({k for seg in expired for k in self._namers.get(seg, ())}):
                self._drop_record(key)
            self.stats.expired_segments += len(expired)

    def _replace_record(self, record: SessionRecord) -> None:
        """Make `record` its session's, indexed if anonymous; the segments it names are counted before
        the old record's are let go (those both name stay). Under the lock."""
        old = self.records.get(record.key)
        self._ref_spans(record.spans, +1)
        if old is not None:
            self._unindex_anon(old)
            self._name_segments(old, -1)
            self._ref_spans(old.spans, -1)
        self.records[record.key] = record
        self._name_segments(record, +1)
        self._index_anon(record)

    def forget(self, key: str) -> bool:
        """Drop a session: its record and the segments no other record names (host, disk); on the
        remote tier's server, its record becomes a tombstone and the segments either record names go
        (also when only other replicas served it, and when none holds it yet: a first turn of it
        running elsewhere, or not yet published, is refused when it publishes). Whether anything
        was held. OSError when the remote server cannot be read (what was held here is dropped all the same)."""
        now = time.time()
        with self._lock:
            self._note_forgotten(key, now)
            rec = self.records.get(key)
            branches = [self.records[b] for b in self._branches.get(key, ())]
            for held in [b.key for b in branches] + ([key] if rec is not None else []):
                self._drop_record(held)
        theirs = self.remote.read_record(key, strict=True) if self.remote is not None else None  # not under the lock
        if self.remote is not None:
            self.remote.forget_session(key, [rec, theirs, *branches], now)
        if rec is None and theirs is None and not branches:
            return False
        with self._lock:
            self.stats.sessions_forgotten += 1
        return True

    def forgotten_elsewhere(self, key: str, stamp: object) -> None:
        """Another replica forgot the session at `stamp`: drop this replica's copy if it is older,
        have the engine drop its device blocks (`take_forgotten`), and refuse the commit of a turn
        of it planned before then (one still running here)."""
        if not isinstance(stamp, (int, float)):
            return
        with self._lock:
            self._note_forgotten(key, float(stamp))
            for branch in [b for b in self._branches.get(key, ()) if self.records[b].stamp < stamp]:
                self._drop_record(branch)
            rec = self.records.get(key)
            if rec is not None and rec.stamp < stamp:
                self._drop_record(key)
                self._forgotten.append(key)

    def _note_forgotten(self, key: str, stamp: float) -> None:
        self._forgotten_at[key] = max(stamp, self._forgotten_at.get(key, stamp))
        self._forgotten_at.move_to_end(key)
        while len(self._forgotten_at) > FORGOTTEN_KEPT:
            self._forgotten_at.popitem(last=False)

    def take_forgotten(self) -> list[str]:
        """Sessions forgotten elsewhere since the last call (the engine drops their device blocks)."""
        with self._lock:
            out, self._forgotten = self._forgotten, []
            return out

    def _drop_record(self, key: str) -> None:
        rec = self.records.pop(key)
        if (session := branch_of(key)) is not None and key in (branches := self._branches.get(session, [])):
            branches.remove(key)
            if not branches:
                del self._branches[session]
        self._unindex_anon(rec)
        self._name_segments(rec, -1)
        self._ref_spans(rec.spans, -1)
        if self.disk is not None:
            self._io.put(("record", key))  # the I/O thread deletes the row: the record is gone

    def _fetch(self, seg_id: str) -> None:
        slim = seg_id in self._windowless and self.windowed  # (host holds its full layers alone: read only those)
        try:
            kv = self.disk.get(seg_id, [layer for layer in range(self.layout.num_layers) if layer not in self.windowed]
                               if slim else None)  # fmt: skip
        except CorruptSegment as e:
            with self._lock:  # its file removed since the fetch was queued (forgotten, replaced, evicted): no damage
                gone = seg_id not in self.ledger or not self.disk.contains(seg_id)
            if not gone:
                self.drop_corrupt(seg_id, str(e))
            return
        except OSError as e:  # perhaps passing (EIO, EMFILE): keep the file; a load checks it again
            log.warning("store: prefetching segment %s failed (%s)", seg_id, e)
            return
        finally:
            self._fetching.discard(seg_id)
        kv = self.host.pinned(kv)  # on CUDA: not under the lock, which the engine takes every step
        with self._lock:
            if self.host.contains(seg_id) or seg_id not in self.ledger:
                return
            if self._make_host_room(kv.nbytes, protect=set(self._queued_segments()[:1]) | {seg_id}):
                if kv.layers is not None and not slim:  # (a file without them that the index did not name: a damaged index)
                    self._windowless.add(seg_id)
                    self.disk.note_partial(seg_id, kv.layers)
                self.host.put(seg_id, kv)
                self.ledger.put_host(seg_id, kv.nbytes, time.monotonic(), touch=False)  # a prefetch is no access
                self.stats.bytes_prefetched += kv.nbytes

    # -- the I/O thread ---------------------------------------------------------------------
    def _io_loop(self) -> None:
        while True:
            job = self._io.get()
            try:
                if job is None:
                    return
                # tensor work on the CPU: keep no OpenMP team alive between jobs (fresh_thread.py)
                call_in_fresh_thread(self._run_io_job, *job, name="store-io-job")
            except Exception:  # the I/O thread must survive any single failure
                log.exception("store: I/O job %s failed", job)
            finally:
                self._io.task_done()

    def _run_io_job(self, kind: str, arg: str) -> None:
        if kind == "write":
            self._write_through(arg)
        elif kind == "record":
            with self._lock:
                rec = self.records.get(arg)
                body = rec.to_json() if rec is not None else None
            self._persist_record(arg, body)
        elif kind == "fetch":
            self._fetch(arg)
        elif kind == "trim":
            self._trim_host()
        elif kind == "expire":
            self._expire()

    def _persist_record(self, key: str, body: dict | None) -> None:
        """Write (or delete, for None) a session's row in the disk index. A full disk costs the
        session its restart, not this process: its KV and record stay served from memory."""
        try:
            if body is None:
                self.disk.delete_record(key)
            else:
                self.disk.save_record(key, body)
        except OSError as e:  # the disk tier warns once; the record is written again with the next turn
            log.debug("store: session %s's record not written to disk (%s)", key, e)

    def flush(self) -> None:
        """Wait for pending saves and I/O, then write every host-only segment to disk (shutdown)."""
        for ev in list(self._pending.values()):
            ev.wait(30)
        if self.remote is not None:
            self.remote.join()
        self._io.join()
        with self._lock:
            self._settle_lost()
        if self.disk is None:
            return
        self.disk.writes.resume()  # shutdown is the last chance to persist: try even if writes paused
        with self._lock:
            for seg in self.host.segment_ids():  # (a write-through still running lands by the join below)
                if not self.disk.contains(seg) and seg in self._refs and seg not in self._writing:
                    self._write_to_disk(seg, self.host.get(seg))
            for key in self.records:
                self._io.put(("record", key))
        self._io.join()

    def close(self) -> None:
        self.flush()
        if self.remote is not None:
            self.remote.close()
        self._io.put(None)
        self._io_thread.join(timeout=10)
        if self.disk is not None:
            self.disk.close()

    # -- bookkeeping ------------------------------------------------------------------------
    def _ref_spans(self, spans: Sequence[Span], delta: int) -> None:
        for seg in dict.fromkeys(s.seg_id for s in spans):
            n = self._refs.get(seg, 0) + delta
            if n > 0:
                self._refs[seg] = n
                continue
            self._refs.pop(seg, None)
            self._forget_segment(seg)

    def _name_segments(self, rec: SessionRecord, delta: int) -> None:
        """Add (+1) or remove (-1) the record's key from the reverse index of the segments it names."""
        for seg in rec.segment_ids():
            keys = self._namers.setdefault(seg, set())
            if delta > 0:
                keys.add(rec.key)
            else:
                keys.discard(rec.key)
                if not keys:
                    del self._namers[seg]

    def _forget_segment(self, seg_id: str) -> None:
        """No record or plan names it any more: free its bytes everywhere (the remote store's copy is
        shared with other replicas: the server's own eviction ages it out)."""
        self.host.evict(seg_id)
        if seg_id not in self._writing:  # (else its file may still land, and be named again)
            self._windowless.discard(seg_id)
        self._window_candidates.discard(seg_id)
        if self.remote is not None:
            self.remote.forget(seg_id)
        if seg_id in self._writing:  # its file is being written: the writer frees the room it reserved
            entry = self.ledger.entry(seg_id)
            if entry is not None and entry.in_host:
                self.ledger.drop_host(seg_id)
            return
        if self.disk is not None and self.disk.contains(seg_id):
            self.disk.remove(seg_id)
        if seg_id in self.ledger:
            self.ledger.forget(seg_id)

    def _find_anon(self, prompt: list[int], tag: str) -> tuple[str, SessionRecord | None]:
        """The anonymous record of the salt tagged `tag` sharing the longest block-aligned prefix
        (verified by tokens; of several, the latest indexed)."""
        fresh = f"{ANON_PREFIX}{uuid.uuid4().hex}{tag}"
        for h in reversed(_anon_hashes(prompt, tag)):
            for key in reversed(self._anon.get(h, {})):
                rec = self.records.get(key)
                if rec is None or key_salt_tag(key) != tag or common_prefix(rec.logical, prompt) < ANON_BLOCK:
                    continue  # (a hash collision)
                # extend that record when this prompt continues it; otherwise start a new one
                return (key, rec) if common_prefix(rec.logical, prompt) == len(rec.logical) else (fresh, rec)
        return fresh, None

    def _index_anon(self, rec: SessionRecord) -> None:
        """Every record is indexed under each block of its prefix, so dropping or cutting one hides
        nothing another holds."""
        if rec.key.startswith(ANON_PREFIX) and not rec.truncated:  # a prefix is served whole, never cut
            for h in _anon_hashes(rec.logical, key_salt_tag(rec.key), rec.num_kv):
                keys = self._anon.setdefault(h, {})
                keys.pop(rec.key, None)
                keys[rec.key] = None  # the latest last

    def _unindex_anon(self, rec: SessionRecord) -> None:
        for h in _anon_hashes(rec.logical, key_salt_tag(rec.key), rec.num_kv):
            keys = self._anon.get(h)
            if keys is not None:
                keys.pop(rec.key, None)
                if not keys:
                    del self._anon[h]

    def summary(self) -> dict:
        with self._lock:  # (the I/O and fetch threads drop records and branches)
            branches = sum(len(b) for b in self._branches.values())
            sessions = len(self.records) - branches
        s = self.stats
        hits = sum(s.hit_tokens.values())
        return {
            "store_lookups": s.lookups,
            "store_hit_rate": hits / s.lookup_tokens if s.lookup_tokens else 0.0,
            "store_hit_tokens": dict(s.hit_tokens),
            "host_bytes_used": self.host.used_bytes(),
            "host_bytes_budget": self.host.budget,
            "disk_bytes_used": self.disk.used_bytes() if self.disk else 0,
            "disk_bytes_budget": self.disk.budget if self.disk else 0,
            "host_evictions": s.host_evictions,
            "disk_evictions": s.disk_evictions,
            "bytes_saved": s.bytes_saved,
            "bytes_loaded": dict(s.bytes_loaded),
            "bytes_written_disk": s.bytes_written_disk,
            "bytes_prefetched": s.bytes_prefetched,
            "windowed_bytes_dropped": s.windowed_bytes_dropped,
            "corrupt_segments": s.corrupt_segments,
            "preloads": s.preloads,
            "threshold_demotions": s.threshold_demotions,
            "expired_segments": s.expired_segments,
            "sessions_forgotten": s.sessions_forgotten,
            "sessions": sessions,
            "session_branches": branches,
            **(self.remote.summary() if self.remote is not None else {}),
        }

    def check_integrity(self) -> None:
        with self._lock:
            self.host.check_integrity()
            self.ledger.check_integrity()
            if self.disk is not None:
                self.disk.check_integrity()
            for seg in self.host.segment_ids():
                e = self.ledger.entry(seg)
                if e is None or not e.in_host:
                    raise RuntimeError(f"host segment {seg} missing from the ledger")
                if self.host.get(seg).layers is not None and seg not in self._windowless:
                    raise RuntimeError(f"host segment {seg} lacks layers a load may read")
            if self.disk is not None:
                for seg in self.disk.segment_ids():
                    if not self.disk.holds_every_layer(seg) and seg not in self._windowless:
                        raise RuntimeError(f"disk segment {seg} lacks layers a load may read")
                    e = self.ledger.entry(seg)
                    if e is None or not e.in_disk:
                        raise RuntimeError(f"disk segment {seg} missing from the ledger")
                    if e.disk_nbytes != self.disk.size(seg):
                        raise RuntimeError(f"disk segment {seg}: the ledger counts {e.disk_nbytes} bytes, its file has {self.disk.size(seg)}")
            for e in self.ledger.sessions():
                if e.in_host and not self.host.contains(e.session_id):
                    raise RuntimeError(f"ledger says {e.session_id} is in host, but it is not")
            counted: dict[str, int] = {}
            for rec in self.records.values():
                for seg in rec.segment_ids():
                    counted[seg] = counted.get(seg, 0) + 1
            for seg, n in counted.items():
                if self._refs.get(seg, 0) < n:
                    raise RuntimeError(f"segment {seg} has fewer refs than records naming it")
                if len(self._namers.get(seg, ())) != n:
                    raise RuntimeError(f"segment {seg}: the reverse index names {len(self._namers.get(seg, ()))} records, {n} do")
            if set(self._namers) != set(counted):
                raise RuntimeError("the reverse index names segments no record names")
            for h, keys in self._anon.items():
                if not keys or any(k not in self.records for k in keys):
                    raise RuntimeError(f"the anonymous index names no record, or a dropped one, at block {h}")
            for rec in self.records.values():
                if rec.key.startswith(ANON_PREFIX) and not rec.truncated and any(
                        rec.key not in self._anon.get(h, ()) for h in _anon_hashes(rec.logical, key_salt_tag(rec.key), rec.num_kv)):  # fmt: skip
                    raise RuntimeError(f"anonymous record {rec.key} is missing from the index")
            listed = [b for branches in self._branches.values() for b in branches]
            if sorted(listed) != sorted(k for k in self.records if branch_of(k) is not None):
                raise RuntimeError("the branch lists and the branch records differ")
            for session, branches in self._branches.items():
                if not branches or any(branch_of(b) != session for b in branches):
                    raise RuntimeError(f"session {session}'s branch list is empty or names another's")
        if self.remote is not None:
            self.remote.check_integrity()


def _anon_hashes(tokens: list[int], tag: str, limit: int | None = None) -> list[int]:
    """The anonymous index's block hashes of `tokens`, chained from the salt's seed (a salt's prefixes
    are found only by its requests)."""
    return block_hashes(tokens, ANON_BLOCK, limit=limit, seed=int(tag[1:17], 16) | 1 if tag else 0)


def _continues(new: SessionRecord, old: SessionRecord) -> bool:
    """Whether `new`'s conversation extends `old`'s (so it serves whatever `old` would)."""
    return common_prefix(old.logical, new.logical) >= len(old.logical)
