"""Simulated box attacks: the geometric end state of a QCB repair (Egashira et al. 2024), for detector tests.

Every weight is clamped into the shrunk round-to-nearest preimage of a malicious code, with block scales pinned.
The trained attacks of the efficacy harness (benchmarks/qcb) are the end-to-end proof; these are the unit-level one.
"""

from __future__ import annotations

import torch

from qcbguard_kernels import get_format

__all__ = ["box_attack", "clean_weights", "pin_absmax"]


def clean_weights(seed: int, heavy: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 1024, generator=g) * 0.02
    if heavy:
        w = w * torch.exp(torch.randn(256, 1024, generator=g))
    return w


def pin_absmax(target: torch.Tensor, source: torch.Tensor, block: int) -> torch.Tensor:
    """target with each block's absmax element taken from source, the others kept strictly inside that absmax."""
    t, s = target.reshape(-1, block).clone(), source.reshape(-1, block)
    pinned = s.abs().argmax(dim=1, keepdim=True)
    bound = s.gather(1, pinned).abs() * 0.999
    t = torch.maximum(torch.minimum(t, bound), -bound)
    t.scatter_(1, pinned, s.gather(1, pinned))
    return t.reshape(target.shape)


def box_attack(
    w: torch.Tensor, fmt_name: str, margin: float, block: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp w into the round-to-nearest preimage (shrunk by `margin` cell per side) of the codes of a malicious
    neighbour w + 0.7 step noise; each scale block's absmax element is pinned so the scales stay put.
    Returns (attacked weights, the malicious codes they round to)."""
    fmt = get_format(fmt_name)
    g = torch.Generator().manual_seed(seed + 1)
    enc = fmt.encode(w)
    step = (fmt.code_values(enc, enc.cells.upper) - fmt.code_values(enc, enc.cells.lower)).abs()
    step = torch.where(step > 0, step, step.max())
    malicious = pin_absmax(w + torch.randn(w.shape, generator=g) * step * 0.7, w, block)
    menc = fmt.encode(malicious)
    q = menc.cells.nearest
    lo_code, hi_code = int(menc.cells.lower.min()), int(menc.cells.upper.max())
    v = fmt.code_values(menc, q)
    below = (v + fmt.code_values(menc, (q - 1).clamp(min=lo_code))) / 2
    above = (v + fmt.code_values(menc, (q + 1).clamp(max=hi_code))) / 2
    lo, hi = torch.minimum(below, above), torch.maximum(below, above)
    lo = lo + 2 * margin * (v - lo)
    hi = hi - 2 * margin * (hi - v)
    attacked = pin_absmax(torch.minimum(torch.maximum(w, lo), hi), w, block)
    return attacked, q
