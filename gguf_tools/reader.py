"""A validating GGUF (v2, v3) reader over a memory map.

Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 KV count; the KV pairs (string key, u32 type,
value; strings are u64 length + bytes, arrays u32 element type + u64 count + elements); the tensor infos (string
name, u32 n_dims, n_dims x u64 ne, u32 ggml type, u64 offset relative to the data section); padding to the alignment
(`general.alignment`, default 32); the data section.

Every count, length, shape, type and offset is checked against the file before it is used, and a violation raises
GgufFormatError naming the field and where it sits. Metadata values are kept as raw byte spans and decoded on demand:
a 262k-token vocabulary is walked (one length read per string, no decoding) in well under a second, and copied to
the output byte for byte. Tensor data is read lazily from the map, one tensor or a range of rows at a time.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcbguard_kernels.errors import QcbguardError

from .constants import (
    DEFAULT_ALIGNMENT,
    GGML_TYPES,
    GGUF_MAGIC,
    MAX_DIMS,
    MAX_NAME_BYTES,
    SUPPORTED_VERSIONS,
    GgmlType,
    ValueType,
)

__all__ = ["GgufFile", "GgufFormatError", "KeyValue", "TensorInfo", "ggml_n_dims"]

_INT64_MAX = 2**63 - 1


class GgufFormatError(QcbguardError):
    """The file is not a valid GGUF file (the message names the field and its byte offset)."""


@dataclass(frozen=True)
class KeyValue:
    """One metadata pair: its raw bytes in the file (key, type and value, as written) and where the value starts."""

    key: str
    type: int
    #: element type for arrays, else None
    item_type: int | None
    count: int
    start: int
    value_start: int
    end: int


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's header entry. `ne` is ggml's order: ne[0] is the row length (the fastest axis)."""

    name: str
    ne: tuple[int, ...]
    type: GgmlType
    offset: int
    #: absolute byte offset of the tensor's data in the file
    data_start: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.ne[0]

    @property
    def row_bytes(self) -> int:
        return self.type.row_bytes(self.ne[0])

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.row_bytes

    @property
    def shape(self) -> tuple[int, ...]:
        """torch/numpy order (the reverse of ne, trailing 1s of ne dropped as ggml_n_dims does)."""
        return tuple(reversed(self.ne[: ggml_n_dims(self.ne)]))


def ggml_n_dims(ne: tuple[int, ...]) -> int:
    """ggml_n_dims: 1 + the highest axis whose extent is not 1 (a [4096, 1] tensor has one dimension)."""
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


class _Cursor:
    """Bounds-checked little-endian reads from the map."""

    def __init__(self, buf: mmap.mmap | bytes, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GgufFormatError(
                f"truncated file: {what} at byte {self.pos} needs {n} bytes, only {self.size - self.pos} remain"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        at = self.pos
        n = self.scalar("Q", f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GgufFormatError(f"{what} at byte {at} is not valid UTF-8") from None

    def skip_strings(self, count: int, what: str) -> None:
        """Walk `count` length-prefixed strings without decoding them (vocabularies: one u64 read per entry)."""
        buf, pos, size = self.buf, self.pos, self.size
        unpack = struct.Struct("<Q").unpack_from
        for i in range(count):
            if pos + 8 > size:
                raise GgufFormatError(f"truncated file: length of {what}[{i}] at byte {pos}")
            pos += 8 + unpack(buf, pos)[0]
            if pos > size:
                raise GgufFormatError(f"truncated file: {what}[{i}] runs past the end of the file ({size} bytes)")
        self.pos = pos


class GgufFile:
    """An open, validated GGUF file. Use as a context manager (closes the map)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")  # kept open for the map's lifetime
        except OSError as e:
            raise GgufFormatError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            self.file_size = os.fstat(self._fh.fileno()).st_size
            if self.file_size < 24:
                raise GgufFormatError(f"{self.path} is {self.file_size} bytes, too short for a GGUF header")
            self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- parsing ---------------------------------------------------------------------------------------------------

    def _parse(self) -> None:
        c = _Cursor(self._map, self.file_size)
        magic = bytes(self._map[:4])
        if magic != GGUF_MAGIC:
            raise GgufFormatError(f"{self.path} is not a GGUF file: magic {magic!r}, expected {GGUF_MAGIC!r}")
        c.pos = 4
        self.version = c.scalar("I", "version")
        if self.version not in SUPPORTED_VERSIONS:
            raise GgufFormatError(
                f"GGUF version {self.version} is not supported (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        n_tensors = c.scalar("Q", "tensor count")
        n_kv = c.scalar("Q", "metadata count")
        # every KV pair takes at least 8 + 4 bytes, every tensor info at least 8 + 4 + 8 + 4 + 8
        if n_kv > (self.file_size - c.pos) // 12:
            raise GgufFormatError(f"metadata count {n_kv} is impossible for a file of {self.file_size} bytes")
        if n_tensors > (self.file_size - c.pos) // 32:
            raise GgufFormatError(f"tensor count {n_tensors} is impossible for a file of {self.file_size} bytes")

        self.kv: dict[str, KeyValue] = {}
        for i in range(n_kv):
            kv = self._read_kv(c, i)
            if kv.key in self.kv:
                raise GgufFormatError(f"duplicate metadata key {kv.key!r} (pair {i})")
            self.kv[kv.key] = kv

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.kv:
            kv = self.kv["general.alignment"]
            if kv.type != ValueType.UINT32:
                raise GgufFormatError("general.alignment must be a uint32")
            self.alignment = self.value("general.alignment")
            if self.alignment == 0 or self.alignment & (self.alignment - 1):
                raise GgufFormatError(f"general.alignment {self.alignment} is not a power of 2")

        infos = [self._read_tensor_info(c, i) for i in range(n_tensors)]
        self.data_offset = _pad(c.pos, self.alignment)
        if n_tensors and self.data_offset > self.file_size:
            raise GgufFormatError(f"truncated file: the data section would start at byte {self.data_offset}")
        self.tensors: list[TensorInfo] = []
        names: set[str] = set()
        for name, ne, gtype, offset in infos:
            if name in names:
                raise GgufFormatError(f"duplicate tensor name {name!r}")
            names.add(name)
            info = TensorInfo(name, ne, gtype, offset, self.data_offset + offset)
            if offset % self.alignment:
                raise GgufFormatError(f"tensor {name!r}: offset {offset} is not a multiple of {self.alignment}")
            if info.data_start + info.nbytes > self.file_size:
                raise GgufFormatError(
                    f"tensor {name!r}: data [{info.data_start}, {info.data_start + info.nbytes}) runs past the end "
                    f"of the file ({self.file_size} bytes): truncated file or impossible offset"
                )
            self.tensors.append(info)
        expected = 0
        for t in self.tensors:
            # as ggml's gguf.cpp requires: tensor data in header order, each padded to the alignment
            if t.offset != expected:
                raise GgufFormatError(
                    f"tensor {t.name!r} has offset {t.offset}, expected {expected} (tensor data must follow one "
                    "another in header order, each padded to the alignment)"
                )
            expected += _pad(t.nbytes, self.alignment)
        self.by_name = {t.name: t for t in self.tensors}

    def _read_kv(self, c: _Cursor, i: int) -> KeyValue:
        start = c.pos
        key = c.string(f"key of metadata pair {i}")
        vtype = c.scalar("I", f"type of {key!r}")
        value_start = c.pos
        item_type, count = None, 1
        if vtype == ValueType.ARRAY:
            item_type = c.scalar("I", f"element type of {key!r}")
            count = c.scalar("Q", f"length of {key!r}")
            if item_type == ValueType.ARRAY:
                raise GgufFormatError(f"metadata {key!r}: nested arrays are not supported")
            self._skip_values(c, item_type, count, key)
        else:
            self._skip_values(c, vtype, 1, key)
        return KeyValue(key, vtype, item_type, count, start, value_start, c.pos)

    @staticmethod
    def _skip_values(c: _Cursor, vtype: int, count: int, key: str) -> None:
        if vtype == ValueType.STRING:
            if count > (c.size - c.pos) // 8:
                raise GgufFormatError(f"metadata {key!r}: {count} strings cannot fit in the rest of the file")
            c.skip_strings(count, f"metadata {key!r}")
            return
        fmt = ValueType.SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise GgufFormatError(f"metadata {key!r}: unknown value type {vtype}")
        c.need(count * struct.calcsize("<" + fmt), f"value of {key!r}")
        c.pos += count * struct.calcsize("<" + fmt)

    def _read_tensor_info(self, c: _Cursor, i: int) -> tuple[str, tuple[int, ...], GgmlType, int]:
        name = c.string(f"name of tensor {i}")
        if len(name.encode()) > MAX_NAME_BYTES:
            raise GgufFormatError(f"tensor name {name[:80]!r} is longer than {MAX_NAME_BYTES} bytes")
        n_dims = c.scalar("I", f"n_dims of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GgufFormatError(f"tensor {name!r}: n_dims {n_dims} is outside 1..{MAX_DIMS}")
        ne = tuple(c.scalar("Q", f"ne[{d}] of {name!r}") for d in range(n_dims))
        if any(d <= 0 for d in ne):
            raise GgufFormatError(f"tensor {name!r}: impossible shape {list(ne)} (every extent must be positive)")
        total = 1
        for d in ne:
            total *= d
        if total > _INT64_MAX:
            raise GgufFormatError(f"tensor {name!r}: shape {list(ne)} has more than 2**63 elements")
        type_id = c.scalar("I", f"type of {name!r}")
        gtype = GGML_TYPES.get(type_id)
        if gtype is None:
            raise GgufFormatError(f"tensor {name!r}: unknown ggml type {type_id}")
        if ne[0] % gtype.block_size:
            raise GgufFormatError(
                f"tensor {name!r}: row length {ne[0]} is not a multiple of the {gtype.name} block size "
                f"{gtype.block_size}"
            )
        offset = c.scalar("Q", f"offset of {name!r}")
        if offset > self.file_size:
            raise GgufFormatError(f"tensor {name!r}: offset {offset} lies beyond the end of the file")
        return name, ne, gtype, offset

    # -- access ----------------------------------------------------------------------------------------------------

    def raw_kv(self, key: str) -> bytes:
        """The pair's bytes exactly as written (key, type tag, value)."""
        kv = self.kv[key]
        return bytes(self._map[kv.start : kv.end])

    def value(self, key: str, default: Any = None) -> Any:
        """The decoded value of `key` (str, int, float, bool, or a list for arrays); default when absent."""
        kv = self.kv.get(key)
        if kv is None:
            return default
        c = _Cursor(self._map, kv.end)
        c.pos = kv.value_start
        if kv.type == ValueType.ARRAY:
            c.pos += 12
            return [self._decode(c, kv.item_type, key) for _ in range(kv.count)]  # type: ignore[arg-type]
        return self._decode(c, kv.type, key)

    @staticmethod
    def _decode(c: _Cursor, vtype: int, key: str) -> Any:
        if vtype == ValueType.STRING:
            return c.string(f"value of {key!r}")
        return c.scalar(ValueType.SCALAR_FORMATS[vtype], f"value of {key!r}")

    def tensor_bytes(self, info: TensorInfo, row_start: int = 0, row_end: int | None = None) -> np.ndarray:
        """Rows [row_start, row_end) of the tensor as a read-only uint8 view (rows, row_bytes) of the map."""
        row_end = info.n_rows if row_end is None else row_end
        if not 0 <= row_start <= row_end <= info.n_rows:
            raise ValueError(f"rows [{row_start}, {row_end}) outside tensor {info.name!r} of {info.n_rows} rows")
        start = info.data_start + row_start * info.row_bytes
        count = (row_end - row_start) * info.row_bytes
        flat = np.frombuffer(self._map, dtype=np.uint8, count=count, offset=start)
        return flat.reshape(row_end - row_start, info.row_bytes)

    def release(self, info: TensorInfo, row_start: int = 0, row_end: int | None = None) -> None:
        """Drop the map's pages of rows [row_start, row_end) from this process once they are copied out: the file is
        read once, front to back, and its pages would otherwise all stay mapped (resident memory growing to the file's
        size). The map is read-only and file-backed, so MADV_DONTNEED only unmaps: a later read faults the same bytes
        back in from the page cache or the file (pages shared with a neighbouring tensor included)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        row_end = info.n_rows if row_end is None else row_end
        start = info.data_start + row_start * info.row_bytes
        end = info.data_start + row_end * info.row_bytes
        first = start - start % mmap.PAGESIZE
        end = min(-(-end // mmap.PAGESIZE) * mmap.PAGESIZE, self.file_size)
        if end > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, end - first)

    def iter_tensors(self) -> Iterator[TensorInfo]:
        return iter(self.tensors)

    def close(self) -> None:
        m = getattr(self, "_map", None)
        if m is not None:
            try:
                m.close()
            except BufferError:
                # numpy views of the map are still alive; the map closes when they go
                pass
            self._map = None  # type: ignore[assignment]
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()
            self._fh = None  # type: ignore[assignment]

    def __enter__(self) -> GgufFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment
