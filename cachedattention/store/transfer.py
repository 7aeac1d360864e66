"""Moving KV between the store tiers and the device pages, layer by layer, off the compute thread.

Loading on CUDA: a loader thread drives a copy stream that reads layer l of every piece, rotates
the pre-RoPE keys to the positions the tokens have now, writes them into the pages, and records
layer l's event; the forward waits only for the layer it is about to compute.
Loading on a CPU: reading, checking, rotating and writing are all compute on the cores the
forward keeps busy, so the engine's own thread does them. A job served from host alone is written
when it is submitted. For a job with disk pieces the files are opened at submission, which starts
the kernel reading them ahead (DMA, no CPU of ours); the forward then reads and writes layer l
from the page cache just before computing it, so the disk time overlaps the forward.
Saving: the forward hands each layer's pre-RoPE K/V (views, no copy) to a per-request buffer (a
fused decode step hands every layer's at once); at the end of the request the save thread copies
them into a host segment: a per-layer piece layer by layer, an every-layer piece in one copy.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from cachedattention.kvcache.kv_pool import KVPool
from cachedattention.model.rope import RotaryEmbedding, rotate_into
from cachedattention.store.disk import SegmentReader
from cachedattention.store.fresh_thread import call_in_fresh_thread
from cachedattention.store.segment import CorruptSegment, KVLayout, SegmentKV

# Some tokens' pre-RoPE (K, V), each indexed by layer: a [layers, tokens, kv_heads, head_dim] view (a fused
# decode step hands over every layer at once) or a list with one [tokens, kv_heads, head_dim] per layer.
KVPiece = tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | list[torch.Tensor]]

log = logging.getLogger(__name__)


@dataclass
class Piece:
    """Tokens [lo, hi) of one segment, landing at request tokens [dst, dst + hi - lo)."""

    seg_id: str
    lo: int
    hi: int
    dst: int
    host: SegmentKV | None  # set when read from host memory
    # set when read from disk: every layer, or those a host copy lacks (the windowed ones, past every window)
    open_disk: Callable[[], SegmentReader] | None = None


@dataclass
class LoadJob:
    pieces: list[Piece]
    slots: torch.Tensor  # pool slots of request tokens [start, end)
    positions: torch.Tensor  # positions those tokens have now (after any truncation)
    start: int
    num_layers: int
    first_slot: int | None = None  # set when the slots are consecutive: pieces land in plain slices
    # layers with a sliding window load only request tokens from `window_from` on: no query of this
    # request reaches the older ones there (the pages holding only those are marked partial)
    windowed: frozenset[int] = frozenset()
    window_from: int = 0
    events: list[threading.Event] = field(default_factory=list)
    cuda_events: list = field(default_factory=list)
    # (segment, reason, whether only its file failed: the layers its host copy lacks) when a read failed its check
    failed: tuple[str, str, bool] | None = None
    # each layer's cos/sin of `positions` (a table per layer type), filled by the loader
    rope: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    scratch: torch.Tensor | None = None  # rotated keys before a scatter (non-consecutive slots), reused per layer
    # CPU, layer-wise: loads one layer (read, check, rotate, write) on the forward's thread when
    # it reaches that layer (`wait`); the job's files are open and being read ahead by the kernel
    load_layer: Callable[[LoadJob, int], None] | None = None
    waited_s: float = 0.0  # time the forward spent waiting for this job's layers
    written_s: float = 0.0  # time the forward spent loading layers itself (CPU)
    read_s: float = 0.0  # the loader's own duration, start to last layer
    bytes_read: dict[str, int] = field(default_factory=lambda: {"host": 0, "disk": 0})
    # set once read_s is final: a CUDA loader thread times its stream after the forward has consumed
    # the layers, so whoever reports the load waits for this, not for the layers' events
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.events = [threading.Event() for _ in range(self.num_layers)]

    @property
    def busy_s(self) -> float:
        """The "load alone" time: the loader's, plus the writes the forward did itself (CPU)."""
        return self.read_s + self.written_s

    def wait(self, layer: int) -> None:
        if not self.events[layer].is_set():
            t = time.perf_counter()
            self.events[layer].wait()
            self.waited_s += time.perf_counter() - t
        if self.cuda_events:
            torch.cuda.current_stream().wait_event(self.cuda_events[layer])
        if self.load_layer is not None:
            t = time.perf_counter()
            self.load_layer(self, layer)
            self.written_s += time.perf_counter() - t  # load work the forward does itself

    def wait_all(self) -> None:
        """Block until the loader is done with this job, before its pages may be freed or reused
        (on a CPU, the layers of a job that never runs are simply not loaded)."""
        for ev in self.events:
            ev.wait()
        if self.cuda_events:
            self.cuda_events[-1].synchronize()
        if self.load_layer is not None:
            self.load_layer(self, -1)  # close its files


class Loader:
    """Runs load jobs: synchronously, or layer-wise (CUDA: a loader thread driving a copy stream;
    CPU: on the forward's thread, layer by layer, while the kernel reads the files ahead)."""

    def __init__(self, pool: KVPool, rotary: RotaryEmbedding, layout: KVLayout, device: torch.device) -> None:
        self.pool = pool
        self.rotary = rotary
        self.layout = layout
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._buffer: torch.Tensor | None = None  # CPU inline loads: one layer's read, reused
        if self.stream is not None:
            self._thread = threading.Thread(target=self._loop, name="store-loader", daemon=True)
            self._thread.start()

    def submit(self, job: LoadJob, background: bool) -> None:
        if background and self.stream is None:
            # On a CPU every step of a load is compute on the cores the forward already keeps
            # busy: run beside it, a loader thread slowed the forward by more than it took on its
            # own, and the forward then waited for the starved thread's layers. Only the disk
            # itself can overlap the forward: the kernel reads the open files ahead while the
            # forward's thread loads each layer before computing it. With nothing to read, the
            # job is written right now.
            if any(p.open_disk is not None or p.host is None for p in job.pieces):
                self._start_inline(job)
                return
            background = False
        if self.stream is not None:
            # the pages were allocated (and maybe zeroed) on the compute stream: order after it
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            job.cuda_events = [torch.cuda.Event() for _ in range(job.num_layers)]
        if background:
            self._jobs.put(job)
        else:
            self.run(job)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self.run(job)
            del job  # its index tensors: not held until the next job arrives

    def _start_inline(self, job: LoadJob) -> None:
        """CPU, disk pieces: open the files now (the kernel starts reading them ahead); each layer
        is then loaded by the forward's thread when it reaches it (`LoadJob.wait`)."""
        readers: dict[str, SegmentReader] = {}
        try:
            for p in job.pieces:
                if (p.host is None or p.open_disk is not None) and p.seg_id not in readers:
                    readers[p.seg_id] = _open(p)
        except (CorruptSegment, OSError) as e:
            job.failed = _failure(e, str(e))
        except Exception as e:  # never leave the job's events unset: its pages' owner would wait for ever
            log.exception("store: a load job failed")
            job.failed = ("", repr(e), False)

        loaded: set[int] = set()

        def load_layer(job: LoadJob, layer: int) -> None:
            if layer >= 0 and layer not in loaded and readers:
                loaded.add(layer)
                with torch.inference_mode():
                    # each layer is written into the pages before the next is read: one buffer serves all
                    self._load_layer_or_fail(job, layer, readers, self._read_buffer(readers))
            if layer < 0 or layer == job.num_layers - 1:
                for r in readers.values():
                    r.close()
                readers.clear()

        job.load_layer = load_layer
        for ev in job.events:  # nothing runs elsewhere: the forward never waits on another thread
            ev.set()
        job.done.set()  # its timing is the forward's own (written_s)

    def _read_buffer(self, readers: dict[str, SegmentReader]) -> torch.Tensor:
        """The CPU inline loads' reusable read buffer, grown to the largest layer of these files."""
        need = max(r.layer_nbytes for r in readers.values())
        if self._buffer is None or self._buffer.numel() < need:
            self._buffer = torch.empty(need, dtype=torch.uint8)
        return self._buffer

    def run(self, job: LoadJob) -> None:
        readers: dict[str, SegmentReader] = {}
        start = time.perf_counter()
        try:
            ctx = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
            with ctx, torch.inference_mode():
                for layer in range(job.num_layers):
                    self._load_layer_or_fail(job, layer, readers)
                    if job.cuda_events:
                        job.cuda_events[layer].record(self.stream)
                    job.events[layer].set()
            if self.stream is not None:
                self.stream.synchronize()  # only this thread waits: it times the load alone
            job.read_s = time.perf_counter() - start  # its own field: the forward adds to written_s
        except Exception as e:  # e.g. a CUDA error in a record or a sync: fail the job, keep the thread
            log.exception("store: a load job failed")
            job.failed = job.failed or ("", repr(e), False)
        finally:
            for r in readers.values():
                r.close()
            for ev in job.events:  # never leave the forward waiting, whatever happened
                ev.set()
            job.done.set()

    def _load_layer_or_fail(
        self, job: LoadJob, layer: int, readers: dict[str, SegmentReader], into: torch.Tensor | None = None
    ) -> None:
        """Load one layer unless the job already failed; a failure marks the job (the request
        recomputes) and never escapes, so neither the loader thread nor the forward dies of it."""
        if job.failed is not None:
            return
        try:
            self._load_layer(job, layer, readers, into)
        except (CorruptSegment, OSError) as e:  # an unreadable file is as good as corrupt
            job.failed = _failure(e, str(e))
        except Exception as e:  # a bug: say where
            log.exception("store: loading layer %d failed", layer)
            job.failed = _failure(e, repr(e))

    def _load_layer(
        self, job: LoadJob, layer: int, readers: dict[str, SegmentReader], into: torch.Tensor | None = None
    ) -> None:
        for p in job.pieces:
            lo = first_read(p, layer, job.start, job.windowed, job.window_from)
            if lo >= p.hi:
                continue  # (a file never read for this layer: the windowed layers of an old turn)
            held = p.host.layer(layer) if p.host is not None else None
            if held is not None:
                k, v = held[0][lo : p.hi], held[1][lo : p.hi]
                tier = "host"
            else:
                if p.seg_id not in readers:
                    readers[p.seg_id] = _open(p)
                reader = readers[p.seg_id]
                try:
                    if p.hi > reader.n:
                        raise CorruptSegment(f"segment {p.seg_id} holds {reader.n} tokens, its record names {p.hi}")
                    k, v = reader.read_tokens(layer, lo, p.hi, into)  # only the chunks holding them
                except (CorruptSegment, OSError) as e:  # an unreadable file is as good as corrupt
                    e.seg_id, e.file_only = p.seg_id, p.host is not None
                    raise
                tier = "disk"
            if k.shape[0] != p.hi - lo:  # a record naming tokens its segment does not hold: never broadcast
                e = CorruptSegment(f"segment {p.seg_id} holds fewer tokens than its record names ({lo}..{p.hi})")
                e.seg_id = p.seg_id
                raise e
            job.bytes_read[tier] += 2 * k.numel() * k.element_size()
            a = p.dst + lo - p.lo - job.start
            self._write_piece(job, layer, a, a + p.hi - lo, k, v)

    def _write_piece(self, job: LoadJob, layer: int, a: int, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Job tokens [a, b) into the pages; keys rotated to the positions these tokens have now."""
        if job.rope is None:  # the same positions for every layer: each table looked up once per job
            job.rope = self.rotary.per_layer(job.positions, job.num_layers)
        cos, sin = job.rope[layer]
        k = k.to(self.device, non_blocking=True)
        pool = self.pool
        if job.first_slot is not None and pool.exact:  # rotated straight into the pages
            s = job.first_slot + a
            rotate_into(pool.k[layer][s : s + b - a], k, cos[a:b], sin[a:b])
            pool.v[layer][s : s + b - a].copy_(v, non_blocking=True)
            return
        if job.scratch is None:
            shape = (job.slots.numel(), *pool.k[layer].shape[1:])
            job.scratch = torch.empty(shape, dtype=pool.dtype, device=self.device)
        k_rot = rotate_into(job.scratch[: b - a], k, cos[a:b], sin[a:b])
        v = v.to(self.device, non_blocking=True).to(pool.dtype)
        if job.first_slot is not None:
            pool.write_run(layer, job.first_slot + a, k_rot, v)
        else:
            pool.write(layer, job.slots[a:b], k_rot, v)

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=30)


def first_read(piece: Piece, layer: int, start: int, windowed: frozenset[int], window_from: int) -> int:
    """The piece's first segment token a load from request token `start` reads in `layer` (windowed
    layers: from request token `window_from`); none when it is the piece's end."""
    first = window_from if layer in windowed else start
    return piece.lo + max(0, first - piece.dst)


def _open(p: Piece) -> SegmentReader:
    try:
        if p.open_disk is None:  # (saved nowhere: a host too small to take it, and no disk tier)
            raise CorruptSegment(f"segment {p.seg_id} is in no tier" if p.host is None else
                                 f"segment {p.seg_id}: a layer its host copy lacks has no file to come from")
        return p.open_disk()
    except (CorruptSegment, OSError) as e:
        e.seg_id, e.file_only = p.seg_id, p.host is not None  # (a host copy's own layers stay good)
        raise


def _failure(e: BaseException, reason: str) -> tuple[str, str, bool]:
    """A load job's failure: the segment at fault (or ""), why, and whether only its file failed
    (a host copy holds the rest: the file alone is dropped)."""
    return getattr(e, "seg_id", ""), reason, getattr(e, "file_only", False)


@dataclass
class SaveJob:
    seg_id: str
    chunks: list[KVPiece]  # the segment's pre-RoPE K/V, in token order
    on_done: Callable[[str, SegmentKV, float], None]
    ready: torch.cuda.Event | None = None


class Saver:
    """Copies finished requests' pre-RoPE KV into host segments, piece by piece, on its own thread."""

    def __init__(self, layout: KVLayout, allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor], device: torch.device) -> None:
        self.layout = layout
        self.allocate = allocate
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="store-saver", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob) -> None:
        if self.stream is not None:
            job.ready = torch.cuda.Event()
            job.ready.record(torch.cuda.current_stream())
        self._jobs.put(job)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                t = time.perf_counter()
                # CPU kernels: keep no OpenMP team alive between jobs (fresh_thread.py says why)
                kv = self._copy(job) if self.stream is not None else call_in_fresh_thread(self._copy, job, name="store-save")
                job.on_done(job.seg_id, kv, time.perf_counter() - t)
            except Exception:
                log.exception("store: saving segment %s failed; the turn will be recomputed next time", job.seg_id)
                job.on_done(job.seg_id, None, 0.0)
            job = kv = None  # the pre-RoPE K/V pieces (device memory on CUDA): not held until the next job

    def _copy(self, job: SaveJob) -> SegmentKV:
        n = sum(ks[0].shape[0] for ks, _ in job.chunks)
        lay = self.layout
        shape = (lay.num_layers, n, lay.num_kv_heads, lay.head_dim)
        k_out, v_out = self.allocate(shape, lay.dtype), self.allocate(shape, lay.dtype)
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with ctx, torch.inference_mode():
            if job.ready is not None:
                self.stream.wait_event(job.ready)
            pos = 0
            for ks, vs in job.chunks:
                m = ks[0].shape[0]
                if isinstance(ks, torch.Tensor):  # every layer in one tensor: one copy
                    k_out[:, pos : pos + m].copy_(ks, non_blocking=True)
                    v_out[:, pos : pos + m].copy_(vs, non_blocking=True)
                else:
                    for layer, (k, v) in enumerate(zip(ks, vs)):
                        k_out[layer, pos : pos + m].copy_(k, non_blocking=True)
                        v_out[layer, pos : pos + m].copy_(v, non_blocking=True)
                pos += m
            if self.stream is not None:
                self.stream.synchronize()
        return SegmentKV(k_out, v_out)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
