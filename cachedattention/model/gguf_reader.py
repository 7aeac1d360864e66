"""A GGUF file's metadata and tensors, read as gguf's `GGUFReader` reads them but in a fraction of
its time: that reader makes a numpy view of every value, and a vocabulary's 150,000 strings (and
as many merges) took it seconds to tens of seconds on every start. Here the metadata is read with
`struct` from one memory map, and arrays of numbers as one numpy view each; the tensors are the
same `ReaderTensor`s over the same memory map (their data is not read until used).

Little-endian files only (every file llama.cpp and its tools write on x86 and ARM); a big-endian
one is read by gguf's own reader (`open_gguf` falls back to it)."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MIN_FIELD_BYTES = 8 + 4 + 1  # a key's length, its value's type, the smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # a name's length, the dimensions' count, the type, the offset
MAX_NESTING = 16  # arrays of arrays this deep at most (llama.cpp writes none; a damaged file could nest past the stack)

# GGUF's value types (gguf.GGUFValueType), the scalars by their struct format
# (numpy's codes for these are struct's: an array of them is one numpy view)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# tensor types whose data gguf's reader gives as numbers (the others as bytes, a row's blocks together)
_ELEMENT_TYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                  "I32": np.int32, "I64": np.int64}  # fmt: skip


class BigEndianFile(ValueError):
    """The file was written big-endian: gguf's own reader takes it."""


@dataclass(frozen=True)
class Field:
    """One metadata key's value, and where its key/value pair lies in the file."""

    value: Any  # a Python scalar, a string, or a list (an array, flattened as gguf's reader does)
    start: int
    end: int

    def contents(self) -> Any:
        """As gguf's `ReaderField.contents()`."""
        return self.value


class FastGGUFReader:
    """The attributes of gguf's `GGUFReader` this engine reads: `fields` (key -> `Field`),
    `tensors` (gguf's `ReaderTensor`s, without their info fields), `alignment`, `data_offset`."""

    def __init__(self, path: str | Path) -> None:
        self.data = np.memmap(str(path), mode="r")
        self._buf = memoryview(self.data)
        self._size = len(self._buf)
        self.fields: dict[str, Field] = {}
        self.alignment = DEFAULT_ALIGNMENT
        offset = self._read_header()
        tensor_count, kv_count = self._unpack("<QQ", offset)
        self._check_count(kv_count, MIN_FIELD_BYTES, offset + 16, "metadata keys")
        self._check_count(tensor_count, MIN_TENSOR_INFO_BYTES, offset + 16, "tensors")
        offset = self._read_fields(offset + 16, kv_count)
        offset, infos = self._read_tensor_infos(offset, tensor_count)
        self._set_alignment()
        self.data_offset = offset + (-offset % self.alignment)
        self.tensors = [self._tensor(*info) for info in infos]

    # -- the byte-level reads ---------------------------------------------------------------------
    def _unpack(self, fmt: str, offset: int) -> tuple:
        if offset + struct.calcsize(fmt) > self._size:
            raise ValueError(f"the file ends at byte {self._size}, inside its metadata (truncated?)")
        return struct.unpack_from(fmt, self._buf, offset)

    def _check_count(self, n: int, min_bytes: int, offset: int, what: str) -> None:
        """A damaged count is refused at once, not found out after reading to the file's end."""
        if n * min_bytes > self._size - offset:
            raise ValueError(f"{n} {what} at byte {offset} cannot fit in the file's {self._size} bytes (damaged?)")

    def _string(self, offset: int) -> tuple[str, int]:
        (n,) = self._unpack("<Q", offset)
        end = offset + 8 + n
        if end > self._size:
            raise ValueError(f"a string of {n} bytes at byte {offset} runs past the file's end (truncated?)")
        return str(self._buf[offset + 8 : end], "utf-8"), end

    def _read_header(self) -> int:
        if self._size < 8 or bytes(self._buf[:4]) != GGUF_MAGIC:
            raise ValueError("GGUF magic invalid")
        (version,) = self._unpack("<I", 4)
        if version & 0xFFFF == 0:  # a file written in the other byte order
            raise BigEndianFile("a big-endian GGUF file")
        if version not in VERSIONS:
            raise ValueError(f"GGUF version {version} is not one this reader handles ({VERSIONS})")
        return 8

    # -- metadata ---------------------------------------------------------------------------------
    def _read_fields(self, offset: int, count: int) -> int:
        for _ in range(count):
            start = offset
            key, offset = self._string(offset)
            (kind,) = self._unpack("<I", offset)
            if key == "general.alignment" and kind != 4:  # a uint32, as gguf's reader and llama.cpp require
                raise ValueError(f"general.alignment must be a uint32, not of GGUF value type {kind}")
            value, offset = self._value(kind, offset + 4)
            if key in self.fields:
                raise ValueError(f"the metadata key {key!r} is given twice")
            self.fields[key] = Field(value, start, offset)
        return offset

    def _value(self, kind: int, offset: int, depth: int = 0) -> tuple[Any, int]:
        if kind == _STRING:
            return self._string(offset)
        if (fmt := _SCALARS.get(kind)) is not None:
            return self._unpack("<" + fmt, offset)[0], offset + struct.calcsize(fmt)
        if kind == _ARRAY:
            if depth >= MAX_NESTING:
                raise ValueError(f"arrays nested more than {MAX_NESTING} deep at byte {offset} (a damaged file?)")
            item_kind, n = self._unpack("<IQ", offset)
            return self._array(item_kind, n, offset + 12, depth + 1)
        raise ValueError(f"unknown GGUF value type {kind} at byte {offset}")

    def _array(self, kind: int, n: int, offset: int, depth: int) -> tuple[list, int]:
        self._check_count(n, struct.calcsize(_SCALARS[kind]) if kind in _SCALARS else 8, offset, "array items")
        if (fmt := _SCALARS.get(kind)) is not None:  # numbers: one view, as Python values
            end = offset + n * struct.calcsize(fmt)
            return np.frombuffer(self._buf, np.dtype("<" + fmt), n, offset).tolist(), end
        read: Callable[[int], tuple[Any, int]] = (self._string if kind == _STRING
                                                  else lambda at: self._value(kind, at, depth))  # fmt: skip
        values: list = []
        for _ in range(n):
            value, offset = read(offset)
            if kind == _ARRAY:  # an array of arrays: flattened, as gguf's reader gives it
                values.extend(value)
            else:
                values.append(value)
        return values, offset

    def _set_alignment(self) -> None:
        field = self.fields.get("general.alignment")
        if field is None:
            return
        value = field.value
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value & (value - 1):
            raise ValueError(f"general.alignment must be a power of two, got {value!r}")
        self.alignment = value

    # -- tensors ----------------------------------------------------------------------------------
    def _read_tensor_infos(self, offset: int, count: int) -> tuple[int, list[tuple[str, list[int], int, int]]]:
        infos, names = [], set()
        for _ in range(count):
            name, offset = self._string(offset)
            (n_dims,) = self._unpack("<I", offset)
            dims = list(self._unpack(f"<{n_dims}Q", offset + 4))
            kind, tensor_offset = self._unpack("<IQ", offset + 4 + 8 * n_dims)
            offset += 4 + 8 * n_dims + 12
            if name in names:
                raise ValueError(f"the tensor {name!r} is given twice")
            names.add(name)
            infos.append((name, dims, kind, tensor_offset))
        return offset, infos

    def _tensor(self, name: str, dims: list[int], kind: int, tensor_offset: int):
        """gguf's ReaderTensor, its data viewed as gguf's reader views it."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.gguf_reader import ReaderTensor
        from gguf.quants import quant_shape_to_byte_shape

        ggml_type = GGMLQuantizationType(kind)
        n_elements = math.prod(dims)
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = n_elements * type_size // block_size
        start = self.data_offset + tensor_offset
        if start + n_bytes > self._size:
            raise ValueError(f"tensor {name}'s data runs past the file's end (truncated?)")
        shape = tuple(reversed(dims))
        element = _ELEMENT_TYPES.get(ggml_type.name)
        if element is None:  # blocks: bytes, a row's blocks in its last dimension
            element, shape = np.uint8, quant_shape_to_byte_shape(shape, ggml_type)
        data = self.data[start : start + n_bytes].view(element).reshape(shape)
        return ReaderTensor(name=name, tensor_type=ggml_type, shape=np.array(dims, dtype=np.uint64),
                            n_elements=n_elements, n_bytes=n_bytes, data_offset=start, data=data,
                            field=None)  # fmt: skip
