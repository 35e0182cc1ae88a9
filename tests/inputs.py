"""Fresh awkward inputs for exactness tests: every case the real quantizers must agree with us on.

Each case is a float32 tensor of shape (rows, cols); `block` is the format's block length along the last dimension,
so the block-level cases (all-zero, -0.0, constant, huge) land on whole blocks.
"""

from __future__ import annotations

import torch

__all__ = ["fresh_seed", "integer_tie_rows", "standard_cases"]

FP32_MAX = torch.finfo(torch.float32).max
FP32_TINY = torch.finfo(torch.float32).tiny  # smallest normal


def fresh_seed() -> int:
    """A new seed per test run (printed by the tests on failure through the case name)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    return x.view(x.shape[0], -1, block)


def standard_cases(rows: int, cols: int, block: int, seed: int) -> dict[str, torch.Tensor]:
    """The input cases of the exactness contract. cols must be a multiple of block."""
    if cols % block:
        raise ValueError(f"cols={cols} is not a multiple of block={block}")
    g = torch.Generator().manual_seed(seed)

    def normal(scale: float = 0.02) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) * scale

    cases: dict[str, torch.Tensor] = {}
    cases["normal"] = normal()
    t = torch.distributions.StudentT(torch.tensor(2.0)).sample((rows, cols)) * 0.02
    cases["heavy_tailed"] = t
    cases["fp16_rounded"] = normal(1.0).half().float()
    cases["bf16_rounded"] = normal(0.05).bfloat16().float()

    x = normal()
    b = _blocks(x, block)
    b[:, ::3] = 0.0
    cases["zero_blocks"] = x

    x = normal()
    b = _blocks(x, block)
    b[:, ::3] = -0.0
    b[:, 1::3, ::2] = -0.0  # mixed signed zeros inside live blocks
    b[:, 2::3, 1::2] = 0.0
    cases["negative_zero_blocks"] = x

    x = normal()
    b = _blocks(x, block)
    b[:, ::2] = 0.0173
    b[:, 1::4] = -0.25
    cases["constant_blocks"] = x

    x = normal(1e-39)  # float32 subnormals (below 1.18e-38)
    b = _blocks(x, block)
    b[:, ::2] *= 1e-5
    cases["subnormal"] = x

    x = normal()
    x.view(-1)[:: max(1, cols // 3 + 1)] = FP32_TINY
    cases["tiny_and_normal"] = x

    x = normal(1e37).clamp(-FP32_MAX, FP32_MAX)
    b = _blocks(x, block)
    b[:, ::2, 0] = FP32_MAX
    b[:, 1::2, -1] = -FP32_MAX
    cases["largest_finite"] = x

    x = normal(1.0)
    b = _blocks(x, block)
    b[:, ::2, 0] = 65504.0  # largest finite float16
    cases["fp16_max"] = x
    return cases


def integer_tie_rows(rows: int, cols: int, block: int, qmax: int, seed: int, scale: float = 0.125) -> torch.Tensor:
    """Blocks whose absmax is qmax*scale (scale a power of two, so absmax/qmax == scale exactly) and whose other
    elements sit exactly halfway between two codes: every rounding there is a tie."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-qmax, qmax, (rows, cols), generator=g).float()
    x = (k + 0.5) * scale
    b = _blocks(x, block)
    b[..., 0] = qmax * scale
    return x
