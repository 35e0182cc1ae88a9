"""What every GGUF (ggml) format shares: rows along ne0, fixed-size blocks, little-endian byte fields.

A tensor is quantized row by row along its last dimension (ggml's ne0); each row is a run of blocks of
`block_size` elements stored as `type_size` bytes. The packed tensor is uint8 of shape (rows, row_bytes), byte for
byte what ggml_quantize_chunk writes for the same rows.
"""

from __future__ import annotations

import torch

from .. import native
from ..errors import UnsupportedInputError
from .base import Encoding, Format, QuantizedTensor

__all__ = [
    "QK_K",
    "GgufFormat",
    "fp16_field",
    "join_fields",
    "pack_bit_fields",
    "pack_nibbles",
    "read_fp16_field",
    "split_fields",
    "unpack_bit_fields",
]

QK_K = 256  # super-block length of the k-quants


class GgufFormat(Format):
    """Base of the ggml formats: shape rules, row blocking and the byte container."""

    #: ggml's enum ggml_type value, as written in GGUF tensor infos
    ggml_type: int
    block_size: int
    type_size: int
    #: the type has a fused native pass (_native_blocks): the legacy types, Q3_K and Q6_K
    fused_natively: bool = False

    def fuses_on_cpu(self, x: torch.Tensor) -> bool:
        return self.fused_natively and native.enabled(x)

    def _native_quantize(
        self, x: torch.Tensor, key: int | None, row_offset: int, col_offset: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, int]:
        nearest, hardened, changed = self._native_blocks(x.reshape(-1, x.shape[-1]), key, row_offset, col_offset)
        return {"blocks": nearest}, (None if hardened is None else {"blocks": hardened}), changed

    def _native_blocks(
        self, rows: torch.Tensor, key: int | None, row_offset: int, col_offset: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The fused native pass over rows (rows, ne0): (round-to-nearest blocks, hardened blocks or None, codes
        changed), each blocks tensor uint8 (rows, bytes per row); types with fused_natively implement it."""
        raise NotImplementedError(f"{self.name} has no fused native pass")

    def check_shape(self, x: torch.Tensor, name: str) -> None:
        if x.dim() == 0:
            raise UnsupportedInputError(f"tensor {name!r} is a scalar; GGUF quantizes rows of a 1-D or N-D tensor")
        ne0 = x.shape[-1]
        if ne0 % self.block_size:
            raise UnsupportedInputError(
                f"tensor {name!r}: row length ne0={ne0} is not a multiple of {self.block_size}, the block size of "
                f"{self.name}; llama-quantize falls back to another type for such tensors (see the GGUF tool)"
            )

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as (rows, blocks, block_size) float32."""
        return x.reshape(-1, x.shape[-1] // self.block_size, self.block_size)

    def container(self, enc: Encoding, fields: list[torch.Tensor]) -> QuantizedTensor:
        blocks = join_fields(fields)
        if blocks.shape[-1] != self.type_size:
            raise AssertionError(f"{self.name}: block packs to {blocks.shape[-1]} bytes, expected {self.type_size}")
        return QuantizedTensor(self.name, enc.shape, {"blocks": blocks.reshape(blocks.shape[0], -1)})

    def blocks_of(self, q: QuantizedTensor) -> torch.Tensor:
        """The packed bytes as (rows, blocks, type_size)."""
        if q.format != self.name:
            raise UnsupportedInputError(f"a {q.format} tensor cannot be read as {self.name}")
        raw = q.tensors["blocks"]
        return raw.reshape(raw.shape[0], -1, self.type_size)


def fp16_field(values: torch.Tensor) -> torch.Tensor:
    """float32 (..., n) -> little-endian IEEE half bytes (..., 2n), rounded to nearest even like GGML_FP32_TO_FP16."""
    return values.float().to(torch.float16).contiguous().view(torch.uint8)


def read_fp16_field(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian half bytes (..., 2n) -> float32 (..., n)."""
    return raw.contiguous().view(torch.float16).float()


def join_fields(fields: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-block byte fields, each (rows, blocks, k) uint8, into (rows, blocks, sum k)."""
    return torch.cat([f.to(torch.uint8) for f in fields], dim=-1)


def split_fields(blocks: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Inverse of join_fields: (rows, blocks, type_size) -> fields of the given byte sizes."""
    return list(torch.split(blocks, sizes, dim=-1))


def pack_nibbles(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Two 4-bit code tensors -> one byte each: low | high << 4."""
    return (low.to(torch.uint8) & 0x0F) | ((high.to(torch.uint8) & 0x0F) << 4)


def pack_bit_fields(values: torch.Tensor, width: int, run: int) -> torch.Tensor:
    """The low `width` bits (1, 2 or 4) of values (..., n) -> bytes (..., n * width // 8), as the k-quants lay them out.

    The last axis is read in groups of k = 8 // width runs of `run` elements; byte j of a group holds element j of run
    i in bits width*i .. width*(i+1) - 1. Q5_K's qh is (width 1, run 32), Q2_K's qs (2, 32), Q4_K's qs (4, 32), Q6_K's
    ql (4, 64). n must be a multiple of k * run.
    """
    k, mask = 8 // width, (1 << width) - 1
    # in uint8 throughout (an integer's conversion keeps its low 8 bits), OR-ing the k runs: 3-5x faster than a
    # shifted int32 sum over the run axis
    fields = values.to(torch.uint8).reshape(*values.shape[:-1], -1, k, run)
    out = fields[..., 0, :] & mask
    for i in range(1, k):
        out |= (fields[..., i, :] & mask) << (width * i)
    return out.reshape(*values.shape[:-1], -1)


def unpack_bit_fields(raw: torch.Tensor, width: int, run: int) -> torch.Tensor:
    """Inverse of pack_bit_fields: bytes (..., m) -> int32 values (..., m * 8 // width) in [0, 2**width - 1]."""
    k = 8 // width
    b = raw.to(torch.int32).reshape(*raw.shape[:-1], -1, 1, run)
    shifts = (width * torch.arange(k, dtype=torch.int32)).view(k, 1)
    return ((b >> shifts) & ((1 << width) - 1)).reshape(*raw.shape[:-1], -1)
