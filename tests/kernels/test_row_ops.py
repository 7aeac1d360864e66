"""The row ops (residual add + RMSNorm; rotation + KV write) equal the torch operators they replace."""

import pytest
import torch
from torch.nn import functional as F

from cachedattention.kernels.row_ops import RowOpsKernel
from cachedattention.model.rope import apply_rotary
from tests.util import rel_err


@pytest.fixture(scope="module")
def ops() -> RowOpsKernel:
    loaded = RowOpsKernel.load()
    assert loaded is not None, "this machine has a C compiler: the kernel must build"
    return loaded


@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_torch(ops, with_delta):
    gen = torch.Generator().manual_seed(1)
    residual = 3 * torch.randn(5, 96, generator=gen)
    delta = torch.randn(5, 96, generator=gen) if with_delta else None
    weight = torch.randn(96, generator=gen)
    expected_stream = residual + delta if with_delta else residual.clone()
    expected = F.rms_norm(expected_stream, (96,), weight, 1e-5)
    out = ops.add_rms_norm(residual, delta, weight, 1e-5)
    assert rel_err(out, expected) <= 1e-5
    assert rel_err(residual, expected_stream) <= 1e-6  # the stream is added to in place


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 32), (6, 1, 10)])
def test_rope_store_rotates_and_writes_the_pool(ops, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(heads + head_dim)
    rows, num_slots = 4, 40
    q = torch.randn(rows, heads, head_dim, generator=gen)
    k = torch.randn(rows, kv_heads, head_dim, generator=gen)
    v = torch.randn(rows, kv_heads, head_dim, generator=gen)
    angles = torch.randn(rows, 1, head_dim // 2, generator=gen).repeat(1, 1, 2)  # both halves alike
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([7, 0, 39, 21])
    k_pool, v_pool = torch.full((num_slots, kv_heads, head_dim), 5.0), torch.full((num_slots, kv_heads, head_dim), 6.0)
    q_ref, k_ref = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k_before = k.clone()
    k_rot = ops.rope_store(q, k, v, cos, sin, slots, k_pool, v_pool)
    assert rel_err(q, q_ref) <= 1e-5 and rel_err(k_rot, k_ref) <= 1e-5  # q in place, k into a new tensor
    assert torch.equal(k, k_before)  # the pre-RoPE keys the store saves are untouched
    assert torch.equal(k_pool[slots], k_rot) and torch.equal(v_pool[slots], v)
    others = [s for s in range(num_slots) if s not in slots.tolist()]
    assert torch.all(k_pool[others] == 5.0) and torch.all(v_pool[others] == 6.0)


def _crafted(dtype: torch.dtype) -> torch.Tensor:
    """Values whose casts are easy to get wrong: ties between two neighbours (normal and subnormal),
    subnormals, the largest value and past it, negative zero, float32 subnormals."""
    info = torch.finfo(dtype)
    step, largest = info.eps, info.max  # a mantissa unit at 1
    tiny = info.smallest_normal * step  # the smallest subnormal
    values = [1 + step / 2, 1 + 3 * step / 2, -(1 + step / 2), tiny / 2, 3 * tiny / 2, 5 * tiny / 2, tiny, -tiny / 3,
              largest, -largest, largest * 1.02, -largest * 3, 1e30, -0.0, 0.0, 1e-40, -1e-42, 2.0 ** -20]
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_rope_store_writes_narrow_pages_as_torch_casts_them(ops, storage):
    """vLLM's --kv-cache-dtype: the rotated keys and the values written as bfloat16 or FP8 (saturated
    at the format's largest, FP8 kept as bytes) bit for bit as the pool's torch writes cast them: a
    decoded token's page holds what a prefill of it would."""
    from cachedattention.kvcache.kv_pool import KVPool

    gen = torch.Generator().manual_seed(5)
    rows, heads, kv_heads, d, num_slots = 6, 4, 2, 32, 20
    q = torch.randn(rows, heads, d, generator=gen)
    k = torch.randn(rows, kv_heads, d, generator=gen) * torch.logspace(-8, 3, rows)[:, None, None]  # 1e-8 to 1e3
    v = torch.randn(rows, kv_heads, d, generator=gen) * 0.01
    crafted = _crafted(storage)
    v.view(-1)[: crafted.numel()] = crafted
    angles = torch.randn(rows, 1, d // 2, generator=gen).repeat(1, 1, 2)
    cos, sin = angles.cos(), angles.sin()
    held = torch.uint8 if storage.itemsize == 1 else storage
    k_pool, v_pool = torch.zeros(num_slots, kv_heads, d, dtype=held), torch.zeros(num_slots, kv_heads, d, dtype=held)
    slots = torch.tensor([3, 0, 19, 7, 8, 12])
    k_rot = ops.rope_store(q, k, v, cos, sin, slots, k_pool, v_pool, storage)
    torch_pool = KVPool.__new__(KVPool)  # its encode alone: clamp to the format's largest, then torch's cast
    torch_pool.dtype, torch_pool.storage, torch_pool.exact, torch_pool._fp8 = torch.float32, storage, False, held == torch.uint8
    assert torch.equal(k_pool[slots], torch_pool.encode(k_rot)) and torch.equal(v_pool[slots], torch_pool.encode(v))
    assert rel_err(k_rot, apply_rotary(k, cos, sin)) <= 1e-5  # the rotated keys themselves stay float32
    with pytest.raises(ValueError, match="pages of"):
        ops.rope_store(q, k, v, cos, sin, slots, k_pool.float(), v_pool.float(), storage)


def test_refuses_bad_inputs_with_a_clear_error(ops):
    q, k, v = torch.zeros(2, 4, 8), torch.zeros(2, 2, 8), torch.zeros(2, 2, 8)
    cos = sin = torch.zeros(2, 1, 8)
    pool = torch.zeros(16, 2, 8)
    with pytest.raises(ValueError, match="outside the pool"):
        ops.rope_store(q, k, v, cos, sin, torch.tensor([3, 16]), pool, pool.clone())
    with pytest.raises(ValueError, match="slots"):
        ops.rope_store(q, k, v, cos, sin, torch.tensor([3, 4], dtype=torch.int32), pool, pool.clone())
    with pytest.raises(ValueError, match="do not agree"):
        ops.rope_store(q, k, torch.zeros(2, 2, 6), cos, sin, torch.tensor([3, 4]), pool, pool.clone())
    with pytest.raises(ValueError, match="float32"):
        ops.add_rms_norm(torch.zeros(2, 8, dtype=torch.float64), None, torch.ones(8, dtype=torch.float64), 1e-6)
    with pytest.raises(ValueError, match="disagree"):
        ops.add_rms_norm(torch.zeros(2, 8), torch.zeros(3, 8), torch.ones(8), 1e-6)


def test_silu_mul_matches_torch_even_far_out(ops):
    gate = torch.cat([torch.randn(3, 50, generator=torch.Generator().manual_seed(2)) * 4,
                      torch.tensor([[-200.0, -90.0, 0.0, 90.0, 200.0] * 10])])
    up = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    expected = F.silu(gate) * up
    out = ops.silu_mul(gate, up)
    assert out is gate and torch.isfinite(out).all()  # in place; exp never overflows
    assert rel_err(out, expected) <= 1e-6
    with pytest.raises(ValueError, match="differ"):
        ops.silu_mul(torch.zeros(2, 4), torch.zeros(2, 5))


@pytest.mark.parametrize("rank", [1, 16, 512])
def test_lora_add_adds_each_listed_row_s_share_only(ops, rank):
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 96, generator=gen), torch.randn(6, 40, generator=gen)
    a, bt = torch.randn(rank, 96, generator=gen) / 10, torch.randn(rank, 40, generator=gen) / 10
    rows = torch.tensor([4, 1, 2])
    expected = y.clone()
    expected[rows] += (x[rows] @ a.T) @ bt
    ops.lora_add(x, a, bt, y, rows)
    assert rel_err(y, expected) <= 1e-5
    assert torch.equal(y[[0, 3, 5]], expected[[0, 3, 5]])  # rows not listed: untouched


def test_lora_add_refuses_what_it_cannot_take(ops):
    x, y, a, bt = torch.zeros(2, 8), torch.zeros(2, 4), torch.zeros(3, 8), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="out of range"):
        ops.lora_add(x, a, bt, y, torch.tensor([2]))
    with pytest.raises(ValueError, match="disagree"):
        ops.lora_add(x, a, torch.zeros(2, 4), y, torch.tensor([0]))
    with pytest.raises(ValueError, match="past the kernel's 512"):
        ops.lora_add(x, torch.zeros(513, 8), torch.zeros(513, 4), y, torch.tensor([0]))
    with pytest.raises(ValueError, match="int64"):
        ops.lora_add(x, a, bt, y, torch.tensor([0], dtype=torch.int32))
