"""A segment: the pre-RoPE K and V of a run of tokens a turn added, for every layer (or, once its
tokens lie beyond a sliding window's reach, for the layers without one)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch


class CorruptSegment(Exception):
    """A stored segment failed a check (checksum, size, fingerprint): treat it as missing."""


@dataclass(frozen=True)
class KVLayout:
    """Shape and dtype of stored KV; part of a segment's identity."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def element_size(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size()

    def token_bytes(self) -> int:
        """Bytes of one token's K (or V) in one layer."""
        return self.num_kv_heads * self.head_dim * self.element_size

    def segment_bytes(self, num_tokens: int) -> int:
        return 2 * self.num_layers * num_tokens * self.token_bytes()


@dataclass
class SegmentKV:
    """Host-resident KV of one segment: k and v are [held layers, tokens, kv_heads, head_dim].

    `layers` names the layers held, in order (None: every layer). A segment whose tokens every
    later turn sees only through layers without a sliding window drops the windowed ones."""

    k: torch.Tensor
    v: torch.Tensor
    layers: tuple[int, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """That layer's K and V ([tokens, kv_heads, head_dim] each), or None if it is not held."""
        if self.layers is None:
            return self.k[layer], self.v[layer]
        if layer not in self.layers:
            return None
        i = self.layers.index(layer)
        return self.k[i], self.v[i]

    def without(self, dropped: Collection[int]) -> SegmentKV:
        """A copy without those layers, in fresh memory (the original's can then be freed)."""
        kept = [(row, layer) for row, layer in enumerate(self.layers or range(self.k.shape[0])) if layer not in dropped]
        index = torch.tensor([row for row, _ in kept], dtype=torch.long, device=self.k.device)
        return SegmentKV(self.k.index_select(0, index), self.v.index_select(0, index), tuple(layer for _, layer in kept))
