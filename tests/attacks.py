"""Simulated box attacks: the geometric end state of a QCB repair (Egashira et al. 2024), for detector tests.

Every weight is clamped into the shrunk round-to-nearest preimage of a malicious code, with block scales pinned.
The trained attacks of the efficacy harness (benchmarks/qcb) are the end-to-end proof; these are the unit-level one.
"""

from __future__ import annotations

import torch

from qcbguard_kernels import get_format

__all__ = ["box_attack", "clean_weights", "lattice_box_attack", "pin_absmax"]


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


def lattice_box_attack(
    w: torch.Tensor, source: str, target: str, margin: float, block: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A box attack that stays on a checkpoint's lattice: w dequantized from the symmetric 32-block `source` (Q8_0 or
    Q4_0) is the published model, and each weight moves to the lattice value of its block (floor or ceil of
    box_attack's weight in source steps, within the source's codes; the block's largest weight stays, so the source
    scale does too) that rounds to the malicious `target` code, where one does. Returns (attacked weights, the clean
    lattice, the malicious codes)."""
    src, tgt = get_format(source), get_format(target)
    lattice = src.dequantize(src.quantize(w)).reshape(w.shape)
    boxed, codes = box_attack(lattice, target, margin, block, seed)
    lowest, highest = {"q8_0": (-127, 127), "q4_0": (-8, 7)}[source]
    blocks = lattice.reshape(-1, 32)
    # the source's signed scale: its code `lowest` holds the block's largest magnitude (Q4_0: d = max / -8)
    at_largest = blocks.abs().argmax(dim=1, keepdim=True)
    largest = blocks.gather(1, at_largest)
    step = torch.where(largest == 0, 1.0, largest / lowest if source == "q4_0" else largest.abs() / highest)
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(1, at_largest, True)
    best = lattice.clone()
    for rounding in (torch.floor, torch.ceil):
        q = rounding(boxed.reshape(-1, 32) / step).clamp(lowest, highest)
        candidate = torch.where(keep, blocks, q * step).reshape(w.shape)
        hits = tgt.encode(candidate).cells.nearest == codes
        current = tgt.encode(best).cells.nearest == codes
        closer = (candidate - lattice).abs() < (best - lattice).abs()
        best = torch.where(hits & (~current | closer), candidate, best)
    return best, lattice, codes
