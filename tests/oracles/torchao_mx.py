"""torchao 0.18's MX reference (torchao.prototype.mx_formats) on CPU, reduced to plain uint8 tensors.

to_mx(..., ScaleCalculationMode.RCEIL) is the mxfp8 oracle and ScaleCalculationMode.EVEN the mxfp4 one;
f32_to_f4_unpacked is torchao's round-to-nearest-even e2m1 conversion. torchao and vLLM agree on the scale byte of
every block except those listed in each test; where they differ the tests say why.
"""

from __future__ import annotations

import pytest
import torch

mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
mx_config = pytest.importorskip("torchao.prototype.mx_formats.config")
mx_kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")

__all__ = ["e2m1_rne_codes", "to_mx_bytes"]


def to_mx_bytes(x: torch.Tensor, element: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(e8m0 scale bytes [..., K/32], element bytes) from torchao's to_mx: RCEIL for e4m3, EVEN for e2m1.

    Element bytes are e4m3 bytes (one per element) or packed e2m1 nibbles (element 2i low, 2i+1 high).
    torchao takes bfloat16 or float32; float16 converts to float32 exactly.
    """
    data = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
    mode = mx_config.ScaleCalculationMode.RCEIL if element == "e4m3" else mx_config.ScaleCalculationMode.EVEN
    elem_dtype = torch.float8_e4m3fn if element == "e4m3" else torch.float4_e2m1fn_x2
    scale, elements = mx_tensor.to_mx(data.contiguous(), elem_dtype, 32, mode)
    return scale.view(torch.uint8), elements.view(torch.uint8)


def e2m1_rne_codes(values: torch.Tensor) -> torch.Tensor:
    """torchao's float32 -> e2m1 (sign in bit 3) with round-to-nearest-even and saturation at 6, as uint8 nibbles."""
    return mx_kernels.f32_to_f4_unpacked(values.float().contiguous())
