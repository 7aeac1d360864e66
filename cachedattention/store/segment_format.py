"""A stored segment's bytes: a header (magic, version, model fingerprint, shape, checksums), then
each layer's K and V. The disk tier writes them as a file, the remote tier as one value.

Each layer's checksums cover its tokens in chunks of CHUNK_TOKENS (a chunk's K, then its V), so a
load that needs only a layer's last tokens (a sliding window's) reads and checks only the chunks
holding them. Version 1 files have one checksum a layer: one chunk of every token, read the same way.
A segment without its windowed layers (see SegmentKV) names the layers it holds in `layers`; an
older reader finds its size wrong and takes it as missing."""

from __future__ import annotations

import json
import struct
import zlib

import torch

from cachedattention.store.segment import CorruptSegment, KVLayout, SegmentKV

MAGIC = b"CATTNKV\x00"
VERSION = 2
READ_VERSIONS = (1, 2)  # version 1: a checksum per layer (a chunk of all its tokens)
CHUNK_TOKENS = 128  # small enough that a window's read wastes little, large enough for a short header
PREFIX = struct.Struct("<8sI")  # magic, header length
_ALIGN = 64


def _to_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: store the raw 16-bit patterns
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _chunk_sums(kb: memoryview, vb: memoryview, chunk_bytes: int) -> list[int]:
    """Each chunk's checksum: its K bytes, then its V bytes."""
    return [zlib.crc32(vb[a : a + chunk_bytes], zlib.crc32(kb[a : a + chunk_bytes])) for a in range(0, len(kb), chunk_bytes)]


def encode(seg_id: str, kv: SegmentKV, fingerprint: str, layout: KVLayout, with_body: bool = True) -> tuple[bytes, list[bytes]]:
    """The header and the body's pieces (K then V of each layer); without the body, just the header's size."""
    body: list[bytes] = []
    sums: list[list[int]] = []
    if with_body:
        for i in range(kv.k.shape[0]):
            kb, vb = _to_bytes(kv.k[i]), _to_bytes(kv.v[i])
            sums.append(_chunk_sums(memoryview(kb), memoryview(vb), CHUNK_TOKENS * layout.token_bytes()))
            body += [kb, vb]
    meta = {
        "version": VERSION,
        "seg_id": seg_id,
        "fingerprint": fingerprint,
        "num_tokens": kv.num_tokens,
        "num_layers": layout.num_layers,
        "kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "dtype": str(layout.dtype).removeprefix("torch."),
        "chunk_tokens": CHUNK_TOKENS,
        "checksums": sums,
    }
    if kv.layers is not None:
        meta["layers"] = list(kv.layers)
    text = json.dumps(meta).encode()
    # padded as if every checksum took its widest form: the size is known before they are computed
    chunks = -(-kv.num_tokens // CHUNK_TOKENS)
    widest = len(json.dumps({**meta, "checksums": [[0xFFFFFFFF] * chunks] * kv.k.shape[0]}).encode())
    size = PREFIX.size + widest
    size += (-size) % _ALIGN  # the body starts aligned
    return PREFIX.pack(MAGIC, size - PREFIX.size) + text + b" " * (size - PREFIX.size - len(text)), body


def encoded_size(seg_id: str, kv: SegmentKV, fingerprint: str, layout: KVLayout) -> int:
    """The size `encode` gives, without encoding the body."""
    header, _ = encode(seg_id, kv, fingerprint, layout, with_body=False)
    return len(header) + kv.nbytes


def parse_header(head: bytes, read_meta, name: str) -> tuple[dict, int]:
    """(meta, body offset) from the first PREFIX.size bytes and `read_meta(n)`, which returns the next n."""
    try:
        magic, hlen = PREFIX.unpack(head)
        if magic != MAGIC:
            raise CorruptSegment(f"{name}: bad magic")
        meta = json.loads(read_meta(hlen))
    except (struct.error, ValueError, RecursionError) as e:  # (a deeply nested header: no JSON of ours)
        raise CorruptSegment(f"{name}: unreadable header") from e
    if not isinstance(meta, dict):
        raise CorruptSegment(f"{name}: unreadable header")
    return meta, PREFIX.size + hlen


def check_header(meta: dict, body_offset: int, total_size: int, fingerprint: str, layout: KVLayout, name: str) -> int:
    """Refuse a segment of another version, model or dtype, or of the wrong size, layers or
    checksums; its half-layer bytes. A version 1 header's checksums are put in version 2's form (a
    chunk a layer), and a header without `layers` names every layer."""
    problems = []
    layers = meta.setdefault("layers", list(range(layout.num_layers)))
    if not isinstance(layers, list) or not all(type(i) is int for i in layers) or layers != sorted(set(layers)) or (
        layers and not 0 <= layers[0] <= layers[-1] < layout.num_layers
    ):  # fmt: skip
        problems.append("bad layer list")
        layers = meta["layers"] = []
    if type(meta.get("version")) is not int or meta["version"] not in READ_VERSIONS:
        problems.append(f"version {meta.get('version')}")
    if meta.get("fingerprint") != fingerprint:
        problems.append("model fingerprint differs")
    if meta.get("dtype") != str(layout.dtype).removeprefix("torch."):
        problems.append("dtype differs")
    n = meta.get("num_tokens")
    if not isinstance(n, int) or n < 0:
        problems.append("bad token count")
        n = 0
    half = n * layout.token_bytes()
    if total_size != body_offset + 2 * len(layers) * half:
        problems.append("wrong size (truncated?)")
    if meta.get("version") == 1 and isinstance(meta.get("checksums"), list):
        meta["chunk_tokens"] = max(n, 1)
        meta["checksums"] = [[s] if n else [] for s in meta["checksums"]]
    chunk, sums = meta.get("chunk_tokens"), meta.get("checksums")
    if type(chunk) is not int or chunk <= 0:
        problems.append("bad chunk size")
    elif not isinstance(sums, list) or len(sums) != len(layers) or not all(
        isinstance(each, list) and len(each) == -(-n // chunk) for each in sums
    ):  # fmt: skip
        problems.append("bad checksum list")
    if problems:
        raise CorruptSegment(f"{name}: " + ", ".join(problems))
    return half


def layer_slot(meta: dict, layer: int) -> int:
    """Where a layer's K and V lie among a checked header's layers; CorruptSegment if not held."""
    try:
        return meta["layers"].index(layer)
    except ValueError:
        raise CorruptSegment(f"segment {meta.get('seg_id')}: layer {layer} is not held") from None


def chunk_span(meta: dict, start: int, end: int) -> tuple[int, int]:
    """The first and past-the-last chunk holding tokens [start, end) of a segment (start < end)."""
    chunk = meta["chunk_tokens"]
    return start // chunk, -(-end // chunk)


def chunk_views(k_raw: torch.Tensor, v_raw: torch.Tensor, meta: dict, layout: KVLayout, layer: int,
                chunks: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A layer's K and V of chunks [c0, c1), viewed in `k_raw` and `v_raw` (their bytes), after
    checking each chunk's checksum."""
    c0, c1 = chunks
    chunk, tb = meta["chunk_tokens"], layout.token_bytes()
    tokens = min(meta["num_tokens"], c1 * chunk) - c0 * chunk
    if k_raw.numel() != tokens * tb or v_raw.numel() != tokens * tb:
        raise CorruptSegment(f"segment {meta.get('seg_id')}: layer {layer} is short")
    got = _chunk_sums(memoryview(k_raw.numpy()), memoryview(v_raw.numpy()), chunk * tb)
    if got != meta["checksums"][layer_slot(meta, layer)][c0:c1]:
        raise CorruptSegment(f"segment {meta.get('seg_id')}: layer {layer} checksum mismatch")
    shape = (tokens, layout.num_kv_heads, layout.head_dim)
    return k_raw.view(layout.dtype).view(shape), v_raw.view(layout.dtype).view(shape)


def encode_bytes(seg_id: str, kv: SegmentKV, fingerprint: str, layout: KVLayout) -> bytes:
    """The whole segment as one bytes value (the remote tier's)."""
    header, body = encode(seg_id, kv, fingerprint, layout)
    return b"".join([header, *body])


def decode_bytes(blob: bytes, seg_id: str, fingerprint: str, layout: KVLayout, name: str) -> SegmentKV:
    """Segment `seg_id` from `encode_bytes`'s value, every check of a disk read made, and that it is
    that segment (CorruptSegment if one fails)."""
    view = memoryview(blob)
    meta, body = parse_header(bytes(view[: PREFIX.size]), lambda n: bytes(view[PREFIX.size : PREFIX.size + n]), name)
    half = check_header(meta, body, len(blob), fingerprint, layout, name)
    if meta.get("seg_id") != seg_id:
        raise CorruptSegment(f"{name}: holds segment {meta.get('seg_id')!r}")
    raw = torch.frombuffer(bytearray(view[body:]), dtype=torch.uint8) if len(view) > body else torch.empty(0, dtype=torch.uint8)
    whole = chunk_span(meta, 0, meta["num_tokens"])
    layers = meta["layers"]
    for i, layer in enumerate(layers):  # every layer checked before any is used
        at = 2 * half * i
        chunk_views(raw[at : at + half], raw[at + half : at + 2 * half], meta, layout, layer, whole)
    # K and V of every layer as strided views of the one buffer: no second copy of the segment
    shape = (len(layers), meta["num_tokens"], layout.num_kv_heads, layout.head_dim)
    both = raw.view(len(layers), 2, half).view(layout.dtype) if half else torch.empty(len(layers), 2, 0, dtype=layout.dtype)
    held = None if len(layers) == layout.num_layers else tuple(layers)
    return SegmentKV(both[:, 0].view(shape), both[:, 1].view(shape), held)
