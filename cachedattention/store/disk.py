"""Disk tier: one file per segment (header + per-layer K/V with checksums of each chunk of tokens) and an SQLite index.

Durability: a file is written to a temporary name, fsynced and renamed before its index row is
committed, so a crash leaves at most an orphan file (removed at start-up), never a dangling row.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import sys
import threading
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cachedattention.store import segment_format
from cachedattention.store.dir_lock import StoreDirLock
from cachedattention.store.segment import CorruptSegment, KVLayout, SegmentKV
from cachedattention.store.write_pause import WritePause

log = logging.getLogger(__name__)


def _read_into(fd: int, buf: np.ndarray, offset: int) -> int:
    """Fill `buf` from the file at `offset` with no intermediate copy; the bytes actually read."""
    if not hasattr(os, "preadv"):  # e.g. older macOS: one extra copy
        data = os.pread(fd, buf.nbytes, offset)
        buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        return len(data)
    done = 0
    while done < buf.nbytes:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got == 0:  # end of file
            break
        done += got
    return done

_SEGMENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a plain file name (ours: uuid4 hex), never a path


class DiskTier:
    """Segments as files under `root/segments`, rows in `root/index.db` (segments and session records)."""

    def __init__(self, root: str, budget_bytes: int, fingerprint: str, layout: KVLayout) -> None:
        self.root = Path(root)
        self.seg_dir = self.root / "segments"
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"store_dir {root!r} is a file, not a directory")
        self.seg_dir.mkdir(parents=True, exist_ok=True)
        self._dir_lock = StoreDirLock(self.root)
        try:
            self._open_index(budget_bytes, fingerprint, layout)
        except BaseException:
            self._dir_lock.release()
            raise

    def _open_index(self, budget_bytes: int, fingerprint: str, layout: KVLayout) -> None:
        self.budget = budget_bytes
        self.fingerprint = fingerprint
        self.layout = layout
        self._lock = threading.Lock()
        index = self.root / "index.db"
        try:
            self._db = sqlite3.connect(str(index), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS segments (seg_id TEXT PRIMARY KEY, num_tokens INT, nbytes INT, fingerprint TEXT)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, body TEXT, fingerprint TEXT)")
            # the layers a segment without its windowed ones holds (a table of its own: an older
            # engine's inserts into `segments` still work)
            self._db.execute("CREATE TABLE IF NOT EXISTS held_layers (seg_id TEXT PRIMARY KEY, layers TEXT)")
            self._sizes: dict[str, int] = {}
            self._partial: set[str] = set()  # segments whose file lacks some layers
            self._stale_rows: set[str] = set()  # rows whose file is gone but whose delete failed
            self.writes = WritePause()
            self._recover()
        except sqlite3.Error as e:
            raise OSError(f"cannot open the store's index {index}: {e}") from e

    # -- start-up -----------------------------------------------------------------------------
    def _recover(self) -> None:
        """Drop own rows whose file is gone; delete temporary files and files no row names.

        Rows of other models (another fingerprint) are left alone: they are not ours to serve or delete.
        """
        named = set()
        for seg_id, nbytes, fp in self._db.execute("SELECT seg_id, nbytes, fingerprint FROM segments").fetchall():
            if not _SEGMENT_ID.fullmatch(str(seg_id)) or not isinstance(nbytes, int) or nbytes < 0:
                # (a row naming a path, or a size that is no size, was not written here)
                log.warning("store: index row %r is not a segment's; dropping it", seg_id)
                self._db.execute("DELETE FROM segments WHERE seg_id=?", (seg_id,))
                continue
            named.add(seg_id)
            if fp != self.fingerprint:
                continue
            if not self.path(seg_id).is_file():
                log.warning("store: index row %s has no file; dropping it", seg_id)
                self._delete_row(seg_id)
                continue
            size = self.path(seg_id).stat().st_size
            if size != nbytes:  # (a damaged row, or a file changed behind it: its read checks it)
                log.warning("store: index row %s counts %d bytes, its file has %d; counting the file's", seg_id, nbytes, size)
                self._db.execute("UPDATE segments SET nbytes=? WHERE seg_id=?", (size, seg_id))
            self._sizes[seg_id] = size
        for f in self.seg_dir.iterdir():
            if f.suffix == ".tmp" or (f.suffix == ".kv" and f.stem not in named):
                self._unlink(f)
        for (seg_id,) in self._db.execute("SELECT seg_id FROM held_layers").fetchall():
            if seg_id in self._sizes:
                self._partial.add(seg_id)
            elif seg_id not in named:  # (its segment's row went first, or never came)
                self._db.execute("DELETE FROM held_layers WHERE seg_id=?", (seg_id,))

    # -- queries ------------------------------------------------------------------------------
    def path(self, seg_id: str) -> Path:
        return self.seg_dir / f"{seg_id}.kv"

    def contains(self, seg_id: str) -> bool:
        return seg_id in self._sizes

    def size(self, seg_id: str) -> int:
        return self._sizes[seg_id]

    def holds_every_layer(self, seg_id: str) -> bool:
        return seg_id not in self._partial

    def note_partial(self, seg_id: str, layers: tuple[int, ...]) -> None:
        """A file found to lack some layers that the index did not say so of (a damaged index): say so."""
        with self._lock:
            if seg_id not in self._sizes or seg_id in self._partial:
                return
            self._partial.add(seg_id)
            try:
                self._db.execute("INSERT OR REPLACE INTO held_layers VALUES (?, ?)", (seg_id, json.dumps(layers)))
            except sqlite3.Error:
                pass  # (known to this process; the next start learns it again from the file)

    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    def segment_ids(self) -> list[str]:
        return list(self._sizes)

    # -- write --------------------------------------------------------------------------------
    def put(self, seg_id: str, kv: SegmentKV) -> int:
        """Write a segment durably; returns its file size. The caller made room in the budget.

        Any failure (a full disk, an I/O error, the index refusing the row) raises OSError and
        leaves nothing behind: no temporary file, no file without its row, no row. After one,
        writes pause a while (write_pause.py): they raise DiskWritesPaused without trying.
        """
        self.writes.check()
        tmp, final = self.seg_dir / f"{seg_id}.tmp", self.path(seg_id)
        try:
            header, body = self._encode(seg_id, kv)
            with open(tmp, "wb") as f:
                f.write(header)
                for chunk in body:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            self._fsync_dir()
            size = final.stat().st_size
            with self._lock:
                if kv.layers is not None:  # first: a crash between the two leaves an orphan row, not a wrong one
                    self._db.execute("INSERT OR REPLACE INTO held_layers VALUES (?, ?)", (seg_id, json.dumps(kv.layers)))
                self._db.execute(
                    "INSERT OR REPLACE INTO segments VALUES (?, ?, ?, ?)", (seg_id, kv.num_tokens, size, self.fingerprint)
                )
                self._sizes[seg_id] = size
                if kv.layers is not None:
                    self._partial.add(seg_id)
        except (OSError, sqlite3.Error) as e:
            tmp.unlink(missing_ok=True)
            if seg_id not in self._sizes:
                final.unlink(missing_ok=True)
            self.writes.failed(e)
            if isinstance(e, OSError):
                raise
            raise OSError(f"the index refused the segment: {e}") from e
        self._wrote()
        return size

    def file_size(self, seg_id: str, kv: SegmentKV) -> int:
        return segment_format.encoded_size(seg_id, kv, self.fingerprint, self.layout)

    def _encode(self, seg_id: str, kv: SegmentKV) -> tuple[bytes, list[bytes]]:
        return segment_format.encode(seg_id, kv, self.fingerprint, self.layout)

    def _fsync_dir(self) -> None:
        fd = os.open(self.seg_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- read ---------------------------------------------------------------------------------
    def open(self, seg_id: str, wanted: Mapping[int, tuple[int, int]] | None = None) -> SegmentReader:
        """Open and validate a segment's header; CorruptSegment if anything is off. `wanted`: the
        token range [start, end) of each layer a load reads, which the kernel reads ahead (default:
        every token of every layer)."""
        return SegmentReader(self.path(seg_id), self.fingerprint, self.layout, wanted)

    def get(self, seg_id: str, layers: Collection[int] | None = None) -> SegmentKV:
        """Read a segment: every layer it holds, or those of `layers` it holds (checksums verified)."""
        wanted = None if layers is None else {layer: (0, sys.maxsize) for layer in layers}  # (read ahead: those alone)
        with self.open(seg_id, wanted) as r:
            held = [layer for layer in r.meta["layers"] if layers is None or layer in layers]
            pairs = [r.read_layer(layer) for layer in held]
        shape = (0, r.n, self.layout.num_kv_heads, self.layout.head_dim)  # (no layer held: still its tokens)
        ks = torch.stack([k for k, _ in pairs]) if pairs else torch.empty(shape, dtype=self.layout.dtype)
        vs = torch.stack([v for _, v in pairs]) if pairs else torch.empty(shape, dtype=self.layout.dtype)
        return SegmentKV(ks, vs, None if len(held) == self.layout.num_layers else tuple(held))

    # -- delete -------------------------------------------------------------------------------
    def remove(self, seg_id: str) -> None:
        """Forget a segment and delete its file. Never raises: if the index cannot be written (a full
        disk), the row is deleted after the next write that works, or at the next start-up."""
        with self._lock:
            self._sizes.pop(seg_id, None)
            self._delete_row(seg_id)
        self._unlink(self.path(seg_id))

    @staticmethod
    def _unlink(path: Path) -> None:
        """Delete a file of ours; something else there (a directory) is left, with a warning."""
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("store: cannot delete %s (%s); leaving it", path, e)

    def _delete_row(self, seg_id: str) -> None:
        """Delete a segment's row, or keep it as stale (ignored until deleted) if the index refuses."""
        self._partial.discard(seg_id)
        try:
            self._db.execute("DELETE FROM segments WHERE seg_id=?", (seg_id,))
            self._db.execute("DELETE FROM held_layers WHERE seg_id=?", (seg_id,))
            self._stale_rows.discard(seg_id)
        except sqlite3.Error:
            self._stale_rows.add(seg_id)

    def _wrote(self) -> None:
        """A write worked: the disk has room again; delete the rows that could not be deleted before."""
        self.writes.succeeded()
        if self._stale_rows:
            with self._lock:
                for seg_id in list(self._stale_rows):
                    self._delete_row(seg_id)

    # -- session records ----------------------------------------------------------------------
    def save_record(self, key: str, body: dict) -> None:
        """Persist a session's record; OSError if the index cannot be written (e.g. a full disk)."""
        self._write_index("INSERT OR REPLACE INTO records VALUES (?, ?, ?)", (key, json.dumps(body), self.fingerprint))

    def delete_record(self, key: str) -> None:
        self._write_index("DELETE FROM records WHERE key=?", (key,))

    def _write_index(self, sql: str, args: tuple) -> None:
        self.writes.check()
        try:
            with self._lock:
                self._db.execute(sql, args)
        except sqlite3.Error as e:
            self.writes.failed(e)
            raise OSError(f"the store's index could not be written: {e}") from e
        self._wrote()

    def load_records(self) -> list[tuple[str, Any]]:
        """(key, body) of this model's session records; body None where the row is not JSON text."""
        try:  # as bytes: one row that is not UTF-8 text (a damaged index) must not hide the others
            rows = self._db.execute("SELECT CAST(key AS BLOB), CAST(body AS BLOB) FROM records WHERE fingerprint=?",
                                    (self.fingerprint,)).fetchall()  # fmt: skip
        except sqlite3.Error as e:
            raise OSError(f"cannot read the store's index {self.root / 'index.db'}: {e}") from e
        out = []
        for key, body in rows:
            key = key.decode(errors="replace") if isinstance(key, bytes) else key
            try:
                out.append((key, json.loads(body.decode())))
            except (AttributeError, ValueError, RecursionError):  # (None, not UTF-8, not JSON)
                out.append((key, None))
        return out

    def check_integrity(self) -> None:
        with self._lock:  # a consistent snapshot: a write-through in progress adds its row and size together
            rows = dict(self._db.execute("SELECT seg_id, nbytes FROM segments WHERE fingerprint=?", (self.fingerprint,)))
            for seg_id in self._stale_rows:  # rows whose delete the index refused: their files are gone
                if self.path(seg_id).exists():
                    raise RuntimeError(f"disk tier: stale row {seg_id} still has a file")
                rows.pop(seg_id, None)
            if rows != self._sizes:
                raise RuntimeError("disk tier: index rows and in-memory sizes differ")
            for seg_id, size in rows.items():
                if not self.path(seg_id).exists() or self.path(seg_id).stat().st_size != size:
                    raise RuntimeError(f"disk tier: segment {seg_id} file missing or of the wrong size")
            if self.used_bytes() > self.budget:
                raise RuntimeError(f"disk tier over budget: {self.used_bytes()} > {self.budget}")

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._dir_lock.release()


class SegmentReader:
    """Reads one segment layer by layer, or a layer's run of tokens (the chunks holding them), each
    chunk's checksum verified as it goes."""

    def __init__(self, path: Path, fingerprint: str, layout: KVLayout,
                 wanted: Mapping[int, tuple[int, int]] | None = None) -> None:  # fmt: skip
        try:
            self.f = open(path, "rb")
        except OSError as e:
            raise CorruptSegment(f"{path.name}: cannot open ({e.strerror})") from e
        try:
            meta, self.body = segment_format.parse_header(self.f.read(segment_format.PREFIX.size), self.f.read, path.name)
            if meta.get("seg_id") != path.stem:  # (a file copied or renamed over another: another turn's KV)
                raise CorruptSegment(f"{path.name}: holds segment {meta.get('seg_id')!r}")
            self.half = segment_format.check_header(
                meta, self.body, os.fstat(self.f.fileno()).st_size, fingerprint, layout, path.name
            )
        except CorruptSegment:
            self.f.close()
            raise
        self.meta = meta
        self.layout = layout
        self.n = meta["num_tokens"]
        if hasattr(os, "posix_fadvise"):  # layers are read in order: let the kernel read the rest ahead
            if wanted is None:
                os.posix_fadvise(self.f.fileno(), self.body, 0, os.POSIX_FADV_WILLNEED)
            for layer, (start, end) in (wanted or {}).items():
                end = min(end, self.n)  # (a record naming more tokens fails its read, not this hint)
                if start < end and layer in meta["layers"]:  # (a layer not held fails its read)
                    for offset, size in self._extents(layer, segment_format.chunk_span(meta, start, end)):
                        os.posix_fadvise(self.f.fileno(), offset, size, os.POSIX_FADV_WILLNEED)

    def _extents(self, layer: int, chunks: tuple[int, int]) -> list[tuple[int, int]]:
        """Where a layer's K and V bytes of chunks [c0, c1) lie in the file: (offset, size) of each."""
        chunk, tb = self.meta["chunk_tokens"], self.layout.token_bytes()
        lo, hi = chunks[0] * chunk * tb, min(self.n, chunks[1] * chunk) * tb
        k_at = self.body + segment_format.layer_slot(self.meta, layer) * 2 * self.half
        return [(k_at + lo, hi - lo), (k_at + self.half + lo, hi - lo)]

    def read_layer(self, layer: int, into: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K and V, every token, checked (see read_tokens)."""
        if self.n == 0:
            shape = (0, self.layout.num_kv_heads, self.layout.head_dim)
            return torch.empty(shape, dtype=self.layout.dtype), torch.empty(shape, dtype=self.layout.dtype)
        return self.read_tokens(layer, 0, self.n, into)

    def read_tokens(self, layer: int, start: int, end: int,
                    into: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Layer `layer`'s K and V of tokens [start, end) (0 <= start < end <= the segment's
        tokens), read with the rest of their chunks and checked. `into`: a uint8 buffer of at least
        `layer_nbytes` to read into (reused by a caller that consumes each layer before reading the
        next: fresh memory costs a page fault per 4 KiB); by default a new tensor."""
        if not 0 <= start < end <= self.n:
            raise ValueError(f"tokens [{start}, {end}) are not within the segment's {self.n}")
        chunks = segment_format.chunk_span(self.meta, start, end)
        (k_at, size), (v_at, _) = self._extents(layer, chunks)
        # straight into the tensor the K and V views share: the read is these tokens' only copy
        raw = torch.empty(2 * size, dtype=torch.uint8) if into is None else into[: 2 * size]
        got_k = _read_into(self.f.fileno(), raw[:size].numpy(), k_at)
        got_v = _read_into(self.f.fileno(), raw[size:].numpy(), v_at)
        k, v = segment_format.chunk_views(raw[:got_k], raw[size : size + got_v], self.meta, self.layout, layer, chunks)
        skip = start - chunks[0] * self.meta["chunk_tokens"]
        return k[skip : skip + end - start], v[skip : skip + end - start]

    @property
    def layer_nbytes(self) -> int:
        return 2 * self.half

    def drop_page_cache(self) -> None:
        """Evict this file from the OS page cache (benchmarks of cold disk reads)."""
        os.posix_fadvise(self.f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> SegmentReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
