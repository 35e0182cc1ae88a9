"""The detector's null for weights that already sit on another format's lattice: counts across neighbouring values.

A checkpoint dequantized from one format (a GGUF or bitsandbytes model converted back, an fp8 or MXFP4 release upcast)
holds a few values per block: 16 for a 4-bit format. Under another format each of those values sits at one place in
its cell, set by the geometry of the two grids, so the cell positions are a handful of spikes; the local decoys
(weights shifted by a few storage ulps) smear the spikes and read the geometry as tampering. This null keeps the
geometry and tests what an attacker controls instead: how many weights take each value.

Within a run of RUN consecutive weights that holds few distinct values (exact zeros aside), rank them. A clean
checkpoint's count at a value follows a smooth density over the ranks, so it is predicted from the counts at the
neighbouring ranks by a stencil exact for cubic densities, (4 (N[j-1] + N[j+1]) - (N[j-2] + N[j+2])) / 6 (the ranks
next to the run's ends by the two-point mean, its two end values by their own count); every weight counts as a
neighbour, the zeros and grid-end codes the detector does not judge included. The null puts each value's predicted
count at that value's own cell position (or on its code), so it shares the lattice and the geometry exactly. Parking
weights at values near a rounding boundary, as a box attack on a lattice must, raises those values' counts above
their neighbours'. Counts smaller than a density can explain are the rule's limit: the prediction is a smoothing,
and a run of RUN weights is a small sample (sampling noise is what the verdict's noise floor and threshold absorb).

Two kinds of run stay out of this null:
- runs with many distinct values (continuous weights, or a box attack's clamped edges mixed with free weights): the
  local decoys judge them, as before;
- *degenerate* runs, whose values all sit within DEGENERATE_SPREAD of one distance from a rounding boundary (or all
  on the target's codes): every rank then has the same position and the smoothed counts equal the real ones whatever
  they are, so the run carries no evidence here. Such a run is each weight's code plus one offset for the whole run
  (an offset lattice, which is also what a box attack restricted to one offset per block looks like); its weights are
  counted apart (`unjudged`) and the verdict flags a tensor made mostly of them.

cell_score(own_lattice=True) also scores the tensor against the local decoys alone (CellScore.local), and the verdict
flags it only when both do: this null can clear the local decoys' false alarms on lattices, never add its own.

Experimental, off by default (cell_score(own_lattice=True), HardeningConfig.detector_lattice_null, the scans'
--lattice-null): it runs in torch, heavy-tailed lattices still read as tampered under other 4-bit formats, and its
margin on attacks kept on a lattice (a box attack on a Q4_0 lattice targeting NF4: 0.033, clean 0.003) is thinner
than the local decoys' on continuous weights (benchmarks/REAL_MODEL_RESULTS.md, 2026-12-08).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DEGENERATE_SPREAD", "LATTICE_NULL_HELP", "RUN", "LatticeNull", "holds_lattice_runs", "lattice_null"]

#: the command-line flags' help (qcbguard scan, qcbguard-gguf scan / quantize)
LATTICE_NULL_HELP = (
    "experimental: judge weights that repeat a few values (a checkpoint dequantized from another format, a QAT model) "
    "against their own lattice instead of flagging them wholesale (README: detection limits)"
)

RUN = 32
_MAX_DISTINCT = RUN // 2  # a run is a lattice when at most this many distinct values ...
_MIN_REPEATS = 8  # ... and at least this many weights repeat one of them (a 2:4 pruned run has 16 distinct values)
DEGENERATE_SPREAD = 0.125  # cells: a lattice run whose positions all lie within this band is degenerate


@dataclass(frozen=True)
class LatticeNull:
    """`judged`: weights in lattice runs, judged by this null (they leave the local decoys); `degenerate`: weights of
    degenerate runs (out of both); `counts`: the null's boundary histogram (float64, one unit per ranked weight, on
    the detector's CDF grid); `on_code`: its predicted count of weights on interior codes."""

    judged: torch.Tensor
    degenerate: torch.Tensor
    counts: torch.Tensor
    on_code: float


def _runs(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    flat = x.reshape(-1)
    n = flat.numel() // RUN * RUN
    return flat[:n].view(-1, RUN), n


def _lattice_shaped(sorted_runs: torch.Tensor) -> torch.Tensor:
    """Per run (each sorted): at most _MAX_DISTINCT distinct non-zero values with _MIN_REPEATS repeats among them.
    Exact zeros are left out, as the detector leaves zeros on a code out: a pruned run of distinct values is no
    lattice."""
    distinct = (sorted_runs[:, 1:] != sorted_runs[:, :-1]).sum(dim=1) + 1
    zeros = (sorted_runs == 0).sum(dim=1)
    distinct_nonzero = distinct - (zeros > 0).long()
    return (distinct_nonzero <= _MAX_DISTINCT) & ((RUN - zeros) - distinct_nonzero >= _MIN_REPEATS)


def holds_lattice_runs(values: torch.Tensor) -> bool:
    """Cheap screen before the counting pass: is any run of RUN lattice-shaped (_lattice_shaped)?"""
    runs, n = _runs(values)
    return n > 0 and bool(_lattice_shaped(runs.sort(dim=1).values).any())


def lattice_null(
    values: torch.Tensor, position: torch.Tensor, live: torch.Tensor, ranked: torch.Tensor, bins: int
) -> LatticeNull:
    """The null over the lattice runs of a tensor (elementwise inputs of one shape, read in flat runs of RUN).

    `ranked` are the weights a decoy null stands in for: live ones (in a cell of two codes, off the grid) and those
    exactly on an interior code; `live` the subset binned by boundary distance b = |position - 0.5| on the grid
    ceil(b * 2 * bins) (the detector's histogram). Every weight of a run counts as a neighbour, the ones the detector
    leaves out too (exact zeros, the grid's end codes): a value's count is predicted from the counts of the values
    next to it, and skipping the zero level would put a cusp in the middle of a symmetric density. A value's weights
    share one cell position where runs sit inside one scale block; a run where they do not (a 16-weight k-quant
    sub-block boundary inside it) is left to the decoys."""
    runs, n = _runs(values)
    judged = torch.zeros(values.numel(), dtype=torch.bool)
    degenerate = torch.zeros_like(judged)
    counts = torch.zeros(bins + 1, dtype=torch.float64)
    if n == 0:
        return LatticeNull(judged.view(values.shape), degenerate.view(values.shape), counts, 0.0)
    on_code_bin = bins + 1
    sorted_values, order = runs.sort(dim=1)
    rk, lv = _runs(ranked)[0].gather(1, order), _runs(live)[0].gather(1, order)
    pos = _runs(position)[0].gather(1, order)
    b = (pos - 0.5).abs().mul(2 * bins).ceil().long().clamp(0, bins)
    b = torch.where(lv, b, torch.full_like(b, on_code_bin))  # ranked but not live: on an interior code
    first = torch.ones_like(rk)
    first[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    rank = first.long().cumsum(dim=1) - 1  # of the distinct value, in the run
    distinct = rank[:, -1] + 1
    rows = runs.shape[0]
    # per rank: every weight's count (the neighbours), the ranked weights' count, and the lowest / highest bin of the
    # ranked weights (equal where the run is one scale block)
    members = torch.zeros(rows, RUN, dtype=torch.float64).scatter_add_(
        1, rank, torch.ones_like(runs, dtype=torch.float64)
    )
    judged_count = torch.zeros(rows, RUN, dtype=torch.float64).scatter_add_(1, rank, rk.double())
    big = torch.full((rows, RUN), on_code_bin + 1, dtype=torch.long)
    low = big.scatter_reduce(1, rank, torch.where(rk, b, big), "amin")
    high = torch.zeros_like(big).scatter_reduce(1, rank, torch.where(rk, b, 0), "amax")
    present = judged_count > 0
    consistent = ((low == high) | ~present).all(dim=1)
    lattice = _lattice_shaped(sorted_values) & consistent & present.any(dim=1)
    # positions as boundary distances, interior codes at b = 0.5 (their cell's far end from the boundary)
    spread_b = torch.where(present, low.clamp(max=bins), torch.full_like(low, -1))
    spread = spread_b.amax(dim=1) - torch.where(present, spread_b, torch.full_like(low, bins + 1)).amin(dim=1)
    flat = spread < DEGENERATE_SPREAD * 2 * bins
    padded = torch.nn.functional.pad(members, (2, 2))
    near, far = padded[:, 1 : RUN + 1] + padded[:, 3 : RUN + 3], padded[:, 0:RUN] + padded[:, 4 : RUN + 4]
    predicted = (4 * near - far) / 6
    last = (distinct - 1).unsqueeze(1)
    j = torch.arange(RUN).expand_as(members)
    predicted = torch.where((j == 1) | (j == last - 1), near / 2, predicted)
    predicted = torch.where((j == 0) | (j == last), members, predicted)
    predicted = predicted * judged_count / members.clamp(min=1.0)  # the ranked share of a value's weights
    use = (lattice & ~flat).unsqueeze(1) & present
    where_bin, mass = low[use], predicted[use]
    on_code = float(mass[where_bin == on_code_bin].sum())
    counts.index_add_(0, where_bin[where_bin <= bins], mass[where_bin <= bins])
    judged[:n] = (lattice & ~flat).repeat_interleave(RUN)
    degenerate[:n] = (lattice & flat).repeat_interleave(RUN)
    return LatticeNull(judged.view(values.shape), degenerate.view(values.shape), counts, on_code)
