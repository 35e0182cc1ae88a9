"""Rounding cells on the two kinds of grid the formats use: uniform integer grids and sorted codebooks."""

from __future__ import annotations

import torch

from .. import native
from .base import RoundingCells

__all__ = ["codebook_cells", "integer_grid_cells", "integer_grid_cells_reference"]


def integer_grid_cells(u: torch.Tensor, nearest: torch.Tensor, qmin: int, qmax: int, offset: int = 0) -> RoundingCells:
    """Cells of a weight at grid coordinate u (value = scale * (code - offset), so u = x / scale + offset, or, with
    `offset`, codes stored as grid index + offset while u stays on the index: the exact quotient the quantizer rounds).

    `nearest` (stored codes) is what the standard quantizer computed with its own exact rule; it always lies in
    {floor(u), ceil(u)} clamped to [qmin, qmax], plus offset, because every rule here rounds u. Where u is not finite
    (a degenerate scale: 1/d overflowing on subnormal blocks), the cell collapses onto the code the quantizer wrote.
    One native pass on a CPU where built (native.grid_cells, the same bits), else integer_grid_cells_reference.
    """
    if native.enabled(u):
        lower, upper, position = native.grid_cells(u, nearest, qmin, qmax, offset)
        return RoundingCells(lower=lower, upper=upper, position=position, nearest=nearest.to(torch.int32))
    return integer_grid_cells_reference(u, nearest, qmin, qmax, offset)


def integer_grid_cells_reference(
    u: torch.Tensor, nearest: torch.Tensor, qmin: int, qmax: int, offset: int = 0
) -> RoundingCells:
    """integer_grid_cells in plain torch."""
    finite = torch.isfinite(u)
    u = torch.where(finite, u, (nearest - offset).to(u.dtype))
    low = torch.floor(u)
    high = torch.ceil(u)
    position = u - low
    lower = low.clamp(qmin, qmax).to(torch.int32)
    upper = high.clamp(qmin, qmax).to(torch.int32)
    position = torch.where(lower == upper, torch.zeros_like(position), position)
    return RoundingCells(lower=lower + offset, upper=upper + offset, position=position, nearest=nearest.to(torch.int32))


def codebook_cells(
    v: torch.Tensor, grid: torch.Tensor, nearest: torch.Tensor, lower: torch.Tensor | None = None
) -> RoundingCells:
    """Cells of a normalized weight v on a sorted codebook `grid` (float32, ascending, codes = indices into it).

    Values below the first or above the last entry are clamped to it (lower == upper). `lower`, the index of the
    largest entry <= v (clamped to the grid), is searched for unless the caller computed it (fp8: from the bits).
    """
    top = grid.numel() - 1
    if lower is None:
        lower = (torch.searchsorted(grid, v.contiguous(), right=True) - 1).clamp(0, top)
    else:
        lower = lower.long()
    on_code = grid[lower] == v
    upper = torch.where(on_code | (v > grid[top]), lower, (lower + 1).clamp(max=top))
    below = v < grid[0]
    upper = torch.where(below, lower, upper)
    span = grid[upper] - grid[lower]
    position = torch.where(span > 0, (v - grid[lower]) / torch.where(span > 0, span, 1.0), 0.0)
    return RoundingCells(
        lower=lower.to(torch.int32),
        upper=upper.to(torch.int32),
        position=position.float(),
        nearest=nearest.to(torch.int32),
    )
