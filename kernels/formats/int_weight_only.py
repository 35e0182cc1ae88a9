"""Integer weight-only formats served by vLLM 0.33: its online int8 MoE rule and torchao 0.18's int8 and int4 configs.

These quantizers compute in the weight's own dtype (bf16, fp16 or fp32), so unlike the other references they do not
convert to float32 first: every intermediate is rounded to that dtype exactly as torch does (float op, then round to
nearest even), and a bf16 weight quantizes differently from its float32 copy.

- ``int8_per_channel`` (``--quantization int8_per_channel_weight_only``: MoE experts only in 0.33, online/int8.py
  ``Int8OnlineMoEMethod._quantize_weights``): per row ``scale = amax / 127`` and
  ``q = clamp(round(x / scale), -127, 127)``, both in the weight dtype: for bf16 weights the quotient is rounded to
  bf16 before the half-to-even rounding, which moves the decision boundaries away from the midpoints (for |q| >= 64 the
  bf16 spacing is 0.5, so quotients in (k + 1/4, k + 3/4) round to the even neighbour). Float32 weights follow CUDA,
  where ``amax / 127`` (a Python divisor) is ``amax * float32(1/127)``; for bf16/fp16 that and a true division round
  to the same value (checked over every finite value). A zero scale (all-zero rows, or bf16 underflow) gives
  ``0/0 = NaN -> 0`` and ``x/0 = inf -> +-127``. Stored: ``weight`` int8, ``scale`` float32 (vLLM's ``w13_scale``).
- ``torchao_int8`` (Int8WeightOnlyConfig(), version 2, PerRow, Int8Tensor.from_hp): choose_qparams_affine SYMMETRIC
  in the weight dtype, ``scale = max(-min(min, 0), max(max, 0)) / 127.5`` clamped below by float32 eps (2**-23), then
  converted to float32; quantize_affine ``q = clamp(round(x * (1.0 / scale)) + 0, -128, 127)`` with the product in
  float32. Stored like torchao's Int8Tensor: ``qdata`` int8, ``scale`` float32 [..., 1], ``zero_point`` int8 zeros.
- ``torchao_int4``: Int4WeightOnlyConfig cannot quantize on a CPU in torchao 0.18 (its default PLAIN packing needs the
  CUDA-only ``mslk`` package, ``tile_packed_to_4d`` needs CUDA, ``plain_int32`` XPU/NPU). What torchao 0.18 does run
  on a CPU is ``prototype.quantization.int4.PrototypeInt4WeightOnlyConfig`` (Int4OpaqueTensor): the TINYGEMM
  algorithm, which is also Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d") on CUDA (that one uses
  ``eps = finfo(dtype).smallest_normal`` instead of 1e-6). All in the weight dtype, per group of ``group_size`` along
  rows: ``scale = clamp((max - min) / 15, eps)``, ``zero = min + 8 * scale`` (float zero-point domain),
  ``q = clamp(round((x - (zero - 8 * scale)) / scale), 0, 15)``; dequantized ``(q - 8) * scale + zero`` in float32.
  Packed layout reproduced: ``qdata`` uint8 [N, K/2] with element 2j in the HIGH nibble and 2j+1 in the low one (the
  plain array torchao hands to ``aten._convert_weight_to_int4pack``; ``aten._convert_weight_to_int4pack_for_cpu`` of
  the unpacked codes gives Int4OpaqueTensor.qdata) and ``scale_and_zero`` [K/group, N, 2] in the weight dtype, exactly
  torchao's ``pack_tinygemm_scales_and_zeros``. The default PLAIN (mslk ``int4_row_quantize_zp``: float32 math,
  1e-6 floor on the range, int8 q-8 packed low nibble first, [K/group, N] scales) is a different rule, not this one.

Codes are the stored integers (int4: 0..15, value ascending). Where a quantizer's dtype rounding leaves its choice
outside the two codes that bracket the weight on the dequantized grid (degenerate int4 groups whose offset dwarfs
their range), or the scale is degenerate, the cell collapses onto the written code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedInputError
from .base import CodeValueRule, Encoding, Format, QuantizedTensor, RoundingCells
from .cells import integer_grid_cells
from .registry import register_format

__all__ = ["INT4_GROUP_SIZES", "AbsmaxRowInt8", "Int8RowRule", "TinygemmGroupInt4"]

INT4_GROUP_SIZES = (32, 64, 128, 256)
_F32_EPS = torch.finfo(torch.float32).eps  # torchao Int8Tensor: eps of float32 for every dtype
_INT4_MID = 8.0


@dataclass(frozen=True)
class Int8RowRule:
    """How one symmetric per-row int8 quantizer picks its scale and rounds.

    ``divisor``: amax / divisor is the scale. ``qmin``: lowest code (the highest is 127). ``eps``: lower clamp of the
    scale in the weight dtype (None: no clamp). ``quotient``: "divide" rounds x / scale in the weight dtype;
    "reciprocal" multiplies by float32 1 / scale in float32. ``fp32_scalar_division``: how a float32 amax is divided
    by the Python divisor, "reciprocal" on CUDA (times float32(1/divisor)), "true" on a CPU.
    """

    divisor: float
    qmin: int
    eps: float | None
    quotient: str
    fp32_scalar_division: str


def _divide_by_scalar(t: torch.Tensor, divisor: float, mode: str) -> torch.Tensor:
    if t.dtype == torch.float32 and mode == "reciprocal":
        return t * torch.tensor(1.0 / divisor, dtype=torch.float32)
    return t / divisor  # bf16/fp16: a float op rounded once to the dtype; same result either way


def _collapse_outside(cells: RoundingCells) -> RoundingCells:
    """Cells whose written code is not one of the two bracketing codes collapse onto that code."""
    outside = (cells.nearest != cells.lower) & (cells.nearest != cells.upper)
    if not bool(outside.any()):
        return cells
    return RoundingCells(
        lower=torch.where(outside, cells.nearest, cells.lower),
        upper=torch.where(outside, cells.nearest, cells.upper),
        position=torch.where(outside, torch.zeros_like(cells.position), cells.position),
        nearest=cells.nearest,
    )


class _TypedFormat(Format):
    """Formats whose arithmetic runs in the input's dtype: encode keeps that dtype instead of converting to float32."""

    def encode(self, x: torch.Tensor, name: str = "tensor") -> Encoding:
        """Validate x and compute scales and cells in x's own dtype (bf16 and fp16 intermediates round like torch)."""
        self.validate(x, name)
        return self._encode(x.contiguous())


class AbsmaxRowInt8(_TypedFormat):
    """Symmetric per-row int8 (one scale per row of the last dimension); ``rule`` holds the quantizer's choices."""

    family = "absmax-int"
    bits = 8

    def __init__(self, name: str, rule: Int8RowRule, description: str) -> None:
        if rule.quotient not in ("divide", "reciprocal") or rule.fp32_scalar_division not in ("true", "reciprocal"):
            raise ValueError(f"unknown int8 rule {rule}")
        self.name = name
        self.rule = rule
        self.description = description

    def check_shape(self, x: torch.Tensor, name: str) -> None:
        if x.dim() < 2:
            raise UnsupportedInputError(
                f"tensor {name!r}: {self.name} quantizes weights of 2 or more dimensions row by row, got shape "
                f"{tuple(x.shape)}"
            )

    def _encode(self, x: torch.Tensor) -> Encoding:
        rule = self.rule
        if rule.quotient == "divide":  # vLLM: w.abs().amax(dim=1) / 127, w.div(scale).round().clamp(...)
            scale = _divide_by_scalar(x.abs().amax(dim=-1, keepdim=True), rule.divisor, rule.fp32_scalar_division)
            codes = (x / scale).round().clamp(rule.qmin, 127).to(torch.int8).to(torch.int32)
            scale32 = scale.float()
            stored = scale32.squeeze(-1)
        else:  # torchao: choose_qparams_affine SYMMETRIC, then quantize_affine
            lo = x.amin(dim=-1, keepdim=True)
            hi = x.amax(dim=-1, keepdim=True)
            bound = torch.max(-torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi)))
            scale = _divide_by_scalar(bound, rule.divisor, rule.fp32_scalar_division)
            if rule.eps is not None:
                scale = torch.clamp(scale, min=rule.eps)
            scale32 = scale.float()
            codes = torch.clamp(torch.round(x * (1.0 / scale32)), rule.qmin, 127).to(torch.int8).to(torch.int32)
            stored = scale32
        u = x.float() / scale32
        cells = _collapse_outside(integer_grid_cells(u, codes, rule.qmin, 127))
        return Encoding(self.name, x.shape, cells, {"scale": stored})

    def _row_scale(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.unsqueeze(-1) if self.rule.quotient == "divide" else scale

    def _pack(self, enc: Encoding, codes: torch.Tensor) -> QuantizedTensor:
        if codes.numel() and (int(codes.min()) < self.rule.qmin or int(codes.max()) > 127):
            raise UnsupportedInputError(f"{self.name} codes must lie in [{self.rule.qmin}, 127]")
        q = codes.to(torch.int8)
        scale = enc.scales["scale"]
        if self.rule.quotient == "divide":
            return QuantizedTensor(self.name, enc.shape, {"weight": q, "scale": scale})
        zero = torch.zeros_like(scale, dtype=torch.int8)
        return QuantizedTensor(self.name, enc.shape, {"qdata": q, "scale": scale, "zero_point": zero})

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if q.format != self.name:
            raise UnsupportedInputError(f"a {q.format} tensor cannot be read as {self.name}")
        codes = q.tensors["weight" if self.rule.quotient == "divide" else "qdata"]
        return codes.float() * self._row_scale(q.tensors["scale"])

    def code_values(self, enc: Encoding, codes: torch.Tensor) -> torch.Tensor:
        return codes.float() * self._row_scale(enc.scales["scale"])

    def code_value_rule(self, enc: Encoding) -> CodeValueRule:
        """code_values as a rule: code * the row's scale."""
        table = torch.arange(self.rule.qmin, 128, dtype=torch.float32)
        return CodeValueRule(table, self.rule.qmin, enc.scales["scale"].reshape(-1), enc.shape[-1])


class TinygemmGroupInt4(_TypedFormat):
    """torchao's tinygemm int4: asymmetric per group of ``group_size`` along rows, float zero point, codes 0..15."""

    family = "absmax-int"
    bits = 4

    def __init__(self, name: str, group_size: int = 128, eps: float | None = 1e-6) -> None:
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        self.name = name
        self.group_size = group_size
        self.eps = eps
        self.description = f"torchao int4 weight-only (tinygemm rule), groups of {group_size}, float zero point"

    def check_shape(self, x: torch.Tensor, name: str) -> None:
        if x.dim() != 2 or x.shape[-1] % self.group_size:
            raise UnsupportedInputError(
                f"tensor {name!r}: {self.name} needs a 2-D weight whose rows divide into groups of "
                f"{self.group_size}, got shape {tuple(x.shape)}; torchao leaves such weights unquantized"
            )

    def _encode(self, x: torch.Tensor) -> Encoding:
        n, k = x.shape
        groups = x.view(n, k // self.group_size, self.group_size)
        lo = groups.amin(dim=-1)
        hi = groups.amax(dim=-1)
        eps = torch.finfo(x.dtype).smallest_normal if self.eps is None else self.eps
        scale = torch.clamp((hi - lo) / 15.0, min=eps)
        zero = lo + scale * _INT4_MID
        min_val = zero - scale * _INT4_MID
        quant = torch.clamp(torch.round((groups - min_val.unsqueeze(-1)) / scale.unsqueeze(-1)), 0, 15)
        codes = (quant.to(torch.int32) & 0xF).view(n, k)  # a NaN quotient casts to INT_MIN: the packers keep nibble 0
        s32, z32 = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
        u = ((groups.float() - z32) / s32 + _INT4_MID).view(n, k)
        cells = _collapse_outside(integer_grid_cells(u, codes, 0, 15))
        return Encoding(self.name, x.shape, cells, {"scale": scale, "zero": zero})

    def _pack(self, enc: Encoding, codes: torch.Tensor) -> QuantizedTensor:
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
            raise UnsupportedInputError(f"{self.name} codes must lie in [0, 15]")
        c = codes.to(torch.uint8)
        qdata = ((c[:, 0::2] << 4) | c[:, 1::2]).contiguous()
        scale_and_zero = torch.stack([enc.scales["scale"], enc.scales["zero"]], dim=-1).transpose(0, 1).contiguous()
        return QuantizedTensor(self.name, enc.shape, {"qdata": qdata, "scale_and_zero": scale_and_zero})

    def _values(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """torchao's _dequantize_affine_tinygemm to float32: ((q - 8) * scale) + zero, two float32 roundings."""
        n, k = codes.shape
        g = codes.view(n, k // self.group_size, self.group_size)
        values = (g - _INT4_MID).float() * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
        return values.view(n, k)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if q.format != self.name:
            raise UnsupportedInputError(f"a {q.format} tensor cannot be read as {self.name}")
        packed = q.tensors["qdata"]
        codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(q.shape).to(torch.int32)
        sz = q.tensors["scale_and_zero"].transpose(0, 1)
        return self._values(codes, sz[..., 0], sz[..., 1])

    def code_values(self, enc: Encoding, codes: torch.Tensor) -> torch.Tensor:
        return self._values(codes.to(torch.int32), enc.scales["scale"], enc.scales["zero"])

    def code_value_rule(self, enc: Encoding) -> CodeValueRule:
        """_values as a rule: (code - 8) * scale + zero, per group along the row."""
        table = torch.arange(-_INT4_MID, 16 - _INT4_MID, dtype=torch.float32)
        scale, zero = (enc.scales[k].float().reshape(-1) for k in ("scale", "zero"))
        return CodeValueRule(table, 0, scale, self.group_size, shift=zero)


VLLM_INT8_RULE = Int8RowRule(divisor=127.0, qmin=-127, eps=None, quotient="divide", fp32_scalar_division="reciprocal")
TORCHAO_INT8_RULE = Int8RowRule(
    divisor=127.5, qmin=-128, eps=_F32_EPS, quotient="reciprocal", fp32_scalar_division="true"
)

register_format(
    AbsmaxRowInt8(
        "int8_per_channel", VLLM_INT8_RULE, "vLLM int8_per_channel_weight_only: per-row int8, quotient in weight dtype"
    )
)
register_format(
    AbsmaxRowInt8("torchao_int8", TORCHAO_INT8_RULE, "torchao Int8WeightOnlyConfig: per-row int8 [-128, 127]")
)
register_format(TinygemmGroupInt4("torchao_int4", group_size=128))
