"""A step's rows grouped by the adapter they run with, and what an adapted linear layer adds for them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # (the adapter's module imports the loader, which imports the model's layers)
    from cachedattention.kernels.row_ops import RowOpsKernel
    from cachedattention.lora.adapter import LoRAAdapter

# the layers an adapter may target (our names): every call of theirs sees all of a step's rows, in order
ADAPTABLE = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(shared_experts?\.)?(gate|up|down)_proj)")


@dataclass(frozen=True)
class LoRAGroup:
    """The rows of one step that run with `adapter`: a slice when they are consecutive (most often:
    one request's), else their indices on the device; `index`, their indices on the CPU (the C
    kernel's)."""

    adapter: LoRAAdapter
    rows: slice | torch.Tensor
    index: torch.Tensor


class LoRABatch:
    """The adapters of one forward pass. A linear layer's output for `num_rows` rows (all of the
    step's new tokens, in the batch's order) gains, for each group, (x A^T) B on its rows: through
    the row ops' C kernel for a few float32 rows on a CPU (as the fused decode layers add it, so
    both paths agree bit for bit), else torch."""

    def __init__(self, groups: list[LoRAGroup], num_rows: int, ops: RowOpsKernel | None = None) -> None:
        self.groups = groups
        self.num_rows = num_rows
        self.ops = ops

    def add_to(self, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] != self.num_rows:  # (only layers whose every call sees the whole step are adapted)
            raise RuntimeError(f"{module} was called with {x.shape[0]} rows in a step of {self.num_rows}")
        kernel = self.ops if self.ops is not None and self.ops.takes(x) and x.is_contiguous() and y.is_contiguous() else None
        for group in self.groups:
            pair = group.adapter.weights.get(module)
            if pair is None:
                continue
            a, bt = pair
            rows = group.rows
            if kernel is not None:
                kernel.lora_add(x, a, bt, y, group.index)
            elif isinstance(rows, slice):  # (y's rows as a view: added to in place, one call)
                y[rows].addmm_(x[rows] @ a.T, bt)
            else:
                y.index_add_(0, rows, (x[rows] @ a.T) @ bt)


class LoRASlot:
    """Where a model's adapted linear layers find the current step's adapters (None: the base model
    alone); the model sets it for the length of one forward pass."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None


def group_rows(spans: list[tuple[LoRAAdapter | None, int, int]], num_rows: int, device: torch.device,
               ops: RowOpsKernel | None = None) -> LoRABatch | None:  # fmt: skip
    """The step's LoRABatch from each scheduled request's adapter and rows [lo, hi) (`ops`: the
    model's row ops, on a CPU); None when no row has an adapter."""
    by_adapter: dict[str, tuple[LoRAAdapter, list[int]]] = {}
    for adapter, lo, hi in spans:
        if adapter is not None and hi > lo:  # (by its files: two names of one folder are one adapter)
            by_adapter.setdefault(adapter.fingerprint, (adapter, []))[1].extend(range(lo, hi))
    if not by_adapter:
        return None
    groups = []
    for adapter, rows in by_adapter.values():
        index = torch.tensor(rows, dtype=torch.long)
        consecutive = rows[-1] - rows[0] + 1 == len(rows)
        groups.append(LoRAGroup(adapter, slice(rows[0], rows[-1] + 1) if consecutive else index.to(device), index))
    return LoRABatch(groups, num_rows, ops)
