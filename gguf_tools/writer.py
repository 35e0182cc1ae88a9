"""Write GGUF v3 the way llama-quantize lays it out, streaming tensor data one tensor at a time.

llama-quantize (src/llama-quant.cpp with ggml's gguf.cpp) writes: the header (version 3, tensor and KV counts); the
input's KV pairs in input order with `general.quantization_version` and `general.file_type` removed and appended last
(in that order, as uint32) and the split keys dropped; the tensor infos in output order, each with n_dims =
ggml_n_dims(ne) (trailing 1s dropped) and its offset, every tensor starting at a multiple of the alignment; zero
padding to the alignment after the infos, and after every tensor, the last one included.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .constants import GGUF_MAGIC, GgmlType, ValueType
from .reader import ggml_n_dims

__all__ = ["GgufWriter", "OutputTensor", "encode_kv", "publish"]


@dataclass(frozen=True)
class OutputTensor:
    name: str
    ne: tuple[int, ...]
    type: GgmlType

    @property
    def nbytes(self) -> int:
        rows = 1
        for d in self.ne[1:]:
            rows *= d
        return rows * self.type.row_bytes(self.ne[0])


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def encode_kv(key: str, vtype: int, value: object) -> bytes:
    """One scalar metadata pair (key, type tag, value) as GGUF stores it."""
    if vtype == ValueType.STRING:
        body = _string(str(value))
    elif vtype in ValueType.SCALAR_FORMATS and vtype != ValueType.ARRAY:
        body = struct.pack("<" + ValueType.SCALAR_FORMATS[vtype], value)
    else:
        raise ValueError(f"metadata {key!r}: value type {vtype} is not a scalar type")
    return _string(key) + struct.pack("<I", vtype) + body


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


class GgufWriter:
    """Writes the header up front (all types and sizes are decided before any data), then each tensor's bytes.

    Tensors must be written in the order given, each with exactly the byte count its type and shape imply.
    """

    def __init__(
        self, fh: BinaryIO, kv_pairs: Sequence[bytes], tensors: Sequence[OutputTensor], alignment: int
    ) -> None:
        self.fh = fh
        self.alignment = alignment
        self.tensors = list(tensors)
        self._next = 0
        self._pending = 0
        header = bytearray(GGUF_MAGIC)
        header += struct.pack("<IQQ", 3, len(self.tensors), len(kv_pairs))
        for kv in kv_pairs:
            header += kv
        offset = 0
        for t in self.tensors:
            n_dims = ggml_n_dims(t.ne)
            header += _string(t.name)
            header += struct.pack("<I", n_dims)
            header += struct.pack(f"<{n_dims}Q", *t.ne[:n_dims])
            header += struct.pack("<IQ", t.type.id, offset)
            offset += _pad(t.nbytes, alignment)
        header += b"\0" * (_pad(len(header), alignment) - len(header))
        fh.write(header)
        self.header_bytes = len(header)

    def write_rows(self, data: np.ndarray | bytes | memoryview) -> None:
        """Append bytes of the current tensor (whole rows, in order); the tensor closes when its size is reached."""
        if self._next >= len(self.tensors):
            raise ValueError("all tensors are already written")
        t = self.tensors[self._next]
        raw = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        self._pending += raw.nbytes
        if self._pending > t.nbytes:
            raise ValueError(f"tensor {t.name!r}: {self._pending} bytes written, its type and shape hold {t.nbytes}")
        self.fh.write(raw)
        if self._pending == t.nbytes:
            self.fh.write(b"\0" * (_pad(t.nbytes, self.alignment) - t.nbytes))
            self._next += 1
            self._pending = 0

    def finish(self) -> None:
        if self._next != len(self.tensors):
            missing = self.tensors[self._next].name
            raise ValueError(f"output incomplete: tensor {missing!r} and later ones were not written")


def publish(tmp: Path, dst: Path) -> None:
    """Give the finished temporary file the mode a plain open() would (0666 less the umask) and rename it into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, dst)
