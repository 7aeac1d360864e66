"""A segment: the pre-RoPE K and V of a run of tokens a turn added, for every layer."""

from __future__ import annotations

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
    """Host-resident KV of one segment: k and v are [layers, tokens, kv_heads, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
