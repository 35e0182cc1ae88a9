"""The checkpoint dtype's own lattice: the spacing its stored values were rounded to, per weight."""

from __future__ import annotations

import torch

#: explicit mantissa bits of the checkpoint dtypes the detector reads
MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def storage_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at each weight (the lattice its values were rounded to), float32."""
    finfo = torch.finfo(dtype)
    mag = x.abs().clamp(min=finfo.tiny).float()
    _, exponent = torch.frexp(mag)  # mag = m * 2**exponent, m in [0.5, 1): exact, unlike floor(log2(mag))
    return torch.ldexp(torch.ones_like(mag), exponent - 1 - MANTISSA_BITS[dtype])
