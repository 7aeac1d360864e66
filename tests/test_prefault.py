"""The first huge page of each of the CPU pool's K/V tensors is backed at start-up, without touching data."""

import ctypes
import mmap
import resource

import pytest
import torch

from cachedattention import LLM, CacheConfig, SamplingParams
from cachedattention.kvcache import kv_pool, prefault

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="lazily backed pools are Linux-only")

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _kernel_populates():
    """Linux before 5.14 (or a sandbox) refuses MADV_POPULATE_WRITE: pools there stay lazy, by design."""
    t, lazy = kv_pool._zeros((1024,), torch.device("cpu"), torch.float32)
    if not (lazy and prefault.populate([t], 4096)):
        pytest.skip("this kernel does not populate memory on request (MADV_POPULATE_WRITE)")


def _write_faults(t: torch.Tensor, nbytes: int) -> int:
    """Page faults taken by writing the first `nbytes` of `t`: one per huge page while lazy (or only
    populated for reading, e.g. by MADV_POPULATE_READ), none once populated for writing."""
    torch.zeros(1 << 16).fill_(1.0)  # the fill's own first-use faults, out of the count
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t[: nbytes // t.element_size()].fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _backed(t: torch.Tensor, lo: int, hi: int) -> list[bool]:
    """Per OS page of bytes lo..hi-1 of `t`: is it backed (mincore)? Reading would back it, so ask."""
    vec = (ctypes.c_ubyte * ((hi - lo) // mmap.PAGESIZE))()
    if ctypes.CDLL(None, use_errno=True).mincore(ctypes.c_void_p(t.data_ptr() + lo), ctypes.c_size_t(hi - lo), vec):
        raise OSError(ctypes.get_errno(), "mincore")
    return [bool(b & 1) for b in vec]


def _lazy_tensors(n: int, nbytes: int) -> list[torch.Tensor]:
    out = []
    for _ in range(n):
        t, lazy = kv_pool._zeros((nbytes // 4,), torch.device("cpu"), torch.float32)
        assert lazy
        out.append(t)
    return out


def test_populate_backs_the_first_bytes_of_each_tensor_and_keeps_the_data():
    tensors = _lazy_tensors(3, 8 * MIB)
    assert not any(_backed(tensors[0], 0, 8 * MIB))
    tensors[2][100] = 7.0  # a K/V write made before

    assert prefault.populate(tensors, 2 * MIB)

    for t in tensors:
        assert all(_backed(t, 0, 2 * MIB)) and not any(_backed(t, 2 * MIB, 8 * MIB))
    assert float(tensors[2][100]) == 7.0 and float(tensors[2].abs().sum()) == 7.0
    assert float(tensors[0].abs().sum()) == 0.0



def test_populated_memory_takes_no_fault_on_its_first_write():
    lazy, populated = _lazy_tensors(2, 16 * MIB)  # 8 huge pages each
    assert prefault.populate([populated], 16 * MIB)
    assert _write_faults(lazy, 16 * MIB) >= 8  # one per huge page at least
    assert _write_faults(populated, 16 * MIB) < 4  # none of its own (a little noise from elsewhere)


def test_populate_stops_at_a_tensor_end_and_a_refusal_changes_nothing(monkeypatch):
    (small,) = _lazy_tensors(1, MIB)
    assert prefault.populate([small], 2 * MIB)  # more than the tensor: only the tensor
    assert all(_backed(small, 0, MIB))

    (other,) = _lazy_tensors(1, 4 * MIB)

    monkeypatch.setattr(prefault, "_libc_madvise", lambda: lambda *args: -1)  # a kernel before 5.14: EINVAL
    assert not prefault.populate([other], 2 * MIB)
    assert not any(_backed(other, 0, 4 * MIB))
    other[0] = 1.0  # the memory still works: it faults in on first write
    assert float(other[0]) == 1.0


def test_an_engine_starts_with_the_first_pages_of_its_pool_backed(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path), enable_store=False, cache=CacheConfig(page_size=16, num_pages=4096))  # 8 MiB tensors
    pool = llm.engine.pool
    assert len(pool.k) == 3 and pool.k[0].numel() * 4 == 8 * MIB
    for t in pool.k + pool.v:
        assert all(_backed(t, 0, 2 * MIB)) and not any(_backed(t, 2 * MIB, 8 * MIB))
    out = llm.generate([list(range(1, 50))], SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.token_ids) == 4 and all(_backed(pool.v[-1], 0, 2 * MIB))
