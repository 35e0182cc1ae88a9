"""GGUF k-quants with a scale only per sub-block (x = d * q): Q3_K and Q6_K.

Bit-exact with ggml's quantize_row_q3_K_ref / quantize_row_q6_K_ref (ggml-quants.c), which ggml_quantize_chunk runs
when no importance matrix is given. A 256-element super-block is cut into 16 sub-blocks of 16, and the quantizer works
in three stages:

1. Every sub-block gets a signed scale and provisional codes from a search around the first element of largest
   magnitude `max` (strict first hit: `if (fabsf(x) > amax)` from amax = 0, so -0.0 never wins and an all-zero
   sub-block keeps max = +0). Sub-blocks with amax < 1e-15 get scale 0 and codes 0.
   - Q6_K, make_qx_quants(16, 32, rmse_type 1): weights x^2, first iscale = -32 / max, then 18 more candidates
     iscale = -(32 + 0.1 * is) / max (is = -9..9, is != 0), each kept only when suml2 > 0 and
     sumlx^2 > best * suml2 (strict); scale = sumlx / suml2.
   - Q3_K, make_q3_quants(16, 4, do_rmse): iscale = -4 / max, then up to 5 sweeps of coordinate descent over the 16
     elements in order, each element moved to nearest_int(x * sl2 / slx) when that strictly improves
     sumlx^2 / suml2 (compared as slx^2 * suml2 > sumlx^2 * sl2); scale = sumlx / suml2.
2. The sub-block scales are quantized against the super-block's first largest |scale| (max_scale), the super-block
   factor d is stored as IEEE half (round to nearest even):
   - Q6_K: a super-block with |max_scale| < 1e-15 is written as all zero bytes; else iscale = -128 / max_scale,
     d = fp16(1 / iscale), sc = (int8_t)MIN(127, nearest_int(iscale * scale)).
   - Q3_K: if max_scale != 0, iscale = -32 / max_scale, d = fp16(1 / iscale), sc = MAX(-32, MIN(31,
     (int8_t)nearest_int(iscale * scale))) stored + 32 in 6 bits; else d = +0 and every stored scale is 0 (sc = -32).
3. Every weight is rounded on the final grid with a true division: q = clamp(nearest_int(x / (fp16(d) * sc)),
   -h, h - 1) (h = 4 or 32), stored as q + h. nearest_int adds 1.5 * 2**23 and reads the mantissa bits: round half to
   even, and the bit trick is reproduced as is for huge or non-finite quotients. A sub-block whose fp16(d) * sc is
   zero keeps the codes of stage 1 (C: `if (!d) continue;`); a NaN product is not skipped and gives code h.

Everything is float32 with one rounding per operation (libggml-base is built without FMA contraction), products
evaluate left to right as in C (`w*x[i]*l` is (w * x) * l), sums accumulate sequentially in element order from +0.0,
and maxima are selected by strict first-hit comparisons. NaN and inf scales that overflow produces (largest-finite
inputs: x * x = inf) follow the same IEEE rules as C, so their bytes match too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import native
from ..numerics import div_rn, nearest_int, sqrt_rn
from .base import Encoding, QuantizedTensor
from .gguf_common import QK_K, fp16_field, pack_bit_fields, read_fp16_field, split_fields, unpack_bit_fields
from .kquant_common import KQuantFormat, KQuantSpec, seq_sum
from .registry import register_format

__all__ = [
    "GgufKQuantSymmetric",
    "KQuantSymmetricSpec",
    "make_q3_quants",
    "make_qx_quants",
    "pack_q3_k_scales",
    "unpack_q3_k_scales",
]

SUB_BLOCK = 16  # both types: 16 sub-blocks of 16 weights
N_SUB = QK_K // SUB_BLOCK
GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml's GROUP_MAX_EPS (1e-15f), exactly as a float32
_Q3_SWEEPS = 5  # make_q3_quants tries at most 5 coordinate-descent sweeps


@dataclass(frozen=True)
class KQuantSymmetricSpec(KQuantSpec):
    """What distinguishes Q3_K and Q6_K in ggml's reference quantizers.

    bits is 3 or 6: codes L in [0, 2**bits - 1] stand for the value d * sc * (L - 2**(bits-1)).
    """

    scale_levels: int  # the largest sub-block scale maps to -scale_levels: 32 (6-bit scales) or 128 (int8 scales)

    @property
    def offset(self) -> int:
        """h: the code that stands for zero (4 or 32); make_q*_quants' nmax."""
        return 1 << (self.bits - 1)

    @property
    def sub_block(self) -> int:
        """Elements per sub-block: 16 for both types."""
        return SUB_BLOCK


def _first_abs_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max) over the first axis as C's `if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` from 0, 0.

    The first element of largest magnitude wins, with its sign; zeros (either sign) and NaN never win, so a block
    without a nonzero finite-or-infinite value keeps max = +0.0.
    """
    amax = torch.zeros_like(x[0])
    mx = torch.zeros_like(x[0])
    for i in range(x.shape[0]):
        ax = x[i].abs()
        hit = ax > amax
        amax = torch.where(hit, ax, amax)
        mx = torch.where(hit, x[i], mx)
    return amax, mx


def _c_int8(v: torch.Tensor) -> torch.Tensor:
    """C's int -> int8_t conversion (gcc: modulo 256, two's complement), as int32."""
    return ((v & 0xFF) ^ 0x80) - 0x80


def _rmse_weights(x: torch.Tensor, rmse_type: int) -> torch.Tensor:
    """make_qx_quants' weights without an importance matrix: x*x (1), 1 (2), |x| (3), sqrtf(|x|) (otherwise)."""
    if rmse_type == 1:
        return x * x
    if rmse_type == 2:
        return torch.ones_like(x)
    if rmse_type == 3:
        return x.abs()
    return sqrt_rn(x.abs())


def make_qx_quants(
    x: torch.Tensor, nmax: int, rmse_type: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants for many sub-blocks at once: x is (n, S), one sub-block per column.

    Returns (scale (S,), L (n, S) int32 in [0, 2*nmax - 1]); the sub-block is approximated by scale * (L - nmax).
    Exactly as the C code: max is the first element of largest |x| (strict `>`), amax < 1e-15 returns scale 0 and
    L = 0; iscale = -nmax / max; l = clamp(nearest_int(iscale * x), -nmax, nmax - 1) (round half to even).
    rmse_type 0 returns 1 / iscale with those codes. Otherwise, with weights w (the importance `weights` if given,
    else x^2, 1, |x| or sqrtf(|x|) for |rmse_type| = 1, 2, 3, other), sumlx = sum (w * x) * l and
    suml2 = sum (w * l) * l in element order and scale = suml2 ? sumlx / suml2 : 0 (NaN counts as true); a negative
    rmse_type returns suml2 > 0 ? 0.5 * (scale + 1 / iscale) : 1 / iscale. Then for is = -9..9 (is != 0) the candidate
    iscale = -(nmax + 0.1f * is) / max replaces the best when suml2 > 0 and sumlx * sumlx > best * suml2, with
    best = scale * sumlx. Every product and sum is rounded once, nothing is fused.
    Only rmse_type 1 without `weights` (Q6_K's call) is proven byte-exact against ggml by the tests.
    """
    amax, mx = _first_abs_max(x)
    all_zero = amax < GROUP_MAX_EPS
    f32 = np.float32

    def levels(iscale: torch.Tensor) -> torch.Tensor:
        return nearest_int(iscale * x).clamp_(-nmax, nmax - 1)

    iscale = div_rn(-float(nmax), mx)
    l0 = levels(iscale)
    best_l = l0 + nmax
    if rmse_type == 0:
        scale = div_rn(1.0, iscale)
    else:
        w = weights if weights is not None else _rmse_weights(x, abs(rmse_type))
        wx = w * x
        terms = torch.empty((x.shape[0], 2, *x.shape[1:]), dtype=torch.float32)  # (w*x*l, w*l*l), summed in one pass

        def sums(lv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            lf = lv.float()
            torch.mul(wx, lf, out=terms[:, 0])
            torch.mul(torch.mul(w, lf, out=terms[:, 1]), lf, out=terms[:, 1])
            sumlx, suml2 = seq_sum(terms)
            return sumlx, suml2

        sumlx, suml2 = sums(l0)
        scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
        if rmse_type < 0:
            inv = div_rn(1.0, iscale)
            scale = torch.where(suml2 > 0, 0.5 * (scale + inv), inv)
        else:
            best = scale * sumlx
            for step in range(-9, 10):
                if step == 0:
                    continue
                factor = float(-(f32(nmax) + f32(0.1) * f32(step)))
                lv = levels(div_rn(factor, mx))
                sumlx, suml2 = sums(lv)
                better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
                best_l = torch.where(better, lv + nmax, best_l)
                scale = torch.where(better, sumlx / suml2, scale)
                best = torch.where(better, scale * sumlx, best)
    scale = torch.where(all_zero, torch.zeros_like(scale), scale)
    best_l = torch.where(all_zero, torch.zeros_like(best_l), best_l)
    return scale, best_l


def make_q3_quants(x: torch.Tensor, nmax: int, do_rmse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants for many sub-blocks at once: x is (n, S), one sub-block per column.

    Returns (scale (S,), L (n, S) int32 in [0, 2*nmax - 1]). max is the first element of largest |x| (strict `>`);
    amax < 1e-15 returns scale 0 and L = 0. iscale = -nmax / max and l = clamp(nearest_int(iscale * x), -nmax,
    nmax - 1). Without do_rmse the scale is 1 / iscale. With it, w = x * x, sumlx = sum (w * x) * l and
    suml2 = sum (w * l) * l in order, then sweeps over the elements in order: with slx = sumlx - (w * x) * l_i > 0 and
    sl2 = suml2 - (w * l_i) * l_i, the candidate new_l = clamp(nearest_int((x * sl2) / slx)) is taken when it differs,
    sl2 + (w * new_l) * new_l > 0 and (slx' * slx') * suml2 > (sumlx * sumlx) * sl2' (strict). C stops after a sweep
    that changed nothing; a further sweep from the same state changes nothing either, so all 5 are run. The scale is
    suml2 > 0 ? sumlx / suml2 : 0.
    """
    amax, mx = _first_abs_max(x)
    all_zero = amax < GROUP_MAX_EPS
    iscale = div_rn(-float(nmax), mx)
    lv = nearest_int(iscale * x).clamp_(-nmax, nmax - 1)
    if not do_rmse:
        scale = div_rn(1.0, iscale)
    else:
        w = x * x
        wx = w * x
        lf = lv.float()
        sumlx = seq_sum(wx * lf)
        suml2 = seq_sum((w * lf) * lf)
        for _ in range(_Q3_SWEEPS):
            for i in range(x.shape[0]):
                li = lf[i]
                slx = sumlx - wx[i] * li
                sl2 = suml2 - (w[i] * li) * li
                new_l = nearest_int((x[i] * sl2) / slx).clamp_(-nmax, nmax - 1).float()
                slx_new = slx + wx[i] * new_l
                sl2_new = sl2 + (w[i] * new_l) * new_l
                take = (slx > 0) & (new_l != li) & (sl2_new > 0)
                take &= (slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new
                lf[i] = torch.where(take, new_l, li)
                sumlx = torch.where(take, slx_new, sumlx)
                suml2 = torch.where(take, sl2_new, suml2)
        lv = lf.to(torch.int32)
        scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    scale = torch.where(all_zero, torch.zeros_like(scale), scale)
    codes = torch.where(all_zero, torch.zeros_like(lv), lv + nmax)
    return scale, codes


def pack_q3_k_scales(stored: torch.Tensor) -> torch.Tensor:
    """Q3_K's 6-bit stored scales (..., 16) in [0, 63] (sc + 32) -> the 12-byte field.

    Byte j (j < 8): low nibble of scale j | low nibble of scale j + 8 << 4; byte 8 + k: bits 4-5 of scale 4q + k at
    bits 2q, 2q + 1 (q = 0..3), as quantize_row_q3_K_ref writes them and dequantize_row_q3_K's aux shuffle reads them.
    """
    s = stored.to(torch.int32)
    return torch.cat([pack_bit_fields(s, 4, 8), pack_bit_fields(s >> 4, 2, 4)], dim=-1)


def unpack_q3_k_scales(raw: torch.Tensor) -> torch.Tensor:
    """The 12-byte field (..., 12) -> stored scales (..., 16) int32 in [0, 63] (subtract 32 for sc)."""
    return unpack_bit_fields(raw[..., :8], 4, 8) | (unpack_bit_fields(raw[..., 8:12], 2, 4) << 4)


class GgufKQuantSymmetric(KQuantFormat):
    """Q3_K / Q6_K: per 256 weights, a half-precision d, 16 quantized signed sub-block scales sc, and codes.

    Code space: L in [0, 2h - 1] (h = 4 for Q3_K, 32 for Q6_K), the value stored in the file; it dequantizes to
    sub_d * (L - h) with sub_d = fp16(d) * sc in float32 (ggml's dequantize_row_*: one rounding for each product).
    Values ascend in L where sub_d > 0 and descend where sub_d < 0 (sc and d take both signs: the largest sub-block
    scale is always quantized to sc = -32 or -128), so cells are adjacent grid points either way. The cell of a
    weight is read on the grid coordinate x / sub_d (the exact quotient C rounds): position 0.5 is a tie, which
    nearest_int sends to the even l = L - h. Cells collapse onto the written code where C did not round on the final
    grid (sub_d == 0 keeps the search's codes; Q6_K's all-zero super-blocks; NaN or huge quotients).
    Encoding scales (per row and super-block; per sub-block for the last three): d (float16), scale_bytes (Q3_K: the
    12-byte field; Q6_K: the 16 int8 scales as bytes), sub_scale (int8 sc) and sub_d (float32 fp16(d) * sc).
    """

    spec: KQuantSymmetricSpec
    fused_natively = True

    def __init__(self, name: str, spec: KQuantSymmetricSpec) -> None:
        scale_kind = "6-bit" if spec.scale_levels == 32 else "8-bit"
        super().__init__(
            name,
            spec,
            f"GGUF {name.upper()}: 256-weight super-blocks of 16 x 16, {spec.bits}-bit codes with {scale_kind} "
            "signed sub-block scales",
        )

    def _native_blocks(
        self, rows: torch.Tensor, key: int | None, row_offset: int, col_offset: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        return native.kquant_sym_quantize(rows, self.bits, key, row_offset, col_offset)

    # ---------------------------------------------------------------- encode

    def _sub_block_search(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1 for sub-blocks (count, 16): (scale, codes (count, 16)), natively where built."""
        h = self.spec.offset
        if native.enabled(blocks):
            return native.q3_search(blocks, h) if self.spec.bits == 3 else native.qx_search(blocks, h)
        xt = blocks.t().contiguous()  # the reference vectorizes across sub-blocks: element i of each is contiguous
        scale, lt = make_q3_quants(xt, h, do_rmse=True) if self.spec.bits == 3 else make_qx_quants(xt, h, rmse_type=1)
        return scale, lt.t()

    def _encode_rows(self, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.spec
        rows, ne0 = x2.shape
        nb = ne0 // QK_K
        xs = x2.reshape(rows, nb, N_SUB, SUB_BLOCK)
        scales, codes = self._sub_block_search(x2.reshape(-1, SUB_BLOCK))
        scales = scales.view(rows, nb, N_SUB)
        search_codes = codes.reshape(rows, nb, N_SUB, SUB_BLOCK)

        max_abs, max_scale = _first_abs_max(scales.movedim(-1, 0))
        levels = float(spec.scale_levels)
        iscale = div_rn(-levels, max_scale)
        q = nearest_int(iscale.unsqueeze(-1) * scales)
        zero = torch.zeros_like(max_scale)
        if spec.bits == 6:
            empty = max_abs < GROUP_MAX_EPS  # the whole super-block is written as zero bytes
            sc = _c_int8(q.clamp_(max=127))
            sc = torch.where(empty.unsqueeze(-1), torch.zeros_like(sc), sc)
            d = torch.where(empty, zero, div_rn(1.0, iscale)).half()
            scale_bytes = sc.to(torch.int8).view(torch.uint8)
        else:
            empty = None
            has_scale = (max_scale != 0).unsqueeze(-1)
            stored = _c_int8(q).clamp_(-32, 31) + 32
            stored = torch.where(has_scale, stored, torch.zeros_like(stored))  # memset: stored 0, sc = -32
            sc = stored - 32
            d = torch.where(max_scale != 0, div_rn(1.0, iscale), zero).half()
            scale_bytes = pack_q3_k_scales(stored)
        sub_d = d.float().unsqueeze(-1) * sc.float()

        u = xs / sub_d.unsqueeze(-1)
        zeroed = None if empty is None else empty.view(rows, nb, 1, 1)
        return self._round_on_final_grid(u, sub_d, search_codes, zeroed) | {
            "d": d,
            "scale_bytes": scale_bytes,
            "sub_scale": sc.to(torch.int8),
            "sub_d": sub_d,
        }

    # ---------------------------------------------------------------- pack / dequantize

    def _fields(self, enc: Encoding, codes: torch.Tensor) -> list[torch.Tensor]:
        """The byte fields of Q3_K and Q6_K, in file order (see pack_bit_fields for the runs).

        Q3_K: hmask (32 bytes: bit k of byte m is bit 2 of code 32k + m), qs (64: in each half of 128, byte l holds
        bits 0-1 of codes l, l + 32, l + 64, l + 96), the 12-byte scales, d. Q6_K: ql (128: in each half of 128, byte
        l < 64 holds the low nibbles of codes l and l + 64), qh (64: bits 4-5, as Q3_K's qs), the 16 int8 scales, d.
        """
        d = fp16_field(enc.scales["d"].unsqueeze(-1))
        if self.bits == 3:
            planes = [pack_bit_fields(codes >> 2, 1, 32), pack_bit_fields(codes, 2, 32)]
        else:
            planes = [pack_bit_fields(codes, 4, 64), pack_bit_fields(codes >> 4, 2, 32)]
        return [*planes, enc.scales["scale_bytes"], d]

    def _read(self, q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (rows, nb, 256) int32, sub_d (rows, nb, 16) float32) of a packed tensor."""
        blocks = self.blocks_of(q)
        if self.bits == 3:
            hmask, qs, scale_bytes, d = split_fields(blocks, [32, 64, 12, 2])
            codes = unpack_bit_fields(qs, 2, 32) | (unpack_bit_fields(hmask, 1, 32) << 2)
            sc = unpack_q3_k_scales(scale_bytes) - 32
        else:
            ql, qh, scale_bytes, d = split_fields(blocks, [128, 64, 16, 2])
            codes = unpack_bit_fields(ql, 4, 64) | (unpack_bit_fields(qh, 2, 32) << 4)
            sc = scale_bytes.contiguous().view(torch.int8).to(torch.int32)
        return codes, read_fp16_field(d) * sc.float()

    def _values(self, codes: torch.Tensor, sub_d: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """dequantize_row_*: y = (fp16(d) * sc) * (L - h), each product rounded once."""
        rows, nb, _ = sub_d.shape
        c = (codes.reshape(rows, nb, N_SUB, SUB_BLOCK) - self.spec.offset).float()
        return (sub_d.unsqueeze(-1) * c).reshape(shape)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        codes, sub_d = self._read(q)
        return self._values(codes, sub_d, q.shape)

    def code_values(self, enc: Encoding, codes: torch.Tensor) -> torch.Tensor:
        return self._values(codes.to(torch.int32), enc.scales["sub_d"], enc.shape)


Q3_K = register_format(
    GgufKQuantSymmetric("q3_k", KQuantSymmetricSpec(ggml_type=11, bits=3, type_size=110, scale_levels=32))
)
Q6_K = register_format(
    GgufKQuantSymmetric("q6_k", KQuantSymmetricSpec(ggml_type=14, bits=6, type_size=210, scale_levels=128))
)
