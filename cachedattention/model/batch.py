"""What one forward pass sees: the flat batch of new tokens and, per sequence, where its KV lives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from cachedattention.lora.batch import LoRABatch


@dataclass
class WindowBlock:
    """New tokens [a, b) of a sequence in a layer with a sliding window: the keys they see are at
    positions [lo, hi), `mask` [b - a, hi - lo] True where a row sees a key (transformers' rule: a key
    at or before the query, fewer than `window` positions back)."""

    a: int
    b: int
    lo: int
    hi: int
    mask: torch.Tensor


@dataclass
class SeqSlice:
    """One sequence's part of a flat batch."""

    start: int  # offset of its first new token in the flat batch
    num_new: int  # new tokens computed this step
    context_len: int  # tokens already in its pages before this step
    pages: torch.Tensor  # the pages holding tokens 0 .. context_len + num_new - 1, in order
    # [num_new, total_len] True where query i may see key j; built once per step on CPU
    # (every layer reuses it); None: the model builds its own
    mask: torch.Tensor | None = None
    # slot of token 0 when all total_len tokens sit in consecutive slots: attention then reads a
    # slice of the pool instead of gathering its pages
    first_slot: int | None = None
    # attend the cached history and the new tokens apart, merged by log-sum-exp (CPU, long history:
    # model/split_attention.py); the runner decides, and then builds no mask
    split: bool = False
    # in a layer with a sliding window, when the window cuts this sequence's context (then no split
    # either): its new tokens in blocks of rows, each over the keys its rows see; None where it does not
    window_blocks: list[WindowBlock] | None = None

    @property
    def total_len(self) -> int:
        return self.context_len + self.num_new

    @property
    def is_decode(self) -> bool:
        """One new token over a cached context: it attends to every key, no causal mask."""
        return self.num_new == 1 and self.context_len > 0


class LayerHooks(Protocol):
    """How the store talks to the model: wait until layer l's loaded KV is in the pages; take layer l's
    pre-RoPE KV (layers in order, each step), or every layer's at once ([layers, tokens, ...])."""

    def wait_layer(self, layer: int) -> None: ...

    def save_layer(self, layer: int, k_pre: torch.Tensor, v: torch.Tensor) -> None: ...

    def save_layers(self, k_pre: torch.Tensor, v: torch.Tensor) -> None: ...


@dataclass
class DecodeGroup:
    """Single-token sequences attended in one padded call (fewer kernel launches than one per sequence).

    Every member's context is gathered and padded to the longest; the runner groups sequences of
    similar length so that the padding stays small.
    """

    rows: torch.Tensor  # [B] flat indices of their tokens
    pages: torch.Tensor  # [B, P] the pages of each context, padded with page 0
    mask: torch.Tensor  # [B, 1, 1, P * page_size] True where a token is real
    # for a layer with a sliding window: each context's pages from the one holding its window's first
    # token, padded with page 0 ([B, Pw]), and its last window tokens in them ([B, 1, 1, Pw * page_size])
    window_pages: torch.Tensor | None = None
    window_mask: torch.Tensor | None = None


class DecodeKernel(Protocol):
    """Attention of one new token per sequence straight over the paged pool (kernels/paged_decode.py)."""

    def __call__(self, q: torch.Tensor, out: torch.Tensor, rows: torch.Tensor, k_pool: torch.Tensor,
                 v_pool: torch.Tensor, pages: torch.Tensor, page_start: torch.Tensor, lengths: torch.Tensor,
                 page_size: int, starts: torch.Tensor | None = None, cap: float | None = None,
                 storage: torch.dtype = torch.float32) -> None: ...


@dataclass
class PagedDecode:
    """Every decoding sequence of the step, attended by a kernel that reads the pool's pages in place
    (no gather, no padding); built once per step, used by every layer."""

    kernel: DecodeKernel
    rows: torch.Tensor  # [S] flat indices of their tokens
    pages: torch.Tensor  # their page tables, concatenated
    page_start: torch.Tensor  # [S + 1] where each sequence's pages start in `pages`
    lengths: torch.Tensor  # [S] context length including the new token
    page_size: int
    # [S] each context's first token in a layer with a sliding window (None: the model has none)
    window_starts: torch.Tensor | None = None
    storage: torch.dtype = torch.float32  # what the pages hold (vLLM's --kv-cache-dtype)

    def attend(self, q: torch.Tensor, out: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
               windowed: bool = False, cap: float | None = None) -> None:  # fmt: skip
        starts = self.window_starts if windowed else None
        self.kernel(q.contiguous(), out, self.rows, k_pool, v_pool, self.pages, self.page_start, self.lengths,
                    self.page_size, starts, cap, self.storage)  # fmt: skip


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    new_slots: torch.Tensor  # [T] pool slot of every new token
    seqs: list[SeqSlice]
    logits_indices: torch.Tensor  # flat indices whose next-token logits are wanted
    hooks: LayerHooks | None = None
    decode: list[DecodeGroup] = field(default_factory=list)  # their sequences are not in `seqs`
    paged_decode: PagedDecode | None = None  # its sequences are neither in `seqs` nor in `decode`
    lora: LoRABatch | None = None  # the rows that run with a LoRA adapter, by adapter (None: none do)


def window_blocks(num_new: int, context: int, window: int, block: int, device: torch.device) -> list[WindowBlock]:
    """New tokens at positions context .. context + num_new - 1 in blocks of `block` rows, each with
    the keys its rows see: a long prompt then attends about num_new x (window + block) scores, not
    num_new x (context + num_new) (the masks are built on the device: no transfer of a large one)."""
    blocks = []
    for a in range(0, num_new, block):
        b = min(num_new, a + block)
        lo, hi = max(0, context + a - window + 1), context + b
        query = torch.arange(context + a, context + b, device=device)[:, None]
        key = torch.arange(lo, hi, device=device)[None, :]
        blocks.append(WindowBlock(a, b, lo, hi, (key <= query) & (query - key < window)))
    return blocks
