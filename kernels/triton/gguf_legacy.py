"""GGUF legacy family in one Triton kernel: Q8_0, Q4_0, Q5_0 (scale) and Q4_1, Q5_1 (scale and minimum).

A program takes BLOCKS consecutive 32-element blocks of the flattened tensor (ne0 % 32 == 0, so a block never spans
two rows and block b starts at byte b * type_size of the output) as two (block, 16) halves: element j and j + 16 of
a block share one byte of nibbles. ggml's quantize_row_<type>_ref, in float32 without FMA:

- Q8_0: ``d = amax / 127``, ``id = d ? 1/d : 0``, code ``roundf(x * id)`` (half away from zero), int8.
- Q4_0/Q5_0: ``max`` = the first element of largest magnitude (strict first hit, its sign kept; +0.0 for an all-zero
  block), ``d = max / -2**(b-1)``, code ``min(2**b - 1, (int8_t)(x * id + 2**(b-1) + 0.5))``.
- Q4_1/Q5_1: ``min``/``max`` = the first elements equal to the extremes (the sign of a zero minimum is that element's),
  ``d = (max - min) / (2**b - 1)``, code ``(int8_t)((x - min) * id + 0.5)`` (Q4_1 capped at 15).
The (int8_t) casts follow x86 (NaN and out-of-range: 0). d and min are stored as IEEE half (round to nearest even);
Q5's fifth bits go to a little-endian uint32 ``qh`` (bit j = bit 4 of code j).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.base import Format, QuantizedTensor
from .common import (
    EXACT_LAUNCH,
    c_roundf,
    choose_code,
    dtype_code,
    grouped_draws,
    hardening_uniforms,
    integer_cells,
    load_f32,
    x86_to_int8,
)

__all__ = ["quantize_gguf_legacy"]


@triton.jit
def _first_hit(k_lo, k_hi, x_lo, x_hi, target):
    """The element x of the first key (in block order) equal to target, through its bits: keeps the sign of a zero.

    What a C loop with a strict comparison keeps (-0.0 == 0.0 compares equal, the first one seen wins).
    """
    lanes = tl.arange(0, 16)[None, :]
    hit_lo = tl.where(k_lo == target[:, None], lanes, 32)
    hit_hi = tl.where(k_hi == target[:, None], lanes + 16, 32)
    first = tl.minimum(tl.min(hit_lo, axis=1), tl.min(hit_hi, axis=1))[:, None]
    bits_lo = tl.where(lanes == first, x_lo.to(tl.int32, bitcast=True), 0)
    bits_hi = tl.where(lanes + 16 == first, x_hi.to(tl.int32, bitcast=True), 0)
    return (tl.sum(bits_lo, axis=1) + tl.sum(bits_hi, axis=1)).to(tl.float32, bitcast=True)


@triton.jit
def _code(x, low, inv, draw, BITS: tl.constexpr, AFFINE: tl.constexpr, HARDEN: tl.constexpr):
    QMAX: tl.constexpr = (1 << BITS) - 1 if (AFFINE or BITS < 8) else 127
    OFFSET: tl.constexpr = 0 if (AFFINE or BITS == 8) else (1 << (BITS - 1))
    if BITS == 8:
        u = x * inv
        nearest = x86_to_int8(c_roundf(u))
        lower, upper, position = integer_cells(u, nearest, -127, 127)
    else:
        w = (x - low) * inv + (OFFSET + 0.5)
        u = w - 0.5
        nearest = x86_to_int8(w)
        if not (AFFINE and BITS == 5):
            nearest = tl.minimum(nearest, QMAX)
        lower, upper, position = integer_cells(u, nearest, 0, QMAX)
    return choose_code(lower, upper, position, nearest, draw, HARDEN)


@triton.jit
def _store_half(out_ptr, at, value, mask):
    """IEEE half of float32 value (round to nearest even), little-endian, two bytes at `at`."""
    bits = value.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.int32)
    tl.store(out_ptr + at, (bits & 0xFF).to(tl.uint8), mask=mask)
    tl.store(out_ptr + at + 1, (bits >> 8).to(tl.uint8), mask=mask)


@triton.jit
def gguf_legacy_kernel(
    x_ptr,
    out_ptr,
    key,
    nblocks,
    cols,
    row_offset,
    col_offset,
    BITS: tl.constexpr,
    AFFINE: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCKS: tl.constexpr,
    HARDEN: tl.constexpr,
    GROUPED: tl.constexpr,
):
    QMAX: tl.constexpr = (1 << BITS) - 1 if (AFFINE or BITS < 8) else 127
    OFFSET: tl.constexpr = 0 if (AFFINE or BITS == 8) else (1 << (BITS - 1))
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    live = block < nblocks
    lanes = tl.arange(0, 16)[None, :]
    first = block.to(tl.int64)[:, None] * 32 + lanes
    m = live[:, None] & (lanes < 16)
    x_lo = load_f32(x_ptr, first, m, DTYPE)
    x_hi = load_f32(x_ptr, first + 16, m, DTYPE)
    low = tl.zeros((BLOCKS,), tl.float32)
    if AFFINE:
        low = _first_hit(x_lo, x_hi, x_lo, x_hi, tl.minimum(tl.min(x_lo, axis=1), tl.min(x_hi, axis=1)))
        high = _first_hit(x_lo, x_hi, x_lo, x_hi, tl.maximum(tl.max(x_lo, axis=1), tl.max(x_hi, axis=1)))
        d = tl.math.div_rn(high - low, QMAX * 1.0)
    else:
        amax = tl.maximum(tl.max(tl.abs(x_lo), axis=1), tl.max(tl.abs(x_hi), axis=1))
        if BITS == 8:
            d = tl.math.div_rn(amax, 127.0)
        else:
            signed = _first_hit(tl.abs(x_lo), tl.abs(x_hi), x_lo, x_hi, amax)
            signed = tl.where(tl.abs(signed) > 0.0, signed, 0.0)
            d = tl.math.div_rn(signed, -OFFSET * 1.0)
    inv = tl.where(d != 0.0, tl.math.div_rn(1.0, tl.where(d != 0.0, d, 1.0)), 0.0)
    row_lo = first // cols + row_offset
    col_lo = first % cols + col_offset
    draw_lo = hardening_uniforms(key, row_lo, col_lo, HARDEN, GROUPED)  # 16 adjacent columns per block and half
    draw_hi = hardening_uniforms(key, row_lo, col_lo + 16, HARDEN, GROUPED)
    c_lo = _code(x_lo, low[:, None], inv[:, None], draw_lo, BITS, AFFINE, HARDEN)
    c_hi = _code(x_hi, low[:, None], inv[:, None], draw_hi, BITS, AFFINE, HARDEN)
    base = block.to(tl.int64) * TYPE_SIZE
    _store_half(out_ptr, base, d, live)
    head = 2
    if AFFINE:
        _store_half(out_ptr, base + 2, low, live)
        head = 4
    if BITS == 8:
        tl.store(out_ptr + base[:, None] + head + lanes, c_lo.to(tl.int8).to(tl.uint8, bitcast=True), mask=m)
        tl.store(out_ptr + base[:, None] + head + 16 + lanes, c_hi.to(tl.int8).to(tl.uint8, bitcast=True), mask=m)
    else:
        if BITS == 5:
            qh = tl.sum(((c_lo >> 4) & 1).to(tl.int64) << lanes, axis=1) + tl.sum(
                ((c_hi >> 4) & 1).to(tl.int64) << (lanes + 16), axis=1
            )
            for k in tl.static_range(4):
                tl.store(out_ptr + base + head + k, ((qh >> (8 * k)) & 0xFF).to(tl.uint8), mask=live)
            head += 4
        nib = (c_lo & 0xF) | ((c_hi & 0xF) << 4)
        tl.store(out_ptr + base[:, None] + head + lanes, nib.to(tl.uint8), mask=m)


def quantize_gguf_legacy(
    fmt: Format, x: torch.Tensor, key: int | None, row_offset: int, col_offset: int
) -> QuantizedTensor:
    """Launch the legacy GGUF kernel for a validated tensor; (rows, row_bytes) uint8 as ggml_quantize_chunk writes."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    nblocks = x.numel() // 32
    src = x.contiguous().reshape(-1)
    src = src.view(torch.int16) if x.dtype == torch.bfloat16 else src
    out = torch.empty(rows, (cols // 32) * fmt.type_size, dtype=torch.uint8, device=x.device)
    blocks = 16
    gguf_legacy_kernel[(triton.cdiv(nblocks, blocks),)](
        src, out, 0 if key is None else key, nblocks, cols, row_offset, col_offset,
        BITS=fmt.bits, AFFINE=fmt.affine, TYPE_SIZE=fmt.type_size, DTYPE=dtype_code(x.dtype), BLOCKS=blocks,
        HARDEN=key is not None,
        GROUPED=grouped_draws(cols, col_offset), **EXACT_LAUNCH,
    )  # fmt: skip
    return QuantizedTensor(fmt.name, x.shape, {"blocks": out})
