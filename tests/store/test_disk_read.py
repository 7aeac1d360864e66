"""Segment files read back bit for bit, layer by layer, in every storage dtype."""

import pytest
import torch

from cachedattention.store.disk import DiskTier
from cachedattention.store.segment import CorruptSegment, KVLayout, SegmentKV


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layers_read_back_exactly(tmp_path, dtype):
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=dtype)
    disk = DiskTier(str(tmp_path), 1 << 20, "fp", layout)
    torch.manual_seed(0)
    kv = SegmentKV(torch.randn(3, 5, 2, 8).to(dtype), torch.randn(3, 5, 2, 8).to(dtype))
    disk.put("seg", kv)
    with disk.open("seg") as reader:
        for layer in range(3):
            k, v = reader.read_layer(layer)
            assert k.dtype == dtype and torch.equal(k, kv.k[layer]) and torch.equal(v, kv.v[layer])
            k.add_(1)  # writable, and its own memory: the next read is unaffected
    whole = disk.get("seg")
    assert torch.equal(whole.k, kv.k) and torch.equal(whole.v, kv.v)
    disk.close()


def test_a_truncated_layer_is_corrupt_not_short(tmp_path):
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    disk = DiskTier(str(tmp_path), 1 << 20, "fp", layout)
    disk.put("seg", SegmentKV(torch.ones(2, 3, 1, 4), torch.ones(2, 3, 1, 4)))
    reader = disk.open("seg")
    path = disk.path("seg")
    path.write_bytes(path.read_bytes()[:-8])  # cut after the header check passed
    with pytest.raises(CorruptSegment, match="layer 1"):
        reader.read_layer(0)
        reader.read_layer(1)
    reader.close()
    disk.close()


def test_a_layer_can_be_read_into_a_reused_buffer(tmp_path):
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    disk = DiskTier(str(tmp_path), 1 << 20, "fp", layout)
    kv = SegmentKV(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))
    disk.put("seg", kv)
    buf = torch.empty(1000, dtype=torch.uint8)
    with disk.open("seg") as reader:
        assert reader.layer_nbytes == 2 * 3 * 4 * 4
        for layer in range(2):
            k, v = reader.read_layer(layer, into=buf)
            assert k.data_ptr() == buf.data_ptr()  # in the caller's buffer, no new memory
            assert torch.equal(k, kv.k[layer]) and torch.equal(v, kv.v[layer])
    disk.close()
