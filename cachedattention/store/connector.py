"""The engine's side of the store (vLLM-v1-style connector): plan, look up, load, capture, save.

The scheduler sees only `lookup` (how many tokens the store supplies); the model sees only the
layer hooks (wait for layer l, take layer l's pre-RoPE KV, or every layer's at once after a fused
decode step). Everything else stays in here.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from cachedattention.config import StoreConfig
from cachedattention.engine.request import Request
from cachedattention.engine.scheduler import ScheduledSeq
from cachedattention.kvcache.kv_pool import KVPool
from cachedattention.model.loader import resolve_dtype
from cachedattention.model.rope import apply_rotary
from cachedattention.store.segment import KVLayout, SegmentKV
from cachedattention.store.session import Span, TurnPlan, slice_spans
from cachedattention.store.store import AttentionStore
from cachedattention.store.transfer import KVPiece, Loader, LoadJob, Piece, SaveJob, Saver, first_read

if TYPE_CHECKING:
    from cachedattention.engine.engine import LLMEngine

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.01  # an engine with nothing to schedule but fetches in flight waits this long for one


@dataclass
class TurnState:
    """Per-request store bookkeeping, on `request.store_state`."""

    key: str
    plan: TurnPlan
    reuse: list[Span] = field(default_factory=list)  # the part of plan.reuse still available at admission
    hit: int = 0
    tiers: list[tuple[Span, str]] = field(default_factory=list)
    capture_start: int = 0  # first token of this turn's new segment
    chunks: list[KVPiece] = field(default_factory=list)  # this turn's new tokens, in token order
    pending_load: LoadJob | None = None
    # recompute this turn without the store (a load failed through no segment's fault, or prompt logprobs)
    bypass: bool = False
    remote_deadline: float | None = None  # admission waits for segments coming from remote until then
    # False: this turn is not saved (the device pages it would be captured from lack windowed layers)
    save: bool = True
    counted: bool = False  # its hits are in the store's statistics (at its first admission)


class StepHooks:
    """The layer hooks of one forward pass."""

    def __init__(self, jobs: list[LoadJob], savers: list[tuple[int, int, TurnState]]) -> None:
        self.jobs = jobs
        self.savers = savers  # (flat start, count, state) of sequences whose KV is captured
        self._pieces: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        # savers whose rows are copied out of each layer's K/V (`_plan_copies`): row index, and where
        # each saver's rows start in the copy (None: its piece views the step's tensors)
        self._copy_rows: torch.Tensor | None = None
        self._copy_at: list[int | None] = []

    def wait_layer(self, layer: int) -> None:
        for job in self.jobs:
            job.wait(layer)

    def save_layer(self, layer: int, k_pre: torch.Tensor, v: torch.Tensor) -> None:
        if layer == 0:  # the forward's first layer: each saver's piece of this step starts
            self._pieces = [([], []) for _ in self.savers]
            for piece, (_, _, state) in zip(self._pieces, self.savers):
                state.chunks.append(piece)
            self._plan_copies(k_pre.shape[0], k_pre.device)
        if self._copy_rows is not None:
            k_copy, v_copy = k_pre.index_select(0, self._copy_rows), v.index_select(0, self._copy_rows)
        for (ks, vs), (start, n, _), at in zip(self._pieces, self.savers, self._copy_at):
            if len(ks) != layer:  # a piece is indexed by layer: they must come 0, 1, 2, ... each step
                raise RuntimeError(f"store hooks: layer {layer} saved after {len(ks)} layers of this step")
            if at is None:
                ks.append(k_pre[start : start + n])
                vs.append(v[start : start + n])
            else:
                ks.append(k_copy[at : at + n])
                vs.append(v_copy[at : at + n])

    def _plan_copies(self, rows: int, device: torch.device) -> None:
        """A view keeps the step's whole K/V tensor alive until its request is saved: a decoder's one
        row of a step that also prefilled 512 tokens would hold all 512 for as long as it decodes.
        So savers with less than half the rows (together less than half) get their rows copied,
        once per layer into one shared tensor; the rest view the tensor they mostly fill anyway."""
        small = [i for i, (_, n, _) in enumerate(self.savers) if 2 * n < rows]
        if 2 * sum(self.savers[i][1] for i in small) >= rows:
            small = []  # e.g. a step of decoders only: the views cover most of the tensor
        self._copy_at = [None] * len(self.savers)
        index, at = [], 0
        for i in small:
            start, n, _ = self.savers[i]
            index.extend(range(start, start + n))
            self._copy_at[i], at = at, at + n
        rows = torch.tensor(index) if index else None
        if rows is not None and device.type == "cuda":  # from pinned memory: no stream sync mid-forward
            rows = rows.pin_memory().to(device, non_blocking=True)
        self._copy_rows = rows

    def save_layers(self, k_pre: torch.Tensor, v: torch.Tensor) -> None:
        for start, n, state in self.savers:
            state.chunks.append((k_pre[:, start : start + n], v[:, start : start + n]))


class StoreConnector:
    def __init__(self, config: StoreConfig, engine: LLMEngine) -> None:
        spec = engine.spec
        self.config = config
        self.engine = engine
        storage = resolve_dtype(config.storage_dtype or engine.config.dtype)
        self.layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, storage)
        long = "-longrope" if engine.model.rotary.long else ""  # every token rotated with the long factors
        fingerprint = f"{spec.fingerprint()}{long}-{engine.loaded.weights_id}-{storage}".replace("torch.", "")
        # the layers with a sliding window, which load only what their window reaches
        self.window = spec.any_window
        self.windowed = frozenset(spec.window_layers)
        reach = (self.window or 0) + engine.pool.page_size  # a load reads them from a page's start
        self.store = AttentionStore(config, self.layout, fingerprint, pin=engine.device.type == "cuda",
                                    windowed=self.windowed, window_reach=reach)  # fmt: skip
        self.full_layers = [i for i in range(spec.num_layers) if i not in self.windowed]
        try:
            self.loader = Loader(engine.pool, engine.model.rotary, self.layout, engine.device)
            self.saver = Saver(self.layout, self.store.host.allocate, engine.device)
        except BaseException:  # (the store's I/O thread would hold it, and its folder's lock, for ever)
            if hasattr(self, "loader"):
                self.loader.close()
            self.store.close()
            raise
        # a script that never calls close() still gets its saves flushed, and its threads stopped
        # before the interpreter tears down (a thread caught inside torch then aborts the process)
        self._finalizer = weakref.finalize(self, _shutdown, self.store, self.loader, self.saver)

    # -- add_request ---------------------------------------------------------------------------
    def prepare(self, req: Request) -> None:
        """Plan the turn: match the session's record, truncate an overflowing conversation."""
        window = self.engine.max_model_len
        reserve = min(req.params.max_tokens or window, window // 4)
        head = self.config.keep_head_tokens if self.config.keep_head_tokens is not None else req.head_tokens
        mode = None if req.truncate else "whole"
        key, plan = self.store.plan(req.cache_key, list(req.logical_prompt), window, reserve, head, mode,
                                    req.tail_tokens, req.turn_starts, req.cache_salt)  # fmt: skip
        for forgotten in self.store.take_forgotten():  # another replica forgot it: its device blocks go too
            self.engine.pages.forget_owner(forgotten)
        req.prompt_token_ids = plan.effective_prompt
        req.private_from = plan.inexact_from
        req.metrics.truncated_tokens = plan.truncated_now
        # prompt logprobs need every prompt position computed: the store supplies nothing (it still saves)
        req.store_state = TurnState(key=key, plan=plan, bypass=req.params.prompt_logprobs is not None)

    # -- scheduler: admission ------------------------------------------------------------------
    def lookup(self, req: Request, device_hit: int) -> int:
        """Tokens the store can supply for this request (the scheduler takes max(device, store))."""
        st: TurnState = req.store_state
        st.tiers = [] if st.bypass else self.store.available(st.plan.reuse)
        limit = len(req.prompt_token_ids) - 1
        st.tiers = _tiers_until(st.tiers, self._windows_held(st.tiers, limit))
        st.reuse = [span for span, _ in st.tiers]
        st.hit = sum(s.length for s in st.reuse)
        usable = min(st.hit, limit)
        counts = {"host": 0, "disk": 0, "remote": 0}
        window_from = self._window_from(device_hit, usable)
        for span, tier, a, b, _pos in _overlaps(st.tiers, device_hit, usable):
            if tier == "host" and b > window_from and self._host_copy_slim(span.seg_id):
                counts["disk"] += b - max(a, window_from)  # (their windowed layers read from its file)
                b = max(a, window_from)
            counts[tier] += b - a
        if req.record_reuse:
            req.metrics.cached_tokens.update(counts)
        return usable

    def ready(self, req: Request) -> bool:
        """Whether the scheduler may admit the request now: not while segments of its history are
        still on their way from the remote tier, for at most `remote_wait_s` (then it recomputes
        what has not arrived). Other requests are admitted meanwhile."""
        st: TurnState | None = req.store_state
        remote = self.store.remote
        if remote is None or st is None or st.bypass or not remote.pending(st.plan.reuse):
            return True
        now = time.monotonic()
        if st.remote_deadline is None:  # the turn's whole wait, however often admission asks
            st.remote_deadline = now + self.config.remote_wait_s
        return now >= st.remote_deadline

    def idle(self) -> None:
        """No request could be scheduled: if fetches are in flight, wait a little for one to land."""
        if self.store.remote is not None:
            self.store.remote.wait_landed(IDLE_WAIT_S)

    # -- one step ------------------------------------------------------------------------------
    def begin_step(self, scheduled: list[ScheduledSeq]) -> StepHooks:
        jobs, savers = [], []
        start = 0
        for s in scheduled:
            req, st = s.request, s.request.store_state
            if st is not None and s.fresh:
                job = self._start_turn(req, st)
                if job is not None:
                    jobs.append(job)
            if st is not None and st.save:
                savers.append((start, s.num_new, st))
            start += s.num_new
        return StepHooks(jobs, savers)

    def _start_turn(self, req: Request, st: TurnState) -> LoadJob | None:
        """A request was just admitted: load what the store supplies (unless preloaded), start capturing the rest."""
        if not st.counted:
            self._count_lookup(req)
            st.counted = True
        device_hit = req.device_hit
        usable = max(req.num_computed, device_hit)
        st.chunks, st.save = [], req.save_to_store  # (again after a preemption: admitted anew; none captured if not saved)
        st.capture_start = min(st.hit, usable)
        if device_hit > st.hit:
            if self._partial_pages(req, st.hit, device_hit):
                # another turn's load left their windowed layers unwritten: nothing to save them from
                log.debug("store: request %s reused partial device pages; its turn is not saved", req.request_id)
                st.save = False
            else:
                self._capture_from_pages(req, st, st.hit, device_hit)
        if st.pending_load is None and usable > device_hit:
            st.pending_load = self._load_job(req, st, device_hit, usable)
            self.loader.submit(st.pending_load, background=self.config.layerwise)
        return st.pending_load

    def _count_lookup(self, req: Request) -> None:
        """Hit statistics, once per turn, at its first admission (a staged lookup that is undone does not count)."""
        s = self.store.stats
        s.lookups += 1
        s.lookup_tokens += len(req.prompt_token_ids)
        for tier in s.hit_tokens:
            s.hit_tokens[tier] += req.metrics.cached_tokens[tier]

    # -- the device read buffer: loading the queue head before it is admitted -------------------
    def preload(self, req: Request) -> None:
        """The scheduler staged the queue head (pages for its stored prefix): load them in the background now."""
        st: TurnState = req.store_state
        device_hit = req.device_hit
        if any(self.store.saving(span.seg_id) for span, *_ in _overlaps(st.tiers, device_hit, req.num_computed)):
            return  # never block the engine thread on a save in flight: admission loads it instead
        st.pending_load = self._load_job(req, st, device_hit, req.num_computed)
        self.loader.submit(st.pending_load, background=True)
        self.store.stats.preloads += 1

    def unstage(self, req: Request) -> None:
        """A staged request gives its pages back before running: let its load finish writing into them."""
        st: TurnState | None = req.store_state
        job = st.pending_load if st is not None else None
        if job is None:
            return
        st.pending_load = None
        job.wait_all()
        if job.failed is not None:
            self._load_failed(st, *job.failed)

    def _load_failed(self, st: TurnState, seg_id: str, reason: str, file_only: bool = False) -> None:
        if seg_id:  # a segment failed its check: forget it (or its file alone); a retry serves a shorter hit
            self.store.drop_corrupt(seg_id, reason, file_only)
        else:  # a bug or a device error: the same load could fail again, so the retry skips the store
            log.warning("store: a load failed (%s); recomputing the turn without stored KV", reason)
            st.bypass = True

    def _load_job(self, req: Request, st: TurnState, lo: int, hi: int) -> LoadJob:
        """Load request tokens [lo, hi); the first token computed is hi."""
        window_from = self._window_from(lo, hi)
        pieces = []
        for span, _tier, a, b, pos in _overlaps(st.tiers, lo, hi):
            if b <= window_from and not self.full_layers:
                continue  # no layer reads these tokens
            host = self.store.segment_host(span.seg_id)
            if host is None and not self.store.wait_saved(span.seg_id, timeout=30):
                log.warning("store: segment %s still saving after 30 s", span.seg_id)
            host = host or self.store.segment_host(span.seg_id)
            lo_in = span.lo + a - pos
            piece = Piece(span.seg_id, lo_in, lo_in + b - a, a, host)
            wanted = self._tokens_read(piece, lo, window_from)  # what the kernel should read ahead
            if host is not None:  # the layers a copy without its windowed ones lacks, if read: from its file
                wanted = {layer: run for layer, run in wanted.items() if host.layer(layer) is None}
            if (host is None or wanted) and self.store.disk is not None:
                piece.open_disk = lambda seg=span.seg_id, wanted=wanted: self.store.disk.open(seg, wanted)
            pieces.append(piece)
        dev, page_size = self.engine.device, self.engine.pool.page_size
        slots = KVPool.slots_for(req.pages, page_size, lo, hi, dev)
        positions = torch.arange(lo, hi, device=dev)
        first = KVPool.contiguous_start(req.pages, page_size, lo, hi)
        self.engine.pages.mark_partial(req.pages[lo // page_size : window_from // page_size])
        return LoadJob(pieces, slots, positions, lo, self.layout.num_layers, first_slot=first,
                       windowed=self.windowed, window_from=window_from)  # fmt: skip

    def _tokens_read(self, piece: Piece, lo: int, window_from: int) -> dict[int, tuple[int, int]]:
        """The tokens [start, end) of its segment that a load reads in each layer it reads from it:
        all the piece's in full layers, from the window's first in windowed ones (as the loader does)."""
        starts = {layer: first_read(piece, layer, lo, self.windowed, window_from) for layer in range(self.layout.num_layers)}
        return {layer: (start, piece.hi) for layer, start in starts.items() if start < piece.hi}

    def _host_copy_slim(self, seg_id: str) -> bool:
        """Whether the segment's host copy lacks the windowed layers (a load reads them from its file)."""
        host = self.store.segment_host(seg_id)
        return host is not None and host.layers is not None

    def _window_from(self, lo: int, hi: int) -> int:
        """The first of request tokens [lo, hi) that a windowed layer loads: the page holding the
        oldest key the first new token (at hi) sees there. From a page's start, so that each page
        is either written whole in those layers or partial, which the prefix cache knows."""
        if self.window is None:
            return lo
        page_size = self.engine.pool.page_size
        return max(lo, (hi - self.window + 1) // page_size * page_size)

    def _windows_held(self, tiers: list[tuple[Span, str]], limit: int) -> int:
        """The furthest point, up to `limit`, a turn may resume from these spans: where no windowed
        layer's load needs a segment that dropped them with no whole copy on disk (tokens past every
        window of its records, which this turn reaches: an edit further back, another conversation's prefix)."""
        hi = min(sum(span.length for span, _ in tiers), limit)
        while hi > 0 and self.window is not None:
            start = self._window_from(0, hi)
            lacking = [pos for span, _tier, _a, _b, pos in _overlaps(tiers, start, hi) if not self.store.windowed_held(span.seg_id)]
            if not lacking:
                return hi
            hi = max(lacking)  # resume before the last segment lacking them
        return max(hi, 0)

    def _partial_pages(self, req: Request, lo: int, hi: int) -> bool:
        """Whether a page holding request tokens [lo, hi) lacks its windowed layers."""
        page_size = self.engine.pool.page_size
        return any(self.engine.pages.is_partial(p) for p in req.pages[lo // page_size : -(-hi // page_size)])

    def _capture_from_pages(self, req: Request, st: TurnState, lo: int, hi: int) -> None:
        """Tokens served by another request's device pages: recover their pre-RoPE keys by rotating back."""
        dev = self.engine.device
        slots = KVPool.slots_for(req.pages, self.engine.pool.page_size, lo, hi, dev)
        rotary, positions = self.engine.model.rotary, torch.arange(lo, hi, device=dev)
        f32 = self.engine.pool.dtype == torch.float32  # else undo in float32: bf16 tables are lossy
        ks, vs = [], []
        ropes = rotary.per_layer(positions, self.layout.num_layers, exact=not f32)  # a table per layer type
        for layer, (cos, sin) in enumerate(ropes):
            k, v = self.engine.pool.gather(layer, slots)
            k = apply_rotary(k if f32 else k.float(), cos, -sin)  # rotating by -theta undoes RoPE
            ks.append(k if f32 else k.to(self.layout.dtype))
            vs.append(v)
        st.chunks.append((ks, vs))

    def end_step(self, scheduled: list[ScheduledSeq]) -> list[Request]:
        """Requests whose load failed a check: the engine recomputes them (never a wrong token)."""
        failed = []
        for s in scheduled:
            st: TurnState | None = s.request.store_state
            job = st.pending_load if st is not None else None
            if job is None:
                continue
            st.pending_load = None
            s.request.metrics.load_s += job.waited_s + job.written_s  # what the load cost the forward
            job.done.wait(timeout=30)  # a CUDA loader thread's own timing lands just after the layers
            s.request.metrics.load_busy_s += job.busy_s
            for tier, n in job.bytes_read.items():
                self.store.stats.bytes_loaded[tier] += n
            if job.failed is not None:
                self._load_failed(st, *job.failed)
                failed.append(s.request)
        return failed

    def draft_capture(self, req: Request) -> Callable[[int], None] | None:
        """For a request whose step checked speculated tokens: a function keeping the first `rows` of
        the KV this step captured for it (the rows of the tokens it keeps); None when it captures none."""
        st: TurnState | None = req.store_state
        if st is None or not st.save or not st.chunks:
            return None
        whole = st.chunks[-1]  # (this step's: every saver gets its piece at the forward's first layer)

        def keep(rows: int) -> None:
            ks, vs = whole
            if isinstance(ks, list):  # layer by layer
                st.chunks[-1] = ([k[:rows] for k in ks], [v[:rows] for v in vs])
            else:  # every layer in one tensor
                st.chunks[-1] = (ks[:, :rows], vs[:, :rows])

        return keep

    # -- finish --------------------------------------------------------------------------------
    def request_finished(self, req: Request, saved: bool) -> None:
        st: TurnState | None = req.store_state
        if st is None:
            return
        self.unstage(req)  # aborted while its preload ran: the pages are freed next
        req.store_state = None
        plan = st.plan
        if saved and st.chunks and req.num_computed > st.capture_start:
            seg = self.store.new_segment_id()
            n = req.num_computed - st.capture_start
            full = (req.logical_prompt or []) + req.output_token_ids
            logical_len = req.num_computed if req.num_computed <= plan.head else req.num_computed - plan.head + plan.dropped_until
            reuse = slice_spans(st.reuse, 0, st.capture_start)
            self.store.commit(st.key, full[:logical_len], plan, reuse, Span(seg, 0, n))
            metrics = req.metrics

            def done(seg_id: str, kv: SegmentKV | None, seconds: float) -> None:
                metrics.save_s = seconds
                if kv is not None:
                    self.store.add_segment(seg_id, kv)
                else:
                    self.store.add_segment_failed(seg_id)

            self.saver.submit(SaveJob(seg, st.chunks, done))
        self.store.release(plan.reuse)

    # -- look-ahead, stats, shutdown -----------------------------------------------------------
    def publish_queue(self, waiting: Iterable[Request]) -> None:
        """The look-ahead hint, every step: for each queued request in order, the record its plan
        reuses (its session's, an earlier branch of it, or the anonymous prefix it matched)."""
        self.store.on_queue([st.plan.source for r in waiting if (st := r.store_state) is not None and st.plan.source])

    def stats(self) -> dict:
        return self.store.summary()

    def check_integrity(self) -> None:
        self.store.check_integrity()

    def close(self) -> None:
        """Flush pending saves to disk and stop the store's threads (once; also run at interpreter exit)."""
        self._finalizer()


def _shutdown(store: AttentionStore, loader: Loader, saver: Saver) -> None:
    # ordered: saves still running land in the store before its I/O thread stops
    store.flush()
    loader.close()
    saver.close()
    store.close()


def _tiers_until(tiers: list[tuple[Span, str]], end: int) -> list[tuple[Span, str]]:
    """The spans (with their tiers) of request tokens [0, end)."""
    out, pos = [], 0
    for span, tier in tiers:
        if pos >= end:
            break
        take = min(span.length, end - pos)
        out.append((span if take == span.length else Span(span.seg_id, span.lo, span.lo + take), tier))
        pos += span.length
    return out


def _overlaps(tiers: list[tuple[Span, str]], lo: int, hi: int):
    """(span, tier, a, b, span start) for every span overlapping request tokens [lo, hi), clipped to [a, b)."""
    pos = 0
    for span, tier in tiers:
        a, b = max(pos, lo), min(pos + span.length, hi)
        if b > a:
            yield span, tier, a, b, pos
        pos += span.length
