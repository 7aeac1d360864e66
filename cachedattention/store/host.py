"""Host DRAM tier: segments as CPU tensors (pinned when the device is CUDA, for fast async copies)."""

from __future__ import annotations

import threading

import torch

from cachedattention.store.segment import SegmentKV


class HostTier:
    """contains / put / get / evict / stats over host-memory segments, within a byte budget."""

    def __init__(self, budget_bytes: int, pin: bool) -> None:
        self.budget = budget_bytes
        self.pin = pin
        self._segments: dict[str, SegmentKV] = {}
        self._used = 0
        self._lock = threading.Lock()

    def contains(self, seg_id: str) -> bool:
        return seg_id in self._segments

    def get(self, seg_id: str) -> SegmentKV | None:
        return self._segments.get(seg_id)

    def put(self, seg_id: str, kv: SegmentKV) -> None:
        """Add a segment; the caller made room first (RuntimeError if it did not)."""
        with self._lock:
            if seg_id in self._segments:
                return
            if self._used + kv.nbytes > self.budget:
                raise RuntimeError(f"host tier over budget: {self._used} + {kv.nbytes} > {self.budget}")
            kv = self.pinned(kv)  # a no-op for callers that pinned it first, outside their locks
            self._segments[seg_id] = kv
            self._used += kv.nbytes

    def pinned(self, kv: SegmentKV) -> SegmentKV:
        """kv in page-locked memory when this tier pins (CUDA: device copies from it run async).
        Pinning a large segment takes long: do it before taking a lock others wait on."""
        if self.pin and not kv.k.is_pinned():
            return SegmentKV(kv.k.pin_memory(), kv.v.pin_memory(), kv.layers)
        return kv

    def shrink(self, seg_id: str, kv: SegmentKV) -> None:
        """Replace a held segment by a smaller copy of it (one without some layers)."""
        with self._lock:
            old = self._segments[seg_id]
            if kv.nbytes > old.nbytes:
                raise RuntimeError(f"host tier: {seg_id} would grow from {old.nbytes} to {kv.nbytes} bytes")
            self._segments[seg_id] = kv
            self._used += kv.nbytes - old.nbytes

    def evict(self, seg_id: str) -> SegmentKV | None:
        with self._lock:
            kv = self._segments.pop(seg_id, None)
            if kv is not None:
                self._used -= kv.nbytes
            return kv

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host buffer for a segment being saved (pinned on CUDA so device->host copies are async)."""
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def used_bytes(self) -> int:
        return self._used

    def segment_ids(self) -> list[str]:
        return list(self._segments)

    def stats(self) -> dict[str, int]:
        return {"host_bytes_used": self._used, "host_bytes_budget": self.budget, "host_segments": len(self._segments)}

    def check_integrity(self) -> None:
        used = sum(kv.nbytes for kv in self._segments.values())
        if used != self._used:
            raise RuntimeError(f"host tier accounting drift: {used} != {self._used}")
        if used > self.budget:
            raise RuntimeError(f"host tier over budget: {used} > {self.budget}")
