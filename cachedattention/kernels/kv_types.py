"""What the KV pool's values may be (vLLM's --kv-cache-dtype), as the C kernels number them
(kv_types.h), and the tensor dtype that holds each: FP8 pages are kept as their bytes."""

from __future__ import annotations

import torch

KV_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}


def kv_type(storage: torch.dtype, pools: tuple[torch.Tensor, ...], what: str) -> int:
    """The C code's number for pages of `storage` values, after checking that `pools` hold them as
    the pool keeps them (contiguous CPU tensors of float32, bfloat16, or uint8 for FP8): the C code
    trusts it, and a mismatch would read or write the wrong bytes."""
    if storage not in KV_TYPES:
        raise ValueError(f"{what} takes pages of {', '.join(map(str, KV_TYPES))}, not {storage}")
    held = torch.uint8 if storage.itemsize == 1 else storage
    for t in pools:
        if t.dtype != held or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{what} takes pages of {storage} as contiguous CPU tensors of {held}; got {t.dtype} "
                             f"on {t.device}")  # fmt: skip
    return KV_TYPES[storage]
