"""GGUF's legacy 32-element block formats: Q8_0, Q4_0, Q5_0 (scale only) and Q4_1, Q5_1 (scale and minimum).

The rules are ggml's quantize_row_<type>_ref (ggml-quants.c), all in float32 with the scale stored as fp16 (round to
nearest even) but used in fp32 for the codes:

- Q8_0: d = amax / 127, id = d ? 1/d : 0, code = roundf(x * id) (half away from zero), stored as int8.
- Q4_0, Q5_0 (b bits, h = 2**(b-1)): max = the first element of largest magnitude, with its sign; d = max / -h;
  code = min(2**b - 1, (int8_t)(x * id + h + 0.5)), a truncation, so ties (x * id + h at k + 0.5) go up.
- Q4_1, Q5_1: d = (max - min) / (2**b - 1); code = (int8_t)((x - min) * id + 0.5), Q4_1 capped at 15.
The C casts of NaN or out-of-range floats (1/d overflows for subnormal blocks) follow x86: the low byte of 0x80000000.
"""

from __future__ import annotations

import torch

from .. import native
from ..numerics import c_float_to_int8, c_roundf, div_rn
from .base import CodeValueRule, Encoding, QuantizedTensor
from .cells import integer_grid_cells
from .gguf_common import GgufFormat, fp16_field, pack_nibbles, read_fp16_field, split_fields
from .registry import register_format

__all__ = ["GgufLegacy"]

QK = 32


def _first_hit(blocks: torch.Tensor, keys: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The value of the first element whose key equals target: what a C loop with a strict comparison keeps.

    The sign of a zero result is the sign of that first element, as in C (-0.0 == 0.0 compares equal).
    """
    first = torch.argmax((keys == target.unsqueeze(-1)).to(torch.uint8), dim=-1, keepdim=True)
    return torch.gather(blocks, -1, first).squeeze(-1)


def _first_signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """C: `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` from amax = max = 0: +0.0 on all-zero blocks."""
    mags = blocks.abs()
    value = _first_hit(blocks, mags, mags.amax(dim=-1))
    return torch.where(value.abs() > 0, value, torch.zeros_like(value))


class GgufLegacy(GgufFormat):
    """One class for the five legacy types, parameterized by code width and by whether a block minimum is stored."""

    family = "gguf-legacy"
    block_size = QK
    fused_natively = True

    def __init__(self, name: str, ggml_type: int, bits: int, affine: bool) -> None:
        self.name = name
        self.ggml_type = ggml_type
        self.bits = bits
        self.affine = affine
        self.qmax = (1 << bits) - 1 if (affine or bits < 8) else 127
        self.qmin = 0 if (affine or bits < 8) else -127
        self.offset = 0 if (affine or bits == 8) else 1 << (bits - 1)  # code - offset multiplies d
        scale_bytes = 4 if affine else 2
        high_plane = 4 if bits == 5 else 0
        self.type_size = scale_bytes + high_plane + QK * min(bits, 4) // 8 * (2 if bits == 8 else 1)
        kind = "scale and minimum" if affine else "scale"
        self.description = f"GGUF {name.upper()}: {bits}-bit codes, blocks of 32, fp16 {kind}"

    # ---- scale rule and rounding cells ----

    def _encode(self, x: torch.Tensor) -> Encoding:
        blocks = self.rows(x)
        if native.enabled(blocks):  # the same rules in one pass (native/legacy.c)
            d, low, u, nearest = native.legacy_encode(blocks.reshape(-1, QK), self.bits, self.affine)
            d, u, nearest = d.view(blocks.shape[:-1]), u.view(blocks.shape), nearest.view(blocks.shape)
            low = None if low is None else low.view(blocks.shape[:-1])
        else:
            d, low, u, nearest = self._encode_reference(blocks)
        cells = integer_grid_cells(u, nearest, self.qmin, self.qmax)
        cells = type(cells)(*(t.reshape(x.shape) for t in (cells.lower, cells.upper, cells.position, cells.nearest)))
        scales = {"d": d}
        if self.affine:
            scales["m"] = low
        return Encoding(self.name, x.shape, cells, scales)

    def _native_blocks(
        self, rows: torch.Tensor, key: int | None, row_offset: int, col_offset: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        return native.legacy_quantize(rows, self.bits, self.affine, key, row_offset, col_offset)

    def _encode_reference(
        self, blocks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The rules in torch, blocks (rows, nb, 32): (d, the minimum (affine types) or None, u, nearest)."""
        low = None
        if self.affine:
            low = _first_hit(blocks, blocks, blocks.amin(dim=-1))  # C: `if (v < min) min = v;`
            high = _first_hit(blocks, blocks, blocks.amax(dim=-1))
            d = (high - low) / float(self.qmax)
            shifted = blocks - low.unsqueeze(-1)
        elif self.bits == 8:
            d = blocks.abs().amax(dim=-1) / 127.0
            shifted = blocks
        else:
            d = _first_signed_absmax(blocks) / float(-self.offset)
            shifted = blocks
        inv = torch.where(d != 0, div_rn(1.0, torch.where(d != 0, d, 1.0)), 0.0)  # C: id = d ? 1.0f/d : 0.0f
        scaled = shifted * inv.unsqueeze(-1)
        if self.bits == 8:
            u = scaled
            nearest = c_float_to_int8(c_roundf(scaled))
        else:
            w = scaled + (self.offset + 0.5)  # the float the C code truncates
            u = w - 0.5  # exact: the grid coordinate whose floor/ceil bracket the truncation
            nearest = c_float_to_int8(w)
            if not (self.affine and self.bits == 5):
                nearest = nearest.clamp(max=self.qmax)  # MIN(15, ...) / MIN(31, ...); Q5_1 has no cap
        return d, low, u, nearest

    # ---- bytes ----

    def _pack(self, enc: Encoding, codes: torch.Tensor) -> QuantizedTensor:
        q = codes.reshape(-1, enc.scales["d"].shape[-1], QK)
        fields = [fp16_field(enc.scales["d"].unsqueeze(-1))]
        if self.affine:
            fields.append(fp16_field(enc.scales["m"].unsqueeze(-1)))
        if self.bits == 8:
            fields.append(q.to(torch.int8).view(torch.uint8))
        else:
            first, second = q[..., : QK // 2], q[..., QK // 2 :]
            if self.bits == 5:
                fields.append(self._high_bit_plane(q))
            fields.append(pack_nibbles(first, second))
        return self.container(enc, fields)

    @staticmethod
    def _high_bit_plane(q: torch.Tensor) -> torch.Tensor:
        """qh: bit j of a little-endian uint32 holds bit 4 of code j."""
        bits = ((q >> 4) & 1).to(torch.int64) << torch.arange(QK, dtype=torch.int64)
        word = bits.sum(dim=-1, keepdim=True)
        return ((word >> torch.arange(0, 32, 8, dtype=torch.int64)) & 0xFF).to(torch.uint8)

    def _field_sizes(self) -> list[int]:
        sizes = [2, 2] if self.affine else [2]
        if self.bits == 8:
            return [*sizes, QK]
        return [*sizes, *([4] if self.bits == 5 else []), QK // 2]

    def _unpack(self, q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(codes (rows, blocks, 32), d, m) from packed bytes."""
        fields = split_fields(self.blocks_of(q), self._field_sizes())
        d = read_fp16_field(fields[0]).squeeze(-1)
        m = read_fp16_field(fields[1]).squeeze(-1) if self.affine else None
        payload = fields[-1]
        if self.bits == 8:
            return payload.contiguous().view(torch.int8).to(torch.int32), d, m
        codes = torch.cat([payload & 0x0F, payload >> 4], dim=-1).to(torch.int32)
        if self.bits == 5:
            word = fields[-2].to(torch.int64) << torch.arange(0, 32, 8, dtype=torch.int64)
            qh = word.sum(dim=-1, keepdim=True)
            codes = codes | (((qh >> torch.arange(QK, dtype=torch.int64)) & 1).to(torch.int32) << 4)
        return codes, d, m

    def _values(self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        """ggml's dequantize_row_<type>: (code - offset) * d, plus m for the affine types (two roundings)."""
        values = (codes - self.offset).float() * d.unsqueeze(-1)
        if m is not None:
            values = values + m.unsqueeze(-1)
        return values

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        return self._values(*self._unpack(q)).reshape(q.shape)

    def code_values(self, enc: Encoding, codes: torch.Tensor) -> torch.Tensor:
        d16 = enc.scales["d"].half().float()
        m16 = enc.scales["m"].half().float() if self.affine else None
        return self._values(codes.reshape(-1, d16.shape[-1], QK), d16, m16).reshape(enc.shape)

    def code_value_rule(self, enc: Encoding) -> CodeValueRule:
        """_values as a rule: (code - offset) * d16 (+ m16), per block of 32."""
        table = torch.arange(self.qmin - self.offset, self.qmax - self.offset + 1, dtype=torch.float32)
        d16 = enc.scales["d"].half().float().reshape(-1)
        m16 = enc.scales["m"].half().float().reshape(-1) if self.affine else None
        return CodeValueRule(table, self.qmin, d16, QK, shift=m16)


register_format(GgufLegacy("q8_0", ggml_type=8, bits=8, affine=False))
register_format(GgufLegacy("q4_0", ggml_type=2, bits=4, affine=False))
register_format(GgufLegacy("q4_1", ggml_type=3, bits=4, affine=True))
register_format(GgufLegacy("q5_0", ggml_type=6, bits=5, affine=False))
register_format(GgufLegacy("q5_1", ggml_type=7, bits=5, affine=True))
