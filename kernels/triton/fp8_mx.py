"""FP8/MX family in one Triton kernel: vLLM's fp8_per_tensor, fp8_per_channel, fp8_per_block, mxfp8 and mxfp4.

The granularity is a constexpr; everything after the scale is shared. Each program owns a tile of whole scale groups
(a row for per-channel, a 128x128 block, 32-element blocks for MX, any tile for per-tensor, whose amax comes from a
torch reduction first: a maximum is exact in any order).

- Scales, exactly as the references: per-tensor ``scale = amax / 448``, ``r = clamp(x * (1 / scale))`` with CUDA's
  fminf NaN rule (NaN -> +448); per-channel ``scale = max(amax / 448, float32(1/229376))``, ``r = clamp(x / scale)``;
  per-block ``sf = max(amax, 1e-4) * float32(1/448)``, ``r = x * (1 / sf)``; mxfp8 ``byte = ceil(log2(max(amax,
  2**-126) / 448)) + 127`` and ``r = x / 2**(byte-127)``; mxfp4 the OCP round-then-floor exponent from amax's bits and
  ``r = x * (1 / 2**(byte-127))``. Every division is IEEE (div_rn).
- ``ceil(log2(d))`` for mxfp8 is computed from d's bits, and reproduces torch's float32 log2 where it rounds
  ``log2(2**k * (1 + m))`` down to the integer k (float32 weights a few ulp above a power of two): the result stays
  k when ``log2(1 + m)`` is below half the float32 spacing at k.
- e4m3 elements: the cell on the 127 magnitudes built from the code's bits (no hardware fp8 cast: the interpreter's
  numpy cast does not saturate), nearest = round half to even on that grid, sign bit = the sign of r (-0.0 included).
- e2m1 elements: vLLM's bit-level conversion (normal path with a one-bit mantissa round, subnormal path with its
  sticky bit and PTX's shift clamp), cells on the 8 magnitudes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.base import Format, QuantizedTensor
from .common import (
    EXACT_LAUNCH,
    choose_code,
    clamp_keep_nan,
    dtype_code,
    grouped_draws,
    hardening_uniforms,
    load_f32,
    pair_uniforms,
)

__all__ = ["quantize_fp8_mx"]

GRAN_TENSOR = 0
GRAN_CHANNEL = 1
GRAN_BLOCK = 2
GRAN_MXFP8 = 3
GRAN_MXFP4 = 4

# float32 constants exactly as the references round them (kernels read them as constexpr globals)
INV_448 = tl.constexpr(float(torch.tensor(1.0 / 448.0, dtype=torch.float32)))  # Inductor's float32(1/448)
_ONE, _CHANNEL_DIVISOR = torch.tensor(1.0, dtype=torch.float32), torch.tensor(448.0 * 512, dtype=torch.float32)
CHANNEL_FLOOR = tl.constexpr(float(_ONE / _CHANNEL_DIVISOR))  # float32(1/229376), divided in float32
BLOCK_FLOOR = tl.constexpr(float(torch.tensor(1e-4, dtype=torch.float32)))


@triton.jit
def _e4m3_value(code):
    """Magnitude of an e4m3fn code 0..126 in float32, from its bits (subnormals: code * 2**-9)."""
    normal = (((code >> 3) + 120) << 23) | ((code & 7) << 20)
    return tl.where(code < 8, code.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))


@triton.jit
def _e4m3_code(r, draw, HARDEN: tl.constexpr):
    """The byte written for float32 r handed to the e4m3 cast: magnitude code (cell draw or nearest) | sign << 7."""
    v = tl.abs(r)
    bits = v.to(tl.int32, bitcast=True)
    normal_code = ((bits >> 23) - 120) * 8 + ((bits >> 20) & 7)
    lower = tl.where(v < 0.015625, (v * 512.0).to(tl.int32), normal_code)
    lower = tl.minimum(tl.maximum(lower, 0), 126)
    g_lower = _e4m3_value(lower)
    next_code = tl.minimum(lower + 1, 126)
    g_next = _e4m3_value(next_code)
    mid = (g_lower + g_next) * 0.5
    up = (v > mid) | ((v == mid) & ((lower & 1) == 1))
    nearest = tl.where(up, next_code, lower)
    upper = tl.where((g_lower == v) | (v > 448.0), lower, next_code)
    span = _e4m3_value(upper) - g_lower
    position = tl.where(span > 0.0, tl.math.div_rn(v - g_lower, tl.where(span > 0.0, span, 1.0)), 0.0)
    code = choose_code(lower, upper, position, nearest, draw, HARDEN)
    sign = (r.to(tl.int32, bitcast=True) >> 31) & 1
    return code | (sign << 7)


@triton.jit
def _e2m1_value(code):
    return tl.where(code < 4, code.to(tl.float32) * 0.5, tl.where(code == 7, 6.0, (code - 2).to(tl.float32)))


@triton.jit
def _e2m1_code(q, draw, HARDEN: tl.constexpr):
    """The nibble written for float32 q: vLLM's e2m1 conversion for nearest, the cell draw when hardened, sign bit 3."""
    bits = q.to(tl.uint32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF).to(tl.int32)
    mantissa = bits & 0x7FFFFF
    shift = tl.minimum(tl.maximum(126 - exponent, 0), 32)
    folded = 0x400000 | (mantissa >> 1)
    s = tl.minimum(shift, 31).to(tl.uint32)
    denormal = tl.where(shift >= 32, 0, folded >> s)
    back = tl.where(shift >= 32, 0, denormal << s)
    denormal = denormal | (back != folded).to(tl.uint32)
    mantissa = tl.where(exponent < 127, denormal, mantissa).to(tl.int32)
    exponent = tl.maximum(exponent, 126) - 126
    rounded = (mantissa + ((mantissa >> 22) & 1) + 0x1FFFFF) >> 22
    nearest = tl.minimum((exponent << 1) + rounded, 7)
    v = tl.abs(q)
    count = tl.zeros(v.shape, tl.int32)
    for k in tl.static_range(8):
        count += (_e2m1_value(tl.full(v.shape, k, tl.int32)) <= v).to(tl.int32)
    lower = tl.minimum(tl.maximum(count - 1, 0), 7)
    g_lower = _e2m1_value(lower)
    upper = tl.where((g_lower == v) | (v > 6.0), lower, tl.minimum(lower + 1, 7))
    span = _e2m1_value(upper) - g_lower
    position = tl.where(span > 0.0, tl.math.div_rn(v - g_lower, tl.where(span > 0.0, span, 1.0)), 0.0)
    code = choose_code(lower, upper, position, nearest, draw, HARDEN)
    return code | (((bits >> 31) & 1).to(tl.int32) << 3)


@triton.jit
def _ceil_log2(d):
    """ceil(torch.log2(d)) for float32 d > 0 (see the module docstring for the float32 rounding it reproduces)."""
    small = d < 1.1754943508222875e-38
    dn = tl.where(small, d * 18446744073709551616.0, d)
    bits = dn.to(tl.int32, bitcast=True)
    p = ((bits >> 23) & 0xFF) - 127 - tl.where(small, 64, 0)
    mant = bits & 0x7FFFFF
    m = mant.to(tl.float32) * 1.1920928955078125e-07
    t = m * 1.4426950408889634 - m * m * 0.7213475204444817
    q = tl.abs(p)
    lq = ((tl.maximum(q, 1).to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    half_up = ((lq - 24 + 127) << 23).to(tl.float32, bitcast=True)
    half_down = ((lq - 25 + 127) << 23).to(tl.float32, bitcast=True)
    half_below = tl.where((q & (q - 1)) == 0, half_down, half_up)
    stays = tl.where(p > 0, t < half_up, tl.where(p < 0, t < half_below, False))
    return tl.where((mant == 0) | stays, p, p + 1)


@triton.jit
def _e8m0(byte):
    """2**(byte - 127) in float32, byte 0 the subnormal 2**-127."""
    return tl.where(byte == 0, 5.877471754111438e-39, (byte << 23).to(tl.float32, bitcast=True))


@triton.jit
def fp8_mx_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    amax_ptr,
    key,
    rows,
    cols,
    row_offset,
    col_offset,
    GRAN: tl.constexpr,
    DTYPE: tl.constexpr,
    TR: tl.constexpr,
    TC: tl.constexpr,
    HARDEN: tl.constexpr,
    GROUPED: tl.constexpr,
):
    r_idx = tl.program_id(0) * TR + tl.arange(0, TR)[:, None]
    c_lane = tl.arange(0, TC)[None, :]
    if GRAN == 0 or GRAN == 2:
        c_idx = tl.program_id(1) * TC + c_lane
        mask = (r_idx < rows) & (c_idx < cols)
        offs = r_idx.to(tl.int64) * cols + c_idx
        x = load_f32(x_ptr, offs, mask, DTYPE)
        if GRAN == 0:
            scale = tl.math.div_rn(tl.load(amax_ptr), 448.0)
            inv = tl.math.div_rn(1.0, scale)
            u = x * inv
            r = tl.where(u != u, 448.0, clamp_keep_nan(u, -448.0, 448.0))
            if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
                tl.store(scale_ptr, scale)
        else:
            amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), BLOCK_FLOOR)
            sf = amax * INV_448
            r = x * tl.math.div_rn(1.0, sf)
            tl.store(scale_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), sf)
        byte = _e4m3_code(r, hardening_uniforms(key, r_idx + row_offset, c_idx + col_offset, HARDEN, GROUPED), HARDEN)
        tl.store(q_ptr + offs, byte.to(tl.uint8), mask=mask)
    elif GRAN == 1:
        row = tl.program_id(0)
        amax = tl.zeros((), tl.float32)
        for start in range(0, cols, TC):
            c = start + tl.arange(0, TC)
            amax = tl.maximum(amax, tl.max(tl.abs(load_f32(x_ptr, row.to(tl.int64) * cols + c, c < cols, DTYPE))))
        scale = tl.maximum(tl.math.div_rn(amax, 448.0), CHANNEL_FLOOR)
        tl.store(scale_ptr + row, scale)
        for start in range(0, cols, TC):
            c = start + tl.arange(0, TC)
            offs = row.to(tl.int64) * cols + c
            x = load_f32(x_ptr, offs, c < cols, DTYPE)
            r = clamp_keep_nan(tl.math.div_rn(x, scale), -448.0, 448.0)
            byte = _e4m3_code(r, hardening_uniforms(key, row + row_offset, c + col_offset, HARDEN, GROUPED), HARDEN)
            tl.store(q_ptr + offs, byte.to(tl.uint8), mask=c < cols)
    else:
        # MX: TR consecutive 32-element blocks of the flattened tensor (cols % 32 == 0, so no block spans two rows)
        nblocks = rows * (cols // 32)
        live = r_idx < nblocks
        if GRAN == 3:
            offs = r_idx.to(tl.int64) * 32 + c_lane
            x = load_f32(x_ptr, offs, live, DTYPE)
            amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1.1754943508222875e-38)
            byte = tl.minimum(tl.maximum(_ceil_log2(tl.math.div_rn(amax, 448.0)) + 127, 0), 254)
            q = tl.math.div_rn(x, _e8m0(byte)[:, None])
            draw = hardening_uniforms(key, offs // cols + row_offset, offs % cols + col_offset, HARDEN, GROUPED)
            code = _e4m3_code(q, draw, HARDEN)
            tl.store(q_ptr + offs, code.to(tl.uint8), mask=live)
        else:
            first = r_idx.to(tl.int64) * 32 + 2 * c_lane
            x0 = load_f32(x_ptr, first, live, DTYPE)
            x1 = load_f32(x_ptr, first + 1, live, DTYPE)
            amax = tl.maximum(tl.max(tl.abs(x0), axis=1), tl.max(tl.abs(x1), axis=1))
            field = ((amax.to(tl.int32, bitcast=True) + 0x200000) >> 23) & 0xFF
            unbiased = tl.where(field == 0, -126, field - 127) - 2
            unbiased = tl.where(field == 255, 127, unbiased)
            byte = tl.minimum(tl.maximum(unbiased, -127), 127) + 127
            inv = tl.math.div_rn(1.0, _e8m0(byte))[:, None]
            row0 = first // cols + row_offset
            col0 = first % cols + col_offset
            draw0, draw1 = pair_uniforms(key, row0, col0, row0, col0 + 1, HARDEN, GROUPED)  # cols % 32 == 0: same row
            n0 = _e2m1_code(x0 * inv, draw0, HARDEN)
            n1 = _e2m1_code(x1 * inv, draw1, HARDEN)
            tl.store(q_ptr + first // 2, (n0 | (n1 << 4)).to(tl.uint8), mask=live)
        blk = tl.program_id(0) * TR + tl.arange(0, TR)
        tl.store(scale_ptr + blk, byte.to(tl.uint8), mask=blk < nblocks)


def _granularity(fmt: Format) -> int:
    if fmt.name == "mxfp8":
        return GRAN_MXFP8
    if fmt.name == "mxfp4":
        return GRAN_MXFP4
    return {"tensor": GRAN_TENSOR, "channel": GRAN_CHANNEL, "block": GRAN_BLOCK}[fmt.granularity]


def quantize_fp8_mx(fmt: Format, x: torch.Tensor, key: int | None, row_offset: int, col_offset: int) -> QuantizedTensor:
    """Launch the fp8/mx kernel for a validated tensor; vLLM's weight and scale tensors (fp8) or MX bytes."""
    gran = _granularity(fmt)
    cols = x.shape[-1]
    rows = x.numel() // cols
    src = x.contiguous()
    src = src.view(torch.int16) if x.dtype == torch.bfloat16 else src
    device = x.device
    f32 = {"dtype": torch.float32, "device": device}  # explicit: vLLM loads under a bfloat16 default dtype
    amax = x.abs().amax().float().reshape(1) if gran == GRAN_TENSOR else torch.zeros(1, **f32)
    hard = {"key": 0 if key is None else key, "HARDEN": key is not None}
    if gran in (GRAN_MXFP8, GRAN_MXFP4):
        nblocks = rows * (cols // 32)
        per_element = gran == GRAN_MXFP8
        q = torch.empty(*x.shape[:-1], cols if per_element else cols // 2, dtype=torch.uint8, device=device)
        scale = torch.empty(*x.shape[:-1], cols // 32, dtype=torch.uint8, device=device)
        tr = 16
        grid = (triton.cdiv(nblocks, tr), 1)
        tc = 32 if per_element else 16
    else:
        q = torch.empty(rows, cols, dtype=torch.uint8, device=device)
        if gran == GRAN_TENSOR:
            scale, tr, tc = torch.empty(1, **f32), 16, 128
            grid = (triton.cdiv(rows, tr), triton.cdiv(cols, tc))
        elif gran == GRAN_CHANNEL:
            scale, tr, tc = torch.empty(rows, 1, **f32), 1, min(triton.next_power_of_2(cols), 2048)
            grid = (rows, 1)
        else:
            tr = tc = 128
            grid = (triton.cdiv(rows, tr), triton.cdiv(cols, tc))
            scale = torch.empty(grid, **f32)
    fp8_mx_kernel[grid](
        src, q, scale, amax, hard["key"], rows, cols, row_offset, col_offset,
        GRAN=gran, DTYPE=dtype_code(x.dtype), TR=tr, TC=tc, HARDEN=hard["HARDEN"],
        GROUPED=grouped_draws(cols, col_offset),
        **EXACT_LAUNCH,
    )  # fmt: skip
    if gran in (GRAN_MXFP8, GRAN_MXFP4):
        return QuantizedTensor(fmt.name, x.shape, {"weight": q, "scale": scale})
    return QuantizedTensor(fmt.name, x.shape, {"weight": q.view(torch.float8_e4m3fn), "scale": scale})
