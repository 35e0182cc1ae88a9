"""Rounding rules measured on the real model: round-to-nearest, qcbguard's hardening, and prototypes of cheaper noise.

Every rule keeps the standard quantizer's scales (the Encoding) and only picks, per element, the lower or upper code
of its rounding cell, so every result packs into the format's native layout.

- `rtn`: the standard quantizer's nearest code.
- `sr` (qcbguard today): upper with probability `position`, independently per element, u from Philox stream 0.
  Unbiased; error variance p(1-p) step^2 per element, 1/6 step^2 on average against 1/12 for round-to-nearest.
- `systematic` (prototype): the same marginal law, P(upper) = position exactly for every element, but the draws of
  one segment of `segment` consecutive columns are coupled so that the segment's rounding errors sum to less than
  one step (systematic sampling, i.e. first-order sigma-delta error feedback along a secret order): walk the
  segment's elements in an order given by sorting their secret Philox uniforms (a uniformly random permutation
  the attacker cannot know), accumulate positions S_k, and round element k up when floor(S_k + o) > floor(S_{k-1} + o)
  for one secret offset o per segment (Philox stream 1). Unbiased like `sr`, unpredictable over the whole cell like
  `sr` (each element still goes up with probability `position`), but the error has no component along the segment's
  all-ones direction. The per-element variance p(1-p) cannot be lowered without giving up unbiasedness or
  full-cell randomness; only its correlation across elements can be shaped, and this is the data-free shaping.
  With a public order instead of a secret one an attacker could align patterns (two weights at p = 0.5 would always
  split one up, one down), which is why the order is drawn from the seed.
"""

from __future__ import annotations

import torch

from qcbguard_kernels.formats.base import Encoding

__all__ = ["rtn_codes", "sr_codes", "systematic_codes"]


def rtn_codes(enc: Encoding) -> torch.Tensor:
    return enc.cells.nearest


def sr_codes(enc: Encoding, u: torch.Tensor) -> torch.Tensor:
    """qcbguard's stochastic_codes, given its stream-0 uniforms u."""
    return torch.where(u < enc.cells.position, enc.cells.upper, enc.cells.lower)


def systematic_codes(enc: Encoding, u: torch.Tensor, offsets: torch.Tensor, segment: int) -> torch.Tensor:
    """Sum-preserving stochastic rounding in segments of `segment` columns (see the module docstring).

    u: stream-0 uniforms, one per element (rows, cols); offsets: stream-1 uniforms, one per segment
    (rows, cols // segment)."""
    cells = enc.cells
    rows, cols = cells.position.shape
    if cols % segment:
        raise ValueError(f"{cols} columns do not split into segments of {segment}")
    n_seg = cols // segment
    p = torch.where(cells.steerable, cells.position, torch.zeros_like(cells.position)).double()
    p = p.reshape(rows, n_seg, segment)
    order = torch.argsort(u.reshape(rows, n_seg, segment), dim=-1)
    walked = torch.gather(p, -1, order)
    o = offsets.double().reshape(rows, n_seg, 1)
    after = torch.floor(torch.cumsum(walked, dim=-1) + o)
    before = torch.cat([torch.floor(o), after[..., :-1]], dim=-1)
    up_walked = (after - before) > 0
    up = torch.empty_like(up_walked).scatter_(-1, order, up_walked).reshape(rows, cols)
    return torch.where(up, cells.upper, cells.lower)
