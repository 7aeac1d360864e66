"""What one forward pass sees: the flat batch of new tokens and, per sequence, where its KV lives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class SeqSlice:
    """One sequence's part of a flat batch."""

    start: int  # offset of its first new token in the flat batch
    num_new: int  # new tokens computed this step
    context_len: int  # tokens already in its pages before this step
    slots: torch.Tensor  # pool slot of every token 0 .. context_len + num_new - 1
    # [num_new, total_len] True where query i may see key j; built once per step on CPU
    # (every layer reuses it); None: the model builds its own
    mask: torch.Tensor | None = None
    # slot of token 0 when all total_len tokens sit in consecutive slots: attention then reads a
    # slice of the pool instead of gathering (pages are handed out in ascending order, so common)
    first_slot: int | None = None

    @property
    def total_len(self) -> int:
        return self.context_len + self.num_new

    @property
    def is_decode(self) -> bool:
        """One new token over a cached context: it attends to every key, no causal mask."""
        return self.num_new == 1 and self.context_len > 0


class LayerHooks(Protocol):
    """How the store talks to the model: wait until layer l's loaded KV is in the pages; take layer l's pre-RoPE KV."""

    def wait_layer(self, layer: int) -> None: ...

    def save_layer(self, layer: int, k_pre: torch.Tensor, v: torch.Tensor) -> None: ...


@dataclass
class DecodeGroup:
    """Single-token sequences attended in one padded call (fewer kernel launches than one per sequence).

    Every member's context is gathered and padded to the longest; the runner groups sequences of
    similar length so that the padding stays small.
    """

    rows: torch.Tensor  # [B] flat indices of their tokens
    slots: torch.Tensor  # [B, Lmax] pool slots of each context, padded
    mask: torch.Tensor  # [B, 1, 1, Lmax] True where a slot is real


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    new_slots: torch.Tensor  # [T] pool slot of every new token
    seqs: list[SeqSlice]
    logits_indices: torch.Tensor  # flat indices whose next-token logits are wanted
    hooks: LayerHooks | None = None
    decode: list[DecodeGroup] = field(default_factory=list)  # their sequences are not in `seqs`
