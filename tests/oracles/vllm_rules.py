"""vLLM 0.33's online quantization rules, restated in torch from its source (vLLM itself needs a GPU for these).

The fp8 element rounding is then torch's own float8_e4m3fn cast: an independent oracle for our e4m3 rounding.
"""

from __future__ import annotations

import torch

__all__ = ["vllm_fp8_cast_input", "vllm_int8_rows"]


def vllm_fp8_cast_input(name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 values vLLM 0.33 casts to e4m3, stored scale), restated from its source.

    fp8_per_tensor: online/fp8.py Fp8PerTensorOnlineLinearMethod + static_scaled_fp8_quant (w8a8/fp8/common.cu):
    scale = amax / 448 (0-d tensor divisor), x * (1.0f / scale), fmaxf(-448, fminf(., 448)) with fminf(NaN, y) = y.
    fp8_per_channel: Fp8PtpcOnlineLinearMethod: _fp8_channel_scale (clamp_min(1 / (448 * 512))) and
    _fp8_quant_per_channel (x / scale, clamp). fp8_per_block: utils/deep_gemm.py per_block_cast_to_fp8 compiled by
    inductor for CUDA: amax.clamp(1e-4) * float32(1/448), x * (1 / sf).
    """
    x = x.float()
    if name == "fp8_per_tensor":
        scale = x.abs().amax().reshape(1) / torch.tensor(448.0)
        u = x * (1.0 / scale)
        return torch.where(torch.isnan(u), 448.0, u.clamp(-448, 448)), scale
    if name == "fp8_per_channel":
        scale = (x.abs().amax(dim=1, keepdim=True) / torch.tensor(448.0)).clamp_min(
            torch.tensor(1.0) / torch.tensor(448.0 * 512)
        )
        return (x / scale).clamp(-448, 448), scale
    n, k = x.shape
    padded = torch.nn.functional.pad(x, (0, -k % 128, 0, -n % 128))
    blocks = padded.view(padded.shape[0] // 128, 128, padded.shape[1] // 128, 128)
    sf = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(1e-4) * torch.tensor(1 / 448.0)
    return (blocks * (1.0 / sf)).view_as(padded)[:n, :k], sf.view(blocks.shape[0], blocks.shape[2])


def vllm_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM 0.33 Int8OnlineMoEMethod._quantize_weights on one expert, as torch computes it in the weight dtype:
    scales = w.abs().amax(dim=1) / 127 (on CUDA a float32 tensor divided by a Python number is multiplied by
    float32(1/127); bf16/fp16 round the same either way), q = w.div(scales[:, None]).round().clamp(-127, 127)."""
    amax = w.abs().amax(dim=1)
    scales = amax * torch.tensor(1 / 127) if w.dtype == torch.float32 else amax / 127
    return w.div(scales.unsqueeze(1)).round().clamp(-127, 127).to(torch.int8), scales.float()
