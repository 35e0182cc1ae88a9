"""GGUF k-quants with a scale and a min per sub-block (x = d * q - m): Q2_K, Q4_K and Q5_K.

Bit-exact with ggml's quantize_row_q2_K_ref / quantize_row_q4_K_ref / quantize_row_q5_K_ref (ggml-quants.c), which
ggml_quantize_chunk runs when no importance matrix is given. A 256-element super-block is cut into sub-blocks
(16 x 16 for Q2_K, 8 x 32 for Q4_K and Q5_K), and the quantizer works in three stages:

1. make_qkx2_quants fits a scale and a min to every sub-block: a weighted least-squares search over `nstep + 1`
   candidate inverse scales (rmin + rdelta * is + nmax) / (max - min), keeping the first candidate whose weighted
   error is strictly smaller. Weights are |x| (Q2_K, absolute-error objective) or sqrt(sum x^2 / 32) + |x| (Q4_K and
   Q5_K, squared error).
2. The sub-block scales and mins are quantized against the super-block's largest ones: 4-bit (Q2_K, levels 15,
   packed one byte per sub-block, scale in the low nibble) or 6-bit (Q4_K and Q5_K, levels 63, packed into 12 bytes
   as get_scale_min_k4 reads them). The super-block factors d and dmin are stored as IEEE half (round to nearest even).
3. Every weight is rounded on the final grid: q = clamp(nearest_int((x + dm) / d), 0, nmax), with d = fp16(d) * sc
   and dm = fp16(dmin) * m in float32 and a true division; nearest_int rounds half to even. A sub-block whose d is
   zero keeps the codes of stage 1 (the C code skips it): every code there dequantizes to -dm.

Everything is float32 with one rounding per operation (libggml-base is built without FMA contraction), sums are
accumulated sequentially in the C order, and extremes are selected by strict first-hit comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch

from .. import native
from ..numerics import div_rn, nearest_int, sqrt_rn
from .base import Encoding, QuantizedTensor
from .gguf_common import QK_K, fp16_field, pack_bit_fields, read_fp16_field, split_fields, unpack_bit_fields
from .kquant_common import KQuantFormat, KQuantSpec, seq_sum
from .registry import register_format

__all__ = [
    "GgufKQuantAffine",
    "KQuantAffineSpec",
    "make_qkx2_quants",
    "pack_q5_high_bits",
    "pack_scale_min_k4",
    "unpack_scale_min_k4",
]

_RDELTA = 0.1  # every caller of make_qkx2_quants steps by 0.1f


@dataclass(frozen=True)
class KQuantAffineSpec(KQuantSpec):
    """What distinguishes Q2_K, Q4_K and Q5_K in ggml's reference quantizers."""

    sub_block: int  # elements per sub-block: 16 or 32
    rmin: float  # first candidate offset of the scale search
    nstep: int  # the search tries nstep + 1 candidates
    use_mad: bool  # absolute error (Q2_K) instead of squared error
    rms_weights: bool  # weights sqrt(sum x^2 / n) + |x| (Q4_K, Q5_K) instead of |x|
    scale_levels: int  # 15: 4-bit sub-block scales and mins; 63: 6-bit

    @property
    def nmax(self) -> int:
        """make_qkx2_quants' nmax: the largest code."""
        return self.qmax

    @property
    def n_sub(self) -> int:
        return QK_K // self.sub_block


def _weighted_error(
    w: torch.Tensor, x: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor, the_min: torch.Tensor, use_mad: bool
) -> torch.Tensor:
    """sum_i w_i * err(scale * l_i + min - x_i) in C order, err = |.| or (.)^2, each product and sum rounded once."""
    diff = (scale * levels + the_min) - x
    diff = diff.abs() if use_mad else diff * diff
    return seq_sum(w * diff)


def make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants for many sub-blocks at once: x and w are (n, S), one sub-block per column.

    Returns (scale (S,), the_min (S,), L (n, S) int32) such that a sub-block is approximated by scale * L - the_min.
    Exactly as the C code: min and max by strict first-hit comparison, min clamped to <= 0, an early exit with scale 0
    and L = 0 when max == min, then for is = 0..nstep the candidate iscale = (rmin + rdelta*is + nmax) / (max - min)
    (where min is the best min found so far), levels l = clamp(nearest_int(iscale * (x - min)), 0, nmax) (round half
    to even), the weighted least-squares scale and min (min clamped to <= 0, then scale = sum_wlx / sum_wl2), and the
    candidate replaces the best only when D > 0 and its error is strictly smaller. All sums run sequentially in
    element order; nothing is fused.
    """
    n = x.shape[0]
    x0 = x[0]
    mn = x0.clone()
    mx = x0.clone()
    sum_w = w[0].clone()
    sum_x = sum_w * x0
    for i in range(1, n):
        xi = x[i]
        mn = torch.where(xi < mn, xi, mn)
        mx = torch.where(xi > mx, xi, mx)
        sum_w.add_(w[i])
        sum_x.add_(w[i] * xi)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    span = mx - mn
    iscale = div_rn(float(nmax), span)
    scale = div_rn(1.0, iscale)
    best_l = nearest_int(iscale * (x - mn)).clamp_(0, nmax)
    best_error = _weighted_error(w, x, best_l.float(), scale, mn, use_mad)
    cur_min = mn
    f32 = np.float32
    for step in range(nstep + 1):
        factor = float((f32(rmin) + f32(rdelta) * f32(step)) + f32(nmax))
        iscale = div_rn(factor, mx - cur_min)
        laux = nearest_int(iscale * (x - cur_min)).clamp_(0, nmax)
        lf = laux.float()
        terms = torch.empty((n, 3, *x.shape[1:]), dtype=torch.float32)  # (w*l, w*l*l, w*l*x), summed in one pass
        wl = torch.mul(w, lf, out=terms[:, 0])
        torch.mul(wl, lf, out=terms[:, 1])
        torch.mul(wl, x, out=terms[:, 2])
        sum_l, sum_l2, sum_xl = seq_sum(terms)
        big_d = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / big_d
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / big_d
        clamp_min = this_min > 0
        this_min = torch.where(clamp_min, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(clamp_min, sum_xl / sum_l2, this_scale)
        cur_error = _weighted_error(w, x, lf, this_scale, this_min, use_mad)
        better = (big_d > 0) & (cur_error < best_error)
        best_l = torch.where(better, laux, best_l)
        best_error = torch.where(better, cur_error, best_error)
        scale = torch.where(better, this_scale, scale)
        cur_min = torch.where(better, this_min, cur_min)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    the_min = torch.where(flat, -mn, -cur_min)
    best_l = torch.where(flat, torch.zeros_like(best_l), best_l)
    return scale, the_min, best_l


def pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """6-bit scales and mins (..., 8) in [0, 63] -> the 12-byte field of Q4_K and Q5_K (get_scale_min_k4's layout).

    Bytes 0-3: scale j (j < 4) with the top 2 bits of scale j+4 in bits 6-7; bytes 4-7: the same for the mins;
    bytes 8-11: low nibble of scale j+4 | low nibble of min j+4 << 4.
    """
    ls = ls.to(torch.int32)
    lm = lm.to(torch.int32)
    lo_s, hi_s = ls[..., :4], ls[..., 4:]
    lo_m, hi_m = lm[..., :4], lm[..., 4:]
    first = lo_s | ((hi_s >> 4) << 6)
    second = lo_m | ((hi_m >> 4) << 6)
    third = (hi_s & 0xF) | ((hi_m & 0xF) << 4)
    return torch.cat([first, second, third], dim=-1).to(torch.uint8)


def unpack_scale_min_k4(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12-byte field (..., 12) -> (scales, mins), each (..., 8) int32 in [0, 63], as get_scale_min_k4 reads it."""
    q = raw.to(torch.int32)
    sc_lo = q[..., 0:4] & 63
    m_lo = q[..., 4:8] & 63
    sc_hi = (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)
    m_hi = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return torch.cat([sc_lo, sc_hi], dim=-1), torch.cat([m_lo, m_hi], dim=-1)


def pack_q5_high_bits(codes: torch.Tensor) -> torch.Tensor:
    """Q5_K's qh plane: codes (..., 256) in [0, 31] -> (..., 32) bytes; bit k of byte j is bit 4 of code 32*k + j."""
    return pack_bit_fields(codes.to(torch.int32) >> 4, 1, 32)


def _running_max(v: torch.Tensor) -> torch.Tensor:
    """max over the last axis as C's `if (v > m) m = v` from m = 0: NaN never wins, the result is >= +0."""
    m = torch.zeros_like(v[..., 0])
    for j in range(v.shape[-1]):
        m = torch.where(v[..., j] > m, v[..., j], m)
    return m


class GgufKQuantAffine(KQuantFormat):
    """Q2_K / Q4_K / Q5_K: per 256 weights, half-precision d and dmin, quantized sub-block scales and mins, codes.

    Code space: q in [0, nmax] (3, 15 or 31), value d * q - dm with d = fp16(d) * sc and dm = fp16(dmin) * m per
    sub-block, ascending in q. Encoding scales (per row and super-block; per sub-block for the last four):
    d, dmin (float16), scale_bytes (the packed scale field), sub_scale, sub_min (the integer sc and m), and
    sub_d, sub_dm (float32 d and dm, exactly as the quantizer and ggml's dequantizer compute them).
    """

    spec: KQuantAffineSpec

    def __init__(self, name: str, spec: KQuantAffineSpec) -> None:
        super().__init__(
            name,
            spec,
            f"GGUF {name.upper()}: 256-weight super-blocks of {spec.n_sub} x {spec.sub_block}, "
            f"{spec.bits}-bit codes with {4 if spec.scale_levels == 15 else 6}-bit sub-block scales and mins",
        )

    # ---------------------------------------------------------------- encode

    def _sub_block_search(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 1 for sub-blocks (count, n): (scale, the_min, codes (count, n)), natively where built."""
        spec = self.spec
        if native.enabled(blocks):
            return native.qkx2_search(blocks, spec.nmax, spec.rmin, _RDELTA, spec.nstep, spec.use_mad, spec.rms_weights)
        xt = blocks.t().contiguous()  # the reference vectorizes across sub-blocks: element i of each is contiguous
        if spec.rms_weights:
            sum_x2 = seq_sum(xt * xt)
            av_x = sqrt_rn(sum_x2 / torch.full_like(sum_x2, float(spec.sub_block)))
            wt = av_x + xt.abs()
        else:
            wt = xt.abs()
        scales, mins, lt = make_qkx2_quants(xt, wt, spec.nmax, spec.rmin, _RDELTA, spec.nstep, spec.use_mad)
        return scales, mins, lt.t()

    def _encode_rows(self, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.spec
        rows, ne0 = x2.shape
        nb = ne0 // QK_K
        n = spec.sub_block
        xs = x2.reshape(rows, nb, spec.n_sub, n)
        scales, mins, codes = self._sub_block_search(x2.reshape(-1, n))
        scales = scales.view(rows, nb, spec.n_sub)
        mins = mins.view(rows, nb, spec.n_sub)
        search_codes = codes.reshape(rows, nb, spec.n_sub, n)

        max_scale = _running_max(scales)
        max_min = _running_max(mins)
        levels = float(spec.scale_levels)
        if spec.scale_levels == 63:
            inv_scale = torch.where(max_scale > 0, div_rn(levels, max_scale), torch.zeros_like(max_scale))
            inv_min = torch.where(max_min > 0, div_rn(levels, max_min), torch.zeros_like(max_min))
            # uint8_t ls = nearest_int(...): the int wraps modulo 256 before MIN(63, ls)
            ls = (nearest_int(inv_scale.unsqueeze(-1) * scales) & 0xFF).clamp_(max=63)
            lm = (nearest_int(inv_min.unsqueeze(-1) * mins) & 0xFF).clamp_(max=63)
            scale_bytes = pack_scale_min_k4(ls, lm)
            d = (max_scale / torch.full_like(max_scale, levels)).half()
            dmin = (max_min / torch.full_like(max_min, levels)).half()
        else:
            has_scale = max_scale > 0
            has_min = max_min > 0
            ls = nearest_int(div_rn(levels, max_scale).unsqueeze(-1) * scales) & 0xFF
            byte = torch.where(has_scale.unsqueeze(-1), ls, torch.zeros_like(ls))
            lm = nearest_int(div_rn(levels, max_min).unsqueeze(-1) * mins)
            byte = torch.where(has_min.unsqueeze(-1), byte | ((lm << 4) & 0xFF), byte)
            scale_bytes = byte.to(torch.uint8)
            zero = torch.zeros_like(max_scale)
            d = torch.where(has_scale, max_scale / torch.full_like(max_scale, levels), zero).half()
            dmin = torch.where(has_min, max_min / torch.full_like(max_min, levels), zero).half()
            ls, lm = byte & 0xF, byte >> 4
        sub_d = d.float().unsqueeze(-1) * ls.float()
        sub_dm = dmin.float().unsqueeze(-1) * lm.float()

        u = (xs + sub_dm.unsqueeze(-1)) / sub_d.unsqueeze(-1)
        return self._round_on_final_grid(u, sub_d, search_codes) | {
            "d": d,
            "dmin": dmin,
            "scale_bytes": scale_bytes,
            "sub_scale": ls.to(torch.uint8),
            "sub_min": lm.to(torch.uint8),
            "sub_d": sub_d,
            "sub_dm": sub_dm,
        }

    # ---------------------------------------------------------------- pack / dequantize

    def _fields(self, enc: Encoding, codes: torch.Tensor) -> list[torch.Tensor]:
        """The byte fields of Q2_K, Q4_K and Q5_K, in file order (see pack_bit_fields for the runs).

        Q2_K: the 16 scale | min << 4 bytes, qs (64: in each half of 128, byte l holds codes l, l + 32, l + 64,
        l + 96 in bits 0-1, 2-3, 4-5, 6-7), d, dmin. Q4_K and Q5_K: d, dmin, the 12-byte scales and mins, Q5_K's qh
        (bit 4 of every code), qs (128: in each 64, byte l holds the low nibbles of codes l and l + 32).
        """
        d = fp16_field(enc.scales["d"].unsqueeze(-1))
        dmin = fp16_field(enc.scales["dmin"].unsqueeze(-1))
        scale_bytes = enc.scales["scale_bytes"]
        if self.bits == 2:
            return [scale_bytes, pack_bit_fields(codes, 2, 32), d, dmin]
        high = [pack_q5_high_bits(codes)] if self.bits == 5 else []
        return [d, dmin, scale_bytes, *high, pack_bit_fields(codes, 4, 32)]

    def _read(self, q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes (rows, nb, 256) int32, sub_d and sub_dm (rows, nb, n_sub) float32) of a packed tensor."""
        blocks = self.blocks_of(q)
        if self.bits == 2:
            scale_bytes, qs, d, dmin = split_fields(blocks, [16, 64, 2, 2])
            sb = scale_bytes.to(torch.int32)
            sc, m = sb & 0xF, sb >> 4
            codes = unpack_bit_fields(qs, 2, 32)
        else:
            sizes = [2, 2, 12, 128] if self.bits == 4 else [2, 2, 12, 32, 128]
            d, dmin, scale_bytes, *planes = split_fields(blocks, sizes)
            sc, m = unpack_scale_min_k4(scale_bytes)
            codes = unpack_bit_fields(planes[-1], 4, 32)
            if self.bits == 5:
                codes = codes + 16 * unpack_bit_fields(planes[0], 1, 32)
        sub_d = read_fp16_field(d) * sc.float()
        sub_dm = read_fp16_field(dmin) * m.float()
        return codes, sub_d, sub_dm

    def _values(
        self, codes: torch.Tensor, sub_d: torch.Tensor, sub_dm: torch.Tensor, shape: torch.Size
    ) -> torch.Tensor:
        """dequantize_row_*: y = dl * q - ml, the product and the difference each rounded once."""
        rows, nb, n_sub = sub_d.shape
        c = codes.reshape(rows, nb, n_sub, self.spec.sub_block).float()
        return (sub_d.unsqueeze(-1) * c - sub_dm.unsqueeze(-1)).reshape(shape)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        codes, sub_d, sub_dm = self._read(q)
        return self._values(codes, sub_d, sub_dm, q.shape)

    def code_values(self, enc: Encoding, codes: torch.Tensor) -> torch.Tensor:
        return self._values(codes.to(torch.int32), enc.scales["sub_d"], enc.scales["sub_dm"], enc.shape)


class _SubBlockFit(TypedDict):
    """How the sub-blocks of a type are cut, fitted by make_qkx2_quants and their scales and mins stored."""

    sub_block: int
    use_mad: bool
    rms_weights: bool
    scale_levels: int


# Q2_K: 16 x 16, absolute error with weights |x|, 4-bit scales and mins. Q4_K and Q5_K: 8 x 32, squared error with
# weights rms + |x|, 6-bit scales and mins.
_Q2_K_FIT = _SubBlockFit(sub_block=16, use_mad=True, rms_weights=False, scale_levels=15)
_Q4_K_FIT = _SubBlockFit(sub_block=32, use_mad=False, rms_weights=True, scale_levels=63)
_SPECS = {
    "q2_k": KQuantAffineSpec(ggml_type=10, bits=2, type_size=84, rmin=-0.5, nstep=15, **_Q2_K_FIT),
    "q4_k": KQuantAffineSpec(ggml_type=12, bits=4, type_size=144, rmin=-1.0, nstep=20, **_Q4_K_FIT),
    "q5_k": KQuantAffineSpec(ggml_type=13, bits=5, type_size=176, rmin=-0.5, nstep=15, **_Q4_K_FIT),
}
Q2_K, Q4_K, Q5_K = (register_format(GgufKQuantAffine(name, spec)) for name, spec in _SPECS.items())
