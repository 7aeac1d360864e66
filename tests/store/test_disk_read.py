"""Segment files read back bit for bit, layer by layer or a run of tokens (only the chunks holding
it), in every storage dtype; files of the first version too."""

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


def _file_reads(monkeypatch) -> list[int]:
    """The bytes of every read from a segment file."""
    from cachedattention.store import disk as disk_mod

    sizes: list[int] = []
    real = disk_mod._read_into

    def spy(fd, buf, offset):
        sizes.append(buf.nbytes)
        return real(fd, buf, offset)

    monkeypatch.setattr(disk_mod, "_read_into", spy)
    return sizes


def test_a_run_of_tokens_reads_and_checks_only_the_chunks_holding_it(tmp_path, monkeypatch):
    from cachedattention.store import segment_format

    monkeypatch.setattr(segment_format, "CHUNK_TOKENS", 4)  # checksums of 4 tokens: 10 tokens in 3 chunks
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    disk = DiskTier(str(tmp_path), 1 << 20, "fp", layout)
    kv = SegmentKV(torch.randn(2, 10, 1, 4), torch.randn(2, 10, 1, 4))
    disk.put("seg", kv)
    reads = _file_reads(monkeypatch)
    with disk.open("seg") as reader:
        assert reader.meta["chunk_tokens"] == 4 and [len(c) for c in reader.meta["checksums"]] == [3, 3]
        for start, end, chunked in [(0, 10, (0, 10)), (5, 10, (4, 10)), (8, 9, (8, 10)), (3, 5, (0, 8)), (9, 10, (8, 10))]:
            reads.clear()
            k, v = reader.read_tokens(1, start, end)
            assert torch.equal(k, kv.k[1, start:end]) and torch.equal(v, kv.v[1, start:end])
            assert sum(reads) == 2 * (chunked[1] - chunked[0]) * layout.token_bytes()  # K's and V's
        for start, end in [(5, 11), (3, 3), (-1, 2)]:
            with pytest.raises(ValueError, match="not within"):
                reader.read_tokens(0, start, end)
    raw = bytearray(disk.path("seg").read_bytes())
    raw[-2 * 10 * layout.token_bytes() + 1] ^= 0xFF  # layer 1's K, its first chunk
    disk.path("seg").write_bytes(bytes(raw))
    with disk.open("seg") as reader:
        k, _ = reader.read_tokens(1, 8, 10)  # its chunks are whole
        assert torch.equal(k, kv.k[1, 8:10])
        with pytest.raises(CorruptSegment, match="layer 1 checksum"):
            reader.read_tokens(1, 2, 5)
    disk.close()


def test_a_version_1_file_is_still_read(tmp_path):
    """A file written before checksums were kept a chunk each (one a layer) reads the same, and its
    checksums still catch a flipped byte."""
    import json
    import zlib

    from cachedattention.store import segment_format

    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    disk = DiskTier(str(tmp_path), 1 << 20, "fp", layout)
    kv = SegmentKV(torch.randn(2, 300, 1, 4), torch.randn(2, 300, 1, 4))
    disk.put("seg", kv)
    raw = disk.path("seg").read_bytes()
    _, size = segment_format.PREFIX.unpack(raw[: segment_format.PREFIX.size])
    body = segment_format.PREFIX.size + size
    meta = json.loads(raw[segment_format.PREFIX.size : body])
    half = 300 * layout.token_bytes()
    layers = [raw[body + 2 * half * i : body + 2 * half * (i + 1)] for i in range(2)]
    old = {k: v for k, v in meta.items() if k != "chunk_tokens"}
    old.update(version=1, checksums=[zlib.crc32(layer) for layer in layers])
    text = json.dumps(old).encode()
    disk.path("seg").write_bytes(raw[: segment_format.PREFIX.size] + text + b" " * (size - len(text)) + raw[body:])
    with disk.open("seg") as reader:
        k, v = reader.read_tokens(1, 250, 300)
        assert torch.equal(k, kv.k[1, 250:]) and torch.equal(v, kv.v[1, 250:])
    whole = disk.get("seg")
    assert torch.equal(whole.k, kv.k) and torch.equal(whole.v, kv.v)
    flipped = bytearray(disk.path("seg").read_bytes())
    flipped[body + 5] ^= 0xFF
    disk.path("seg").write_bytes(bytes(flipped))
    with disk.open("seg") as reader, pytest.raises(CorruptSegment, match="layer 0 checksum"):
        reader.read_tokens(0, 290, 300)  # (one chunk a layer: any read checks all of it)
    disk.close()


def _with_header(blob: bytes, change) -> bytes:
    """The same value with its header's metadata changed by `change(meta)` (the header's size kept)."""
    import json

    from cachedattention.store import segment_format

    _, size = segment_format.PREFIX.unpack(blob[: segment_format.PREFIX.size])
    body = segment_format.PREFIX.size + size
    meta = json.loads(blob[segment_format.PREFIX.size : body])
    change(meta)
    text = json.dumps(meta).encode()
    assert len(text) <= size
    return blob[: segment_format.PREFIX.size] + text + b" " * (size - len(text)) + blob[body:]


@pytest.mark.parametrize("change", [
    lambda m: m.pop("chunk_tokens"), lambda m: m.update(chunk_tokens=0), lambda m: m.update(chunk_tokens=-4),
    lambda m: m.update(chunk_tokens=True), lambda m: m.update(chunk_tokens="128"), lambda m: m.update(version=2.0),
    lambda m: m.update(checksums=[s[:1] for s in m["checksums"]]), lambda m: m.update(checksums=m["checksums"][0]),
    lambda m: m.update(checksums=[[str(c) for c in s] for s in m["checksums"]]), lambda m: m.update(version=3),
])  # fmt: skip
def test_a_header_of_the_wrong_shape_is_corrupt(change):
    from cachedattention.store import segment_format

    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    kv = SegmentKV(torch.randn(2, 300, 1, 4), torch.randn(2, 300, 1, 4))
    blob = segment_format.encode_bytes("seg", kv, "fp", layout)
    assert segment_format.decode_bytes(blob, "seg", "fp", layout, "seg").num_tokens == 300
    with pytest.raises(CorruptSegment):
        segment_format.decode_bytes(_with_header(blob, change), "seg", "fp", layout, "seg")


def test_read_ahead_of_tokens_past_the_segment_is_harmless(tmp_path):
    """A load's read-ahead hint naming more tokens than the file holds (a record out of step with its
    segment) opens the file; the read itself is what fails."""
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    disk = DiskTier(str(tmp_path), 1 << 20, "fp", layout)
    disk.put("seg", SegmentKV(torch.randn(2, 150, 1, 4), torch.randn(2, 150, 1, 4)))
    with disk.open("seg", {0: (300, 400), 1: (128, 260)}) as reader:
        k, _ = reader.read_tokens(1, 128, 150)
        assert k.shape[0] == 22
    disk.close()
