"""A step's rows grouped by the adapter they run with, and what an adapted linear layer adds for them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # (the adapter's module imports the loader, which imports the model's layers)
    from cachedattention.lora.adapter import LoRAAdapter

# the layers an adapter may target (our names): every call of theirs sees all of a step's rows, in order
ADAPTABLE = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(shared_experts?\.)?(gate|up|down)_proj)")


@dataclass(frozen=True)
class LoRAGroup:
    """The rows of one step that run with `adapter`: a slice when they are consecutive (most often:
    one request's), else their indices."""

    adapter: LoRAAdapter
    rows: slice | torch.Tensor


class LoRABatch:
    """The adapters of one forward pass. A linear layer's output for `num_rows` rows (all of the
    step's new tokens, in the batch's order) gains, for each group, scale * (x A^T) B^T on its rows."""

    def __init__(self, groups: list[LoRAGroup], num_rows: int) -> None:
        self.groups = groups
        self.num_rows = num_rows

    def add_to(self, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] != self.num_rows:  # (only layers whose every call sees the whole step are adapted)
            raise RuntimeError(f"{module} was called with {x.shape[0]} rows in a step of {self.num_rows}")
        for group in self.groups:
            pair = group.adapter.weights.get(module)
            if pair is None:
                continue
            a, b = pair
            rows = group.rows
            if isinstance(rows, slice):  # (y's rows as a view: added to in place, one call)
                y[rows].addmm_(x[rows] @ a.T, b.T)
            else:
                y.index_add_(0, rows, (x[rows] @ a.T) @ b.T)


class LoRASlot:
    """Where a model's adapted linear layers find the current step's adapters (None: the base model
    alone); the model sets it for the length of one forward pass."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None


def group_rows(spans: list[tuple[LoRAAdapter | None, int, int]], num_rows: int,
               device: torch.device) -> LoRABatch | None:  # fmt: skip
    """The step's LoRABatch from each scheduled request's adapter and rows [lo, hi); None when no row
    has an adapter."""
    by_adapter: dict[int, tuple[LoRAAdapter, list[int]]] = {}
    for adapter, lo, hi in spans:
        if adapter is not None and hi > lo:
            by_adapter.setdefault(id(adapter), (adapter, []))[1].extend(range(lo, hi))
    if not by_adapter:
        return None
    groups = []
    for adapter, rows in by_adapter.values():
        consecutive = rows[-1] - rows[0] + 1 == len(rows)
        index = slice(rows[0], rows[-1] + 1) if consecutive else torch.tensor(rows, dtype=torch.long).to(device)
        groups.append(LoRAGroup(adapter, index))
    return LoRABatch(groups, num_rows)
