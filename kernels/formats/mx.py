"""vLLM 0.33's online MX formats: mxfp8 (e4m3 elements) and mxfp4 (e2m1 elements), 32-element blocks, e8m0 scales.

Blocks run along the last dimension; each has one shared power-of-two scale stored as an e8m0 byte (biased exponent,
2**(byte - 127); byte 0 is 2**-127). The two formats use different scale rules in vLLM:

- ``mxfp8`` (online/mxfp8.py -> utils/mxfp8_utils.py, ``_mxfp8_e4m3_quantize_torch``, the path taken on CUDA below
  SM100 or without FlashInfer): ``amax = max(max|block|, 2**-126)``, ``byte = clamp(ceil(log2(amax / 448)) + 127, 0,
  254)``, elements ``e4m3(x / 2**(byte - 127))`` (round to nearest even, no clamp needed: the ceil keeps them <= 448).
  On CUDA ``amax / 448.0`` is a multiply by float32(1/448); that never changes ``ceil(log2(.))`` (checked exhaustively
  over a binade), so the exponent is the same as with a true division. ``log2`` is torch's float32 log2: for float32
  weights whose block amax / 448 lies within an ulp above a power of two its rounding decides the exponent (bf16 and
  fp16 weights cannot get there). On SM100 with FlashInfer vLLM calls FlashInfer's own quantizer instead (not
  reproduced here).
- ``mxfp4`` (online/mxfp4.py -> utils/mxfp4_utils.py, the portable Triton kernel ``_compute_quant_and_scale``, taken
  on CUDA and ROCm without aiter): the OCP "round then floor" scale. ``m = bits(amax) + 0x200000`` keeps only the
  exponent (amax rounded at 1.75 * 2**e to the next power of two); ``unbiased = clamp(floor(log2(m)) - 2, -127, 127)``
  (an all-zero exponent field reads as 2**-126, an overflow to infinity clamps to 127); ``byte = unbiased + 127``;
  elements are ``x * 2**-unbiased`` converted to e2m1 bit by bit: round to nearest, ties to even, saturating at 6.
  Its subnormal path drops the lowest float32 mantissa bit before the sticky bit, so exactly
  ``0.25 * (1 + 2**-23)`` (scaled units) rounds to 0 instead of 0.5; bf16 and fp16 weights cannot produce that value,
  and we reproduce the kernel, not RNE. vLLM's kernel takes bf16/fp16 only; float32 input is quantized by the same
  float32 arithmetic. Blocks with ``unbiased = -127`` use the subnormal scale 2**-127 exactly (IEEE); a GPU that
  flushed it to zero would zero those blocks (amax below ~4e-38, never a real weight).

Codes are element magnitudes (e4m3: 0..126; e2m1: 0..7 for 0, 0.5, 1, 1.5, 2, 3, 4, 6), ascending; the sign written is
the element's own (also for zeros: -0.0 packs as a negative zero). Packed layout: ``weight`` uint8 (mxfp8: one e4m3 byte
per element, ``weight.view(torch.float8_e4m3fn)`` is vLLM's parameter; mxfp4: two e2m1 nibbles per byte, element 2i in
the low nibble, 2i+1 in the high one) and ``scale`` uint8 [..., K/32] e8m0, row-major (not swizzled).
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedInputError
from ..numerics import float32_bits, signbit
from .base import CodeValueRule, Encoding, Format, QuantizedTensor
from .cells import codebook_cells
from .fp8 import E4M3_MAX, e4m3_magnitudes, fp8_cells
from .registry import register_format

__all__ = ["E2M1_MAGNITUDES", "MX_BLOCK", "MxFormat", "e2m1_round_magnitude", "e8m0_to_float"]

MX_BLOCK = 32
E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float32)
_F32_TINY = 2.0**-126
_ELEMENTS = ("e4m3", "e2m1")


def e8m0_to_float(byte: torch.Tensor) -> torch.Tensor:
    """2**(byte - 127) in float32, exactly (byte 0 is the subnormal 2**-127; 255, NaN, is never written here)."""
    b = byte.to(torch.int32)
    normal = (b << 23).view(torch.float32)
    subnormal = torch.full_like(normal, 2.0**-127)
    return torch.where(b == 0, subnormal, normal)


def e2m1_round_magnitude(q: torch.Tensor) -> torch.Tensor:
    """vLLM's float32 -> e2m1 magnitude code (0..7), bit for bit as its Triton kernel computes it.

    Normal path (|q| >= 1): round the 23-bit mantissa to one bit with the bias ``((m >> 22) & 1) + 0x1FFFFF`` (round
    to nearest, ties to even), exponent rebased from 127 to 1, saturating at code 7 (6.0). Subnormal path (|q| < 1):
    ``0x400000 | (m >> 1)`` shifted right by ``126 - e`` with a sticky bit for the bits shifted out (PTX clamps shifts
    past 31 to 32 bits: the value becomes 0 with the sticky bit set, so tiny inputs round to 0).
    """
    bits = float32_bits(q).to(torch.int64) & 0xFFFFFFFF
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    shift = (126 - exponent).clamp(0, 32)
    folded = 0x400000 | (mantissa >> 1)
    denormal = folded >> shift
    sticky = ((denormal << shift) & 0xFFFFFFFF) != folded
    denormal = denormal | sticky.to(torch.int64)
    mantissa = torch.where(exponent < 127, denormal, mantissa)
    exponent = exponent.clamp(min=126) - 126
    rounded = (mantissa + ((mantissa >> 22) & 1) + 0x1FFFFF) >> 22
    return ((exponent << 1) + rounded).clamp(max=7).to(torch.int32)


class MxFormat(Format):
    """One class for both MX formats, parameterized by the element type (which also selects vLLM's scale rule)."""

    family = "fp8-mx"

    def __init__(self, name: str, element: str) -> None:
        if element not in _ELEMENTS:
            raise ValueError(f"element must be one of {_ELEMENTS}, got {element!r}")
        self.name = name
        self.element = element
        self.bits = 8 if element == "e4m3" else 4
        self.grid = e4m3_magnitudes() if element == "e4m3" else E2M1_MAGNITUDES
        self.description = f"vLLM online {name}: {element} elements, blocks of 32 along rows, e8m0 scales"

    def check_shape(self, x: torch.Tensor, name: str) -> None:
        if x.dim() == 0 or x.shape[-1] % MX_BLOCK:
            raise UnsupportedInputError(
                f"tensor {name!r}: {self.name} needs a last dimension divisible by {MX_BLOCK} (vLLM requires "
                f"input_size_per_partition % 32 == 0), got shape {tuple(x.shape)}; leave this layer unquantized"
            )

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], x.shape[-1] // MX_BLOCK, MX_BLOCK)

    # ---- scale rule and rounding cells ----

    def scale_bytes(self, blocks: torch.Tensor) -> torch.Tensor:
        """The e8m0 byte of every block of float32 ``blocks`` [..., n, 32] (vLLM's rule for this element type)."""
        amax = blocks.abs().amax(dim=-1)
        if self.element == "e4m3":
            descale = amax.clamp(min=_F32_TINY) / E4M3_MAX
            biased = torch.ceil(torch.log2(descale)) + 127.0
            return biased.clamp(0, 254).to(torch.uint8)
        field = ((float32_bits(amax).to(torch.int64) + 0x200000) >> 23) & 0xFF  # 255: rounded up to infinity
        unbiased = torch.where(field == 0, torch.full_like(field, -126), field - 127) - 2
        unbiased = torch.where(field == 255, torch.full_like(field, 127), unbiased).clamp(-127, 127)
        return (unbiased + 127).to(torch.uint8)

    def _scaled(self, blocks: torch.Tensor, byte: torch.Tensor) -> torch.Tensor:
        """The float32 values the element conversion sees (both are exact power-of-two scalings, up to subnormals)."""
        scale = e8m0_to_float(byte).unsqueeze(-1)
        if self.element == "e4m3":
            return blocks / scale  # x_blocked / descale
        return blocks * (1.0 / scale)  # f32_tensor * quant_scale, quant_scale = 1.0 / 2**unbiased

    def _encode(self, x: torch.Tensor) -> Encoding:
        blocks = self._blocks(x)
        byte = self.scale_bytes(blocks)
        q = self._scaled(blocks, byte).reshape(x.shape)
        if self.element == "e4m3":
            cells, negative = fp8_cells(q)  # the same e4m3 cast as vLLM's fp8 formats
        else:
            cells, negative = codebook_cells(q.abs(), self.grid, e2m1_round_magnitude(q)), signbit(q)
        return Encoding(self.name, x.shape, cells, {"scale": byte, "negative": negative})

    # ---- bytes ----

    def _pack(self, enc: Encoding, codes: torch.Tensor) -> QuantizedTensor:
        top = self.grid.numel() - 1
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > top):
            raise UnsupportedInputError(f"{self.name} magnitude codes must lie in [0, {top}]")
        sign_bit = self.bits - 1
        elements = codes.to(torch.uint8) | (enc.scales["negative"].to(torch.uint8) << sign_bit)
        if self.element == "e2m1":
            elements = elements[..., 0::2] | (elements[..., 1::2] << 4)
        return QuantizedTensor(self.name, enc.shape, {"weight": elements.contiguous(), "scale": enc.scales["scale"]})

    def _element_values(self, weight: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.element == "e4m3":
            return weight.view(torch.float8_e4m3fn).float()
        nibbles = torch.stack([weight & 0x0F, weight >> 4], dim=-1).reshape(shape)
        mag = E2M1_MAGNITUDES.to(weight.device)[(nibbles & 0x07).long()]
        return torch.where((nibbles & 0x08) != 0, -mag, mag)

    def _apply_scale(self, values: torch.Tensor, byte: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return (self._blocks(values) * e8m0_to_float(byte).unsqueeze(-1)).reshape(shape)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if q.format != self.name:
            raise UnsupportedInputError(f"a {q.format} tensor cannot be read as {self.name}")
        values = self._element_values(q.tensors["weight"], q.shape)
        return self._apply_scale(values, q.tensors["scale"], q.shape)

    def code_values(self, enc: Encoding, codes: torch.Tensor) -> torch.Tensor:
        sign = torch.where(enc.scales["negative"], -1.0, 1.0)  # times +-1: exact, -0.0 included
        return self._apply_scale(self.grid[codes] * sign, enc.scales["scale"], enc.shape)

    def code_value_rule(self, enc: Encoding) -> CodeValueRule:
        """code_values as a rule: magnitude * sign * the block's power of two, per block of 32."""
        scale = e8m0_to_float(enc.scales["scale"]).reshape(-1)
        return CodeValueRule(self.grid, 0, scale, MX_BLOCK, negative=enc.scales["negative"])


register_format(MxFormat("mxfp8", "e4m3"))
register_format(MxFormat("mxfp4", "e2m1"))
