"""Bit-exact scalar rules of the C and CUDA quantizers, vectorized in plain torch.

Every function works in float32 and reproduces one rounding rule exactly, including ties, signed zeros and subnormals.
"""

from __future__ import annotations

import torch

__all__ = [
    "c_float_to_int8",
    "c_roundf",
    "c_trunc_to_int",
    "div_rn",
    "float32_bits",
    "fp16_bits",
    "fp16_from_bits",
    "nearest_int",
    "signbit",
    "sqrt_rn",
]

# nearest_int() in ggml adds 1.5 * 2**23: the fp32 sum then holds round-half-even(x) in its low mantissa bits.
_MAGIC = 12582912.0


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even through the 1.5*2**23 trick (valid for |x| <= 4194303)."""
    shifted = (x.float() + _MAGIC).view(torch.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


def c_roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf: round half away from zero, computed exactly (x - trunc(x) is exact in fp32)."""
    x = x.float()
    t = torch.trunc(x)
    away = (x - t).abs() >= 0.5
    return torch.where(away, t + torch.sign(x), t)


def c_trunc_to_int(x: torch.Tensor) -> torch.Tensor:
    """C's (int) cast of a float: truncation toward zero."""
    return torch.trunc(x.float()).to(torch.int32)


def c_float_to_int8(x: torch.Tensor) -> torch.Tensor:
    """C's (int8_t) cast of a float, as x86 compilers emit it: cvttss2si to int32, then the low byte.

    Truncates toward zero in range; NaN and out-of-range values become 0x80000000, whose low byte is 0 (this is what
    ggml writes for blocks whose reciprocal scale overflows). Returns int32 in [-128, 127].
    """
    low_byte = torch.trunc(x.float()).to(torch.int32) & 0xFF
    return (low_byte ^ 0x80) - 0x80


def div_rn(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """float32(numerator) / t with one IEEE rounding, like C's `1.0f / d`.

    `python_scalar / tensor` in torch is reciprocal-then-multiply (two roundings), not a true division.
    """
    return torch.full_like(t, numerator) / t


def sqrt_rn(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root, like C's sqrtf.

    torch.sqrt on float32 CPU tensors is off by one ulp on about 0.7% of inputs (vectorized path); the float64 square
    root of a float32, rounded once to float32, is correctly rounded.
    """
    return torch.sqrt(t.double()).float()


def fp16_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> IEEE half bits with round-to-nearest-even (ggml's GGML_FP32_TO_FP16), as int16."""
    return x.float().to(torch.float16).view(torch.int16)


def fp16_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """IEEE half bits (int16 or uint8 pairs already viewed as int16) -> float32, exactly."""
    return bits.view(torch.float16).float()


def float32_bits(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous().view(torch.int32)


def signbit(x: torch.Tensor) -> torch.Tensor:
    """True where the sign bit is set, -0.0 included."""
    return float32_bits(x) < 0
