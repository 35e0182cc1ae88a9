"""GGUF k-quant family in Triton: Q6_K today (the symmetric search); Q2_K..Q5_K still dispatch to the reference.

One program quantizes one 256-weight super-block, held as a (2, 4, 32) tile (half, quarter, lane: the order of
Q6_K's bit planes) and viewed as (16, 16) (sub-block, element) for the searches. Exactly ggml's
quantize_row_q6_K_ref, in float32 with one rounding per operation (no FMA):

1. Per sub-block, make_qx_quants(16, 32, rmse_type 1): max = first element of largest |x| (strict first hit),
   iscale = -32 / max, l = clamp(nearest_int(iscale * x), -32, 31); with w = x * x, sumlx = sum (w * x) * l and
   suml2 = sum (w * l) * l accumulated in element order from +0.0 (a loop over the 16 columns, not a tree
   reduction); scale = sumlx / suml2; then 18 candidates iscale = -(32 + 0.1f * is) / max (is = -9..9, is != 0,
   the factors rounded in float32 on the host exactly as C computes them) replace the best when suml2 > 0 and
   sumlx^2 > best * suml2. Sub-blocks with amax < 1e-15 get scale 0 and codes 0.
2. max_scale = first largest |scale| (NaN never wins); iscale = -128 / max_scale; sc = (int8_t)MIN(127,
   nearest_int(iscale * scale)); d = fp16(1 / iscale); an all-zero super-block (|max_scale| < 1e-15) is zero bytes.
3. q = clamp(nearest_int(x / (fp16(d) * sc)), -32, 31) + 32 (true division; sub-blocks with a zero product keep the
   search's codes). The hardened code is drawn over the cell of that exact quotient, as the reference does.
nearest_int is ggml's 1.5 * 2**23 bit trick, reproduced as is (also for huge or non-finite quotients).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ..formats.base import Format, QuantizedTensor
from .common import EXACT_LAUNCH, choose_code, dtype_code, integer_cells, load_f32

__all__ = ["KQUANT_KERNEL_FORMATS", "quantize_gguf_kquant"]

KQUANT_KERNEL_FORMATS = frozenset({"q6_k"})
GROUP_MAX_EPS = tl.constexpr(float(np.float32(1e-15)))
NEAREST_INT_LIMIT = tl.constexpr(4194303.0)


def _candidate_factors() -> torch.Tensor:
    """The 19 numerators of make_qx_quants' iscale, padded to 32: -32, then -(32 + 0.1f * is) for is = -9..9,
    is != 0, each operation rounded to float32 as in C."""
    f32 = np.float32
    steps = [s for s in range(-9, 10) if s != 0]
    values = [-32.0] + [float(-(f32(32) + f32(0.1) * f32(s))) for s in steps]
    return torch.tensor(values + [-32.0] * (32 - len(values)), dtype=torch.float32)


@triton.jit
def _nearest_int(t):
    """ggml's nearest_int: (bits(t + 1.5 * 2**23) & 0x7FFFFF) - 0x400000 (round half to even for |t| < 2**22)."""
    return ((t + 12582912.0).to(tl.int32, bitcast=True) & 0x7FFFFF) - 0x400000


@triton.jit
def _c_order_sums(wx, w, lf):
    """(sum (w * x) * l, sum (w * l) * l) over the last axis of (candidate, sub-block, 16) tiles, accumulated left
    to right from +0.0 as C does (column j is extracted exactly: the other lanes add +0.0)."""
    tlx = wx[None, :, :] * lf
    tl2 = (w[None, :, :] * lf) * lf
    lanes = tl.arange(0, 16)[None, None, :]
    sumlx = tl.zeros((32, 16), tl.float32)
    suml2 = tl.zeros((32, 16), tl.float32)
    for j in tl.static_range(16):
        sumlx = sumlx + tl.sum(tl.where(lanes == j, tlx, 0.0), axis=2)
        suml2 = suml2 + tl.sum(tl.where(lanes == j, tl2, 0.0), axis=2)
    return sumlx, suml2


@triton.jit
def _pick(t, cand, k):
    """Row k of a (32, 16) tile, exactly."""
    return tl.sum(tl.where(cand == k, t, 0.0), axis=0)


@triton.jit
def q6_k_kernel(
    x_ptr, out_ptr, factor_ptr, key, cols, row_offset, col_offset, DTYPE: tl.constexpr, HARDEN: tl.constexpr
):
    sb = tl.program_id(0)
    per_row = cols // 256
    row = sb // per_row
    first_col = (sb % per_row) * 256
    h = tl.arange(0, 2)[:, None, None]
    q = tl.arange(0, 4)[None, :, None]
    lane = tl.arange(0, 32)[None, None, :]
    e3 = h * 128 + q * 32 + lane  # element of the super-block, in Q6_K's plane order
    x3 = load_f32(x_ptr, sb.to(tl.int64) * 256 + e3, e3 < 256, DTYPE)
    x = tl.reshape(x3, (16, 16))  # row s = sub-block (e // 16), column = e % 16
    lanes = tl.arange(0, 16)[None, :]

    # 1. per sub-block search (make_qx_quants, rmse_type 1)
    ax = tl.abs(x)
    amax = tl.max(ax, axis=1)
    first = tl.min(tl.where((ax == amax[:, None]) & (ax > 0.0), lanes, 16), axis=1)
    mx = tl.sum(tl.where(lanes == first[:, None], x.to(tl.int32, bitcast=True), 0), axis=1).to(tl.float32, bitcast=True)
    mx = tl.where(amax > 0.0, mx, 0.0)
    w = x * x
    wx = w * x
    # all 19 candidate scales at once: (candidate, sub-block, element); the choice among them stays sequential
    cand = tl.arange(0, 32)[:, None]
    iscale = tl.math.div_rn(tl.load(factor_ptr + cand) + tl.zeros((32, 16), tl.float32), mx[None, :])
    lv = tl.minimum(tl.maximum(_nearest_int(iscale[:, :, None] * x[None, :, :]), -32), 31)
    sumlx, suml2 = _c_order_sums(wx, w, lv.to(tl.float32))
    slx = _pick(sumlx, cand, 0)
    sl2 = _pick(suml2, cand, 0)
    scale = tl.where(sl2 != 0.0, tl.math.div_rn(slx, tl.where(sl2 != 0.0, sl2, 1.0)), 0.0)
    scale = tl.where(sl2 != sl2, slx / sl2, scale)  # NaN compares unequal to 0 in C: NaN propagates
    best = scale * slx
    chosen = tl.zeros((16,), tl.int32)
    for k in tl.static_range(1, 19):
        slx = _pick(sumlx, cand, k)
        sl2 = _pick(suml2, cand, k)
        better = (sl2 > 0.0) & (slx * slx > best * sl2)
        chosen = tl.where(better, k, chosen)
        scale = tl.where(better, tl.math.div_rn(slx, tl.where(better, sl2, 1.0)), scale)
        best = tl.where(better, scale * slx, best)
    best_l = tl.sum(tl.where(cand[:, :, None] == chosen[None, :, None], lv, 0), axis=0) + 32
    all_zero = amax < GROUP_MAX_EPS
    scale = tl.where(all_zero, 0.0, scale)
    best_l = tl.where(all_zero[:, None], 0, best_l)

    # 2. sub-block scales against the super-block's first largest |scale|
    sidx = tl.arange(0, 16)
    a = tl.where(scale == scale, tl.abs(scale), 0.0)
    max_abs = tl.max(a, axis=0)
    hit = tl.min(tl.where((a == max_abs) & (a > 0.0), sidx, 16), axis=0)
    max_scale = tl.sum(tl.where(sidx == hit, scale.to(tl.int32, bitcast=True), 0), axis=0).to(tl.float32, bitcast=True)
    max_scale = tl.where(max_abs > 0.0, max_scale, 0.0)
    empty = max_abs < GROUP_MAX_EPS
    iscale2 = tl.math.div_rn(-128.0, max_scale)
    qs = tl.minimum(_nearest_int(iscale2 * scale), 127)
    sc = ((qs & 0xFF) ^ 0x80) - 0x80
    sc = tl.where(empty, 0, sc)
    d16 = tl.where(empty, 0.0, tl.math.div_rn(1.0, iscale2)).to(tl.float16)
    sub_d = d16.to(tl.float32) * sc.to(tl.float32)

    # 3. every weight on the final grid, then the cell draw
    kept = ((sub_d == 0.0).to(tl.int32) + empty.to(tl.int32)) > 0
    search = tl.where(empty, 0, best_l)
    u = tl.math.div_rn(x, sub_d[:, None])
    nearest = tl.where(kept[:, None], search, tl.minimum(tl.maximum(_nearest_int(u), -32), 31) + 32)
    degenerate = kept[:, None] | (~(tl.abs(u) <= NEAREST_INT_LIMIT))
    u = tl.where(degenerate, (nearest - 32).to(tl.float32), u)
    lower, upper, position = integer_cells(u, nearest - 32, -32, 31)
    e = tl.reshape(e3, (16, 16))
    code = choose_code(
        lower + 32, upper + 32, position, nearest, key, row + row_offset, first_col + e + col_offset, HARDEN
    )

    # bytes: ql (128) | qh (64) | scales (16) | d (2)
    c3 = tl.reshape(code, (2, 4, 32))
    base = sb.to(tl.int64) * 210
    pair = tl.reshape(c3, (2, 2, 2, 32))  # (half, quarter // 2, quarter % 2, lane)
    lo, hi = tl.split(tl.permute(pair, (0, 2, 3, 1)))  # quarters q and q + 2 (elements e and e + 64)
    hh = tl.arange(0, 2)[:, None, None]
    qq = tl.arange(0, 2)[None, :, None]
    ll = tl.arange(0, 32)[None, None, :]
    tl.store(out_ptr + base + hh * 64 + qq * 32 + ll, ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8))
    qh = tl.sum(((c3 >> 4) & 3) << (2 * q), axis=1)
    h2 = tl.arange(0, 2)[:, None]
    l2 = tl.arange(0, 32)[None, :]
    tl.store(out_ptr + base + 128 + h2 * 32 + l2, qh.to(tl.uint8))
    tl.store(out_ptr + base + 192 + sidx, sc.to(tl.int8).to(tl.uint8, bitcast=True))
    dbits = d16.to(tl.uint16, bitcast=True).to(tl.int32)
    tl.store(out_ptr + base + 208, (dbits & 0xFF).to(tl.uint8))
    tl.store(out_ptr + base + 209, (dbits >> 8).to(tl.uint8))


def quantize_gguf_kquant(
    fmt: Format, x: torch.Tensor, key: int | None, row_offset: int, col_offset: int
) -> QuantizedTensor:
    """Launch the Q6_K kernel for a validated tensor; (rows, row_bytes) uint8 as ggml_quantize_chunk writes."""
    if fmt.name not in KQUANT_KERNEL_FORMATS:
        raise ValueError(f"no Triton kernel for {fmt.name}")
    cols = x.shape[-1]
    rows = x.numel() // cols
    src = x.contiguous().reshape(-1)
    src = src.view(torch.int16) if x.dtype == torch.bfloat16 else src
    out = torch.empty(rows, (cols // 256) * fmt.type_size, dtype=torch.uint8, device=x.device)
    factors = _candidate_factors().to(x.device)
    q6_k_kernel[(x.numel() // 256,)](
        src, out, factors, 0 if key is None else key, cols, row_offset, col_offset,
        DTYPE=dtype_code(x.dtype), HARDEN=key is not None, **EXACT_LAUNCH,
    )  # fmt: skip
    return QuantizedTensor(fmt.name, x.shape, {"blocks": out})
