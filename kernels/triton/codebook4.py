"""Codebook 4-bit family in one Triton kernel: bitsandbytes NF4, FP4 and NF4 with double-quantized absmax.

The tensor is flattened and cut into blocks of 64; a program takes BLOCKS blocks as (block, pair) tiles, so each
lane holds the two elements of one output byte. Per block: absmax, then ``v = clamp(x * (1 / max(absmax, 1e-38)),
-1, 1)`` (the short last block divides by its clamped absmax instead, as bitsandbytes does), the nearest code is the
count of codebook midpoints strictly below v (ties to the lower entry), and the cell is the pair of codebook entries
around v with ``position = (v - lower) / (upper - lower)`` (IEEE division). The stored nibble is the entry's
storage index (FP4's duplicated zero: the positive-zero nibble for v > 0). The first element of a pair goes in the
high nibble; an odd count pads with the nibble of 0.0.

Double quantization (nf4_dq) quantizes the per-block absmax vector (1/64 of the weight) after the kernel with the
reference's own blockwise 8-bit quantizer on the CPU: its float32 mean is torch's CPU reduction, which a GPU reduction
would not reproduce bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.base import Format, QuantizedTensor
from ..formats.bnb import quantize_dynamic_blockwise
from .common import EXACT_LAUNCH, choose_code, clamp_keep_nan, dtype_code, grouped_draws, load_f32, pair_uniforms

__all__ = ["quantize_codebook4"]

_BLOCK = 64
_PAIRS = _BLOCK // 2
_FLOOR = 1e-38  # bitsandbytes' absmax floor (a float32 subnormal)


@triton.jit
def _element(x, absmax, tail, draw, grid_ptr, mid_ptr, low_ptr, high_ptr, NGRID: tl.constexpr, HARDEN: tl.constexpr):
    """Storage nibble of one element given its block's absmax (``tail``: the short last block's rule)."""
    floor = tl.maximum(absmax, 1e-38)
    v_full = x * tl.math.div_rn(1.0, floor)
    v_tail = tl.math.div_rn(x, floor)
    v = clamp_keep_nan(tl.where(tail, v_tail, v_full), -1.0, 1.0)
    nearest = tl.zeros(v.shape, tl.int32)
    count = tl.zeros(v.shape, tl.int32)
    for k in tl.static_range(NGRID - 1):
        nearest += (tl.load(mid_ptr + k) < v).to(tl.int32)
    for k in tl.static_range(NGRID):
        count += (tl.load(grid_ptr + k) <= v).to(tl.int32)
    lower = tl.minimum(tl.maximum(count - 1, 0), NGRID - 1)
    g_lower = tl.load(grid_ptr + lower)
    stay = (g_lower == v) | (v > tl.load(grid_ptr + (NGRID - 1))) | (v < tl.load(grid_ptr))
    upper = tl.where(stay, lower, tl.minimum(lower + 1, NGRID - 1))
    span = tl.load(grid_ptr + upper) - g_lower
    position = tl.where(span > 0.0, tl.math.div_rn(v - g_lower, tl.where(span > 0.0, span, 1.0)), 0.0)
    code = choose_code(lower, upper, position, nearest, draw, HARDEN)
    return tl.where(v > 0.0, tl.load(high_ptr + code), tl.load(low_ptr + code))


@triton.jit
def codebook4_kernel(
    x_ptr,
    out_ptr,
    absmax_ptr,
    grid_ptr,
    mid_ptr,
    low_ptr,
    high_ptr,
    key,
    n,
    cols,
    nblocks,
    row_offset,
    col_offset,
    zero_nibble,
    NGRID: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCKS: tl.constexpr,
    HARDEN: tl.constexpr,
    GROUPED: tl.constexpr,
):
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    pair = tl.arange(0, 32)
    first = block.to(tl.int64)[:, None] * 64 + 2 * pair[None, :]
    live = block[:, None] < nblocks
    m0 = live & (first < n)
    m1 = live & (first + 1 < n)
    x0 = load_f32(x_ptr, first, m0, DTYPE)
    x1 = load_f32(x_ptr, first + 1, m1, DTYPE)
    absmax = tl.maximum(tl.max(tl.abs(x0), axis=1), tl.max(tl.abs(x1), axis=1))
    tail = (block.to(tl.int64) * 64 + 64) > n
    a = absmax[:, None]
    t = tail[:, None]
    # hardening counters: the (row, col) of each element in the logical tensor, shifted by the shard's offsets
    draw0, draw1 = pair_uniforms(
        key,
        first // cols + row_offset,
        first % cols + col_offset,
        (first + 1) // cols + row_offset,
        (first + 1) % cols + col_offset,
        HARDEN,
        GROUPED,
    )
    n0 = _element(x0, a, t, draw0, grid_ptr, mid_ptr, low_ptr, high_ptr, NGRID, HARDEN)
    n1 = _element(x1, a, t, draw1, grid_ptr, mid_ptr, low_ptr, high_ptr, NGRID, HARDEN)
    n1 = tl.where(m1, n1, zero_nibble)
    tl.store(out_ptr + first // 2, ((n0 << 4) | n1).to(tl.uint8), mask=m0)
    stored = tl.where(tail, tl.maximum(absmax, 1e-38), absmax)
    tl.store(absmax_ptr + block, stored, mask=block < nblocks)


def _tables(fmt: Format, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(sorted grid, midpoints, nibble of each entry for v <= 0, for v > 0, nibble of 0.0), from the format's table.

    A value stored twice (FP4's zero) has its first storage index for v <= 0 and its last for v > 0, as in bnb.
    """
    grid = fmt.grid
    storage = [torch.nonzero(fmt.code == g).flatten() for g in grid]
    low = torch.stack([s[0] for s in storage]).to(torch.int32)
    high = torch.stack([s[-1] for s in storage]).to(torch.int32)
    mids = (grid[:-1] + grid[1:]) / 2
    zero = int(low[int(torch.searchsorted(grid, torch.tensor(0.0, dtype=grid.dtype)))])
    return grid.to(device), mids.to(device), low.to(device), high.to(device), zero


def quantize_codebook4(
    fmt: Format, x: torch.Tensor, key: int | None, row_offset: int, col_offset: int
) -> QuantizedTensor:
    """Launch the codebook kernel for a validated tensor; the packed layout of bitsandbytes' quantize_4bit."""
    n = x.numel()
    cols = x.shape[-1] if x.dim() else 1
    src = x.contiguous().reshape(-1)
    src = src.view(torch.int16) if x.dtype == torch.bfloat16 else src
    nblocks = -(-n // _BLOCK)
    grid, mids, low, high, zero_nibble = _tables(fmt, x.device)
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    blocks = 16
    codebook4_kernel[(triton.cdiv(nblocks, blocks),)](
        src,
        packed,
        absmax,
        grid,
        mids,
        low,
        high,
        0 if key is None else key,
        n,
        cols,
        nblocks,
        row_offset,
        col_offset,
        zero_nibble,
        NGRID=grid.numel(),
        DTYPE=dtype_code(x.dtype),
        BLOCKS=blocks,
        HARDEN=key is not None,
        GROUPED=grouped_draws(cols, col_offset),
        **EXACT_LAUNCH,
    )
    if not fmt.double_quant:
        return QuantizedTensor(fmt.name, x.shape, {"weight": packed, "absmax": absmax})
    stats = absmax.cpu()
    offset = stats.mean()
    codes, nested = quantize_dynamic_blockwise(stats - offset)
    tensors = {
        "weight": packed,
        "absmax": codes.to(x.device),
        "offset": offset.to(x.device),
        "nested_absmax": nested.to(x.device),
    }
    return QuantizedTensor(fmt.name, x.shape, tensors)
