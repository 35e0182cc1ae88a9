"""Evidence of a quantization-conditioned backdoor in full-precision weights, from their rounding cells.

An attacker who projects weights into the interval that rounds to a chosen code leaves two traces:

- a pile of weights at the edge of that interval, a fixed small distance from the rounding boundary (box attacks on
  LLM.int8, NF4, FP4: Egashira et al. 2024), and
- weights pinned exactly on codes while their neighbours are not (error-based GGUF boxes [min(w, deq), max(w, deq)],
  Egashira et al. 2025).

Clean weights have a smooth density, so inside each cell the distance b = |position - 0.5| to the rounding boundary
is close to uniform. Rather than assume uniformity (bf16 checkpoints put weights on a coarse lattice, and a steep
density tilts cells), the null is built per weight from a *local decoy*: the same weight shifted by a few lattice steps
h = max(ulp of the checkpoint dtype, step / 64) to either side, positioned in the same cell geometry. A decoy sees the
same lattice and the same local density, but not the attacker's alignment. The score is the Kolmogorov distance
between the real and the decoy distributions of b (a pile near the boundary shows as excess at small b, a pile near
codes as a deficit below b = 0.5), plus the fraction of weights exactly on a code other than the grid's end codes
(where every block's absmax sits by construction): suspicious when partial, since a dequantized model has all its
weights on codes and a clean one almost none.

Weights that are exactly zero and on a code (zero is a code of every symmetric format) are left out of every count:
they round to zero under every rule, so they cannot carry a quantization-conditioned difference, and pruned or sparse
checkpoints hold many (a 2:4 sparse tensor half of its weights), which would otherwise read as weights pinned on an
interior code, with decoys piled next to it. Where zero is not a code (affine formats) zeros stay in the statistic.

With cell_score(own_lattice=True) (opt-in), a tensor whose runs repeat a few values (a checkpoint dequantized from
another format) is also judged against its own lattice, and flagged only when both nulls flag it: lattice_null.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .. import native
from ..formats.base import CodeValueRule, Encoding, Format, RoundingCells
from .lattice_null import holds_lattice_runs, lattice_null
from .precision import MANTISSA_BITS, storage_ulp
from .rescaled_grid import rescaled_grid_weights

__all__ = ["DECOY_SHIFTS", "CellScore", "Verdict", "cell_score", "repeated_fraction", "verdict"]

DECOY_SHIFTS = (-3, -2, -1, 1, 2, 3)
# Re-fitted decoys cost one encode each (a k-quant scale search): two shifts give the same null within 0.001 on clean
# bf16 and heavy-tailed weights, measured against all six.
REFIT_SHIFTS = (-2, 1)
_CDF_POINTS = 1024
_DECOY_RESOLUTION = 64  # decoy shifts are at least step / 64
_ON_CODE = 1e-5  # cells: a decoy this close to a code sits on it
# the bounds as a float32 tensor compares with them (a Python float operand is cast to the tensor's float32)
_ON_CODE_F32 = (float(np.float32(_ON_CODE)), float(np.float32(1.0 - _ON_CODE)))
_THRESHOLD = 0.02
_GRID_ALIGNED = 0.9  # share of weights at a code (to storage precision) above which a tensor is already on a grid
# One threshold, 0.02 of the weights, for every format since k-quants get re-fitted decoys (their clean distances
# dropped from up to 0.072 to below 0.007), measured on SmolLM2-135M (70 tensors per format, clean max 0.006:
# benchmarks/REAL_MODEL_RESULTS.md). The exception measured there: fp8_per_tensor on a checkpoint that already sits
# on a 4-bit lattice (Q4_1 dequantized), where one per-tensor scale makes the positions lumpy: clean distances to
# 0.036. Box attacks score far above (fp8_per_tensor in the efficacy harness: 0.44 to 0.61).
_FORMAT_THRESHOLDS: dict[str, float] = {"fp8_per_tensor": 0.05}
_FAMILY_THRESHOLDS: dict[str, float] = {}
# A checkpoint dequantized from another format holds a handful of values per block: measured share of weights that
# repeat a value within their run of 32, stored in bf16 / fp16 / fp32, on Gaussian, Laplace and Student-t(3) weights:
# continuous 0.00 to 0.03; dequantized from Q8_0 0.15 to 0.23, LLM.int8 0.21 to 0.54, fp8 0.28 to 0.34, Q6_K 0.25 to
# 0.34, 4-bit formats 0.85 to 0.89. On such lattices the local decoy null flags clean tensors under other formats
# (benchmarks/bench_detector_lattices.py); the verdict says so when it flags one (box attacks repeat values too).
_LATTICE_RUN = 32
_LATTICE_SAMPLE = 1 << 14  # weights read for the share: a verdict's note, not a statistic
_LATTICE_REPEATED = 0.10
# Weights of degenerate lattice runs (lattice_null.py: one offset per run, no evidence either way) above this share of
# the judged weights make a tensor suspicious: nothing else in it could be judged.
_UNJUDGED_MAX = 0.25
# The rescaled-grid test runs only where the distance or the pinned excess reach this (half the smallest threshold):
# below it no default verdict flags a tensor
_RESCALED_GRID_FROM = 0.01


def threshold_for(family: str, format_name: str | None = None) -> float:
    """The default detector threshold of a format (a share of weights, in CDF units)."""
    if format_name is not None and format_name in _FORMAT_THRESHOLDS:
        return _FORMAT_THRESHOLDS[format_name]
    return _FAMILY_THRESHOLDS.get(family, _THRESHOLD)


@dataclass(frozen=True)
class CellScore:
    """Per-tensor evidence. `distance` is in CDF units (0 clean, up to 1): real minus decoy CDF of b at its largest
    gap `at` (in cells from a rounding boundary). `on_grid_fraction` counts weights exactly on a code,
    `interior_on_grid_fraction` only those on codes other than the grid's two end codes, and
    `decoy_on_grid_fraction` how often decoys land exactly on a code (lattice coincidences: bf16 weights under a
    power-of-two scale hit fp8 codes one time in sixteen), and `near_code_fraction` the share of weights that are
    their nearest code's value to the checkpoint's precision (within half an ulp of its dtype: what a dequantized
    model re-rounded to bf16 holds), or clamped beyond the grid's ends."""

    format: str
    family: str
    elements: int
    off_grid: int
    distance: float
    at: float
    on_grid_fraction: float
    interior_on_grid_fraction: float
    decoy_on_grid_fraction: float
    near_code_fraction: float = 0.0
    #: the share of weights that are their nearest code's value times one factor per scale group, to the
    #: checkpoint's precision (rescaled_grid.py: a dequantized model whose scales do not survive re-encoding)
    rescaled_grid_fraction: float = 0.0
    steerable: int = 0  # weights whose cell has two distinct codes (RoundingCells.steerable)
    repeated_fraction: float = 0.0  # share of weights repeating a value within their run of 32 (repeated_fraction)
    zeros: int = 0  # weights exactly zero on a code: out of every count; the fractions are of the others
    lattice_fraction: float = 0.0  # share of the live weights judged against their own lattice (lattice_null.py)
    unjudged: int = 0  # weights of degenerate lattice runs: judged by neither null
    #: where the lattice null scored the tensor: its score against the local decoys alone (the verdict clears what
    #: that one clears: the lattice null only re-judges what the local decoys flag)
    local: CellScore | None = None

    @property
    def grid_aligned(self) -> bool:
        """Nearly every weight (90%) is a code's value to the checkpoint's precision: a model dequantized from this
        format or trained for it (QAT), possibly re-rounded to bf16 or fp16, or re-encoded where a k-quant's scale
        search does not return the scales it came from (the rest then sits off the new grid); or is so up to one
        factor per scale group near 1 (rescaled_grid_fraction), where re-encoding moved the scales. Cell positions
        say nothing about tampering there. An attacker cannot use this: weights within half a storage ulp of their
        codes make the full-precision model the quantized one, the backdoor included (up to that factor per group,
        which a block's largest weight sets anyway)."""
        return max(self.near_code_fraction, self.rescaled_grid_fraction) >= _GRID_ALIGNED

    @property
    def repeats_values(self) -> bool:
        """Many weights repeat a value within their block (repeated_fraction), as in a checkpoint dequantized from
        another format (under its own format it would be grid_aligned), whose cell positions follow the two grids'
        geometry, which the local decoys do not model: the detector flags clean tensors of such checkpoints (README,
        detection). Weights an attack clamped to its box edges repeat values too (simulated 4-bit box attacks: 23 to
        28%), so this is context for a flag, never a reason to clear one."""
        return not self.grid_aligned and self.repeated_fraction >= _LATTICE_REPEATED

    @property
    def noise_floor(self) -> float:
        """The excess clean weights reach by sampling alone (about 3 standard errors of a two-sample KS)."""
        return 3.0 / max(self.off_grid, 1) ** 0.5


@dataclass(frozen=True)
class Verdict:
    suspicious: bool
    reasons: tuple[str, ...]


def repeated_fraction(x: torch.Tensor) -> float:
    """Share of weights equal to another weight of their run of 32 consecutive weights (the first _LATTICE_SAMPLE
    weights of x, in whole runs): near 0 for continuous weights in any dtype, most of them on a 4-bit lattice."""
    n = min(x.numel(), _LATTICE_SAMPLE) // _LATTICE_RUN * _LATTICE_RUN
    if n == 0:
        return 0.0
    runs = x.reshape(-1)[:n].reshape(-1, _LATTICE_RUN).sort(dim=1).values
    equal = runs[:, 1:] == runs[:, :-1]
    repeated = torch.zeros_like(runs, dtype=torch.bool)
    repeated[:, 1:] |= equal
    repeated[:, :-1] |= equal
    return float(repeated.float().mean())


def _decoy_spacing(ulp: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """h per weight: the larger of the checkpoint's lattice spacing and 1/64 of the cell (so a decoy moves by a
    visible fraction of a cell even in float32)."""
    return torch.maximum(ulp, step.abs() / _DECOY_RESOLUTION)


@dataclass(frozen=True)
class _Tally:
    """What one counting pass over a tensor's cells finds (see _tally_reference for each count's rule)."""

    on_grid: int
    interior_on_grid: int
    near_code: int
    steerable: int
    live: int
    source: int
    decoy_on_code: float  # weighted where a lattice null stands in for decoys
    zeros: int  # weights exactly zero and on a code, left out of every other count
    live_counts: torch.Tensor  # boundary histogram of the live weights
    decoy_counts: torch.Tensor  # boundary histogram of the in-cell decoys (zeros when none were asked for)
    lattice_live: int = 0  # live weights judged by the lattice null
    unjudged: int = 0  # ranked weights of degenerate lattice runs (out of `live`)
    lattice_mask: torch.Tensor | None = None  # weights of lattice runs, degenerate ones included
    lattice_counts: torch.Tensor | None = None  # the lattice null's histogram (one unit per ranked weight)
    lattice_on_code: float = 0.0  # the lattice null's count of weights on interior codes


#: the code values (lo, hi, near, above) of each weight's lower, upper, nearest and next-interior code (near None: lo
#: stands in; above None: no in-cell decoys), or, for the native pass only, the format's rule for computing all four
_CodeValues = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | CodeValueRule


@dataclass(frozen=True)
class _Weights:
    """A counting pass's input: float32 `values` (a checkpoint of `dtype`) in their `cells`, their code values
    (_CodeValues) and the grid's end codes (bottom, top). `lattice`: judge runs that repeat values against their own
    lattice (lattice_null.py; the torch pass only). `exclude`: weights left out of the live histogram (the lattice
    runs, when re-fitted decoys are tallied)."""

    values: torch.Tensor
    dtype: torch.dtype
    cells: RoundingCells
    code_values: _CodeValues
    end_codes: tuple[int, int]
    lattice: bool = False
    exclude: torch.Tensor | None = None


def _tally(w: _Weights) -> _Tally:
    """The detector's counts over the weights. One native pass on a CPU where built (the same counts), else the torch
    reference."""
    if native.enabled(w.values) and not w.lattice and w.exclude is None:
        c = w.cells
        live_counts, decoy_counts, counts = native.cell_tally(
            w.values,
            (c.position, c.lower, c.upper, c.nearest),
            w.code_values,
            w.end_codes,
            (MANTISSA_BITS[w.dtype], torch.finfo(w.dtype).tiny),
            (DECOY_SHIFTS, *_ON_CODE_F32),
            _CDF_POINTS,
        )
        return _Tally(**counts, live_counts=live_counts, decoy_counts=decoy_counts)
    return _tally_reference(w)


def _tally_reference(w: _Weights) -> _Tally:
    """_tally in torch. A weight is on the grid when it equals one of its codes' values or sits within float32 noise
    of one (positions carry the rounding of the scale's reciprocal); live when its cell has two distinct codes of
    distinct values and it is not on the grid; near a code when on the grid, not steerable, or within half a storage
    ulp of its nearest code's value (what a dequantized model re-rounded to the checkpoint's dtype holds)."""
    values, dtype, cells = w.values, w.dtype, w.cells
    if isinstance(w.code_values, CodeValueRule):
        raise TypeError("the torch counting pass reads code-value tensors; a CodeValueRule is for the native pass")
    lo, hi, near, above = w.code_values
    near = lo if near is None else near
    bottom, top = w.end_codes
    at_code = (cells.position < _ON_CODE) | (cells.position > 1.0 - _ON_CODE)
    on_grid = (values == near) | (values == lo) | (values == hi) | at_code
    end_code = (cells.nearest == bottom) | (cells.nearest == top)
    steerable = cells.steerable
    live = steerable & ~on_grid & ((hi - lo).abs() > 0)
    if w.exclude is not None:
        live &= ~w.exclude
    zero = on_grid & (values == 0)  # a zero on a code: left out of every count but `zeros`
    on_grid &= ~zero
    ulp = storage_ulp(values, dtype)  # the checkpoint's lattice spacing per weight, computed once
    near_code = ~zero & (on_grid | ~steerable | ((values - near).abs() <= 0.5 * ulp))
    lattice, lattice_fields, unjudged = None, {}, torch.zeros_like(on_grid)
    if w.lattice:
        ranked = live | (on_grid & ~end_code)
        lattice = lattice_null(values, cells.position, live, ranked, _CDF_POINTS)
        # no evidence either way: judged by neither null (nor the pinned count: a run all on codes is its own
        # quantization), counted apart
        unjudged = lattice.degenerate
        live &= ~unjudged
        lattice_fields = {
            "lattice_live": int((lattice.judged & live).count_nonzero()),
            "unjudged": int((lattice.degenerate & ranked).count_nonzero()),
            "lattice_mask": lattice.judged | lattice.degenerate,
            "lattice_counts": lattice.counts,
            "lattice_on_code": lattice.on_code,
        }
    decoy_counts, source, decoy_on_code = torch.zeros(_CDF_POINTS + 1, dtype=torch.int64), 0, 0
    if above is not None:
        # Decoy sources: every live weight, and every weight on an interior code (position 0 in the cell toward the
        # code next to it, `above`). Leaving the on-code ones out would thin the decoys next to codes.
        pinned_step = above - near
        sources = live | (on_grid & ~end_code & (pinned_step != 0))
        if lattice is not None:  # lattice runs bring their own null
            sources &= ~lattice_fields["lattice_mask"]
        step = torch.where(sources, torch.where(live, hi - lo, pinned_step), 1.0)
        p = torch.where(live, cells.position, torch.zeros_like(cells.position))
        shift = _decoy_spacing(ulp, step) / step  # in cells, signed like the cell's orientation
        decoy_counts, decoy_on_code = _decoy_counts_reference(p, shift, sources)
        source = int(sources.count_nonzero())
        if lattice is not None:  # one lattice-null unit stands for one ranked weight, as six decoys do for a source
            decoy_counts = decoy_counts.double() + len(DECOY_SHIFTS) * lattice.counts
            decoy_on_code += len(DECOY_SHIFTS) * lattice.on_code
            source += int((lattice.judged & ranked).count_nonzero())
    return _Tally(
        on_grid=int(on_grid.count_nonzero()),
        interior_on_grid=int((on_grid & ~end_code & ~unjudged).count_nonzero()),
        near_code=int(near_code.count_nonzero()),
        steerable=int(steerable.count_nonzero()),
        live=int(live.count_nonzero()),
        source=source,
        decoy_on_code=decoy_on_code,
        zeros=int(zero.count_nonzero()),
        live_counts=_boundary_counts_reference(cells.position, live),
        decoy_counts=decoy_counts,
        **lattice_fields,
    )


def _boundary_counts_reference(position: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Histogram of b = |position - 0.5| over the kept elements, on the CDF grid: bin k holds the values in
    ((k - 1) / (2 * _CDF_POINTS), k / (2 * _CDF_POINTS)]. ceil(b * 2 * _CDF_POINTS) is exact in float32
    (power-of-two scaling). A counting pass over masks (no sort, no gather); dropped elements go to a spill bin."""
    index = (position - 0.5).abs_().mul_(2 * _CDF_POINTS).ceil_().to(torch.int32).clamp_(0, _CDF_POINTS)
    index.masked_fill_(~keep, _CDF_POINTS + 1)  # in place, int32: this pass runs 7 times per score (2.3x faster)
    return torch.bincount(index.reshape(-1), minlength=_CDF_POINTS + 2)[: _CDF_POINTS + 1]


def _cdf(counts: torch.Tensor) -> torch.Tensor:
    """Share of the counted values at or below each grid point k / (2 * _CDF_POINTS), k = 1.._CDF_POINTS."""
    return (counts.cumsum(0)[1:].double() / max(float(counts.sum()), 1.0)).float()


def _decoy_counts_reference(p: torch.Tensor, shift: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Boundary histogram of the decoys p + k * shift (k in DECOY_SHIFTS, wrapped into the cell) of the source
    weights, and how many decoys sit on a code (those are not binned)."""
    counts = torch.zeros(_CDF_POINTS + 1, dtype=torch.int64)
    on_code_total = 0
    p, shift = p[source], shift[source]  # the sources only (lattice runs bring their own null)
    for k in DECOY_SHIFTS:
        decoy = torch.remainder(p + k * shift, 1.0)
        # Within float32 noise of a code counts as on it, for real weights and decoys alike.
        on_code = (decoy < _ON_CODE) | (decoy > 1.0 - _ON_CODE)
        counts += _boundary_counts_reference(decoy, ~on_code)
        on_code_total += int(on_code.count_nonzero())
    return counts, on_code_total


def _refit_decoys(
    values: torch.Tensor,
    dtype: torch.dtype,
    fmt: Format,
    enc: Encoding,
    lo: torch.Tensor,
    hi: torch.Tensor,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Decoys for formats that fit their scales to the block (k-quants): the whole tensor shifted by k * h and
    quantized again, scale search included. A clean tensor's fit pulls weights toward codes (Q6_K weighs its fit
    by x^2: Kolmogorov distances to 0.07 against fixed-scale decoys on clean bf16 weights); the re-fitted decoys carry
    the same pull, an attacker's alignment does not survive the shift. Exact zeros are not shifted: a pruned tensor's
    zeros sit at one position per block where zero is not a code (the affine k-quants), which shifted copies would
    smear into a false excess (Q2_K, 2:4 sparse: 0.018 median); zeros cannot carry more than one shared offset per
    block. Costs one encode per shift. `exclude`: weights whose decoys are not binned (lattice runs, judged by their
    own null)."""
    step = (hi - lo).abs()
    fallback = step[step > 0].median() if bool((step > 0).any()) else torch.ones((), dtype=step.dtype)
    h = _decoy_spacing(storage_ulp(values, dtype), torch.where(step > 0, step, fallback))
    big = torch.finfo(torch.float32).max
    counts = torch.zeros(_CDF_POINTS + 1, dtype=torch.int64)
    on_grid = []
    zero = values == 0
    for k in REFIT_SHIFTS:
        shifted = torch.where(zero, values, values + k * h).clamp(-big, big)
        denc = fmt.encode(shifted)
        c = denc.cells
        dlo, dhi = fmt.code_values(denc, c.lower), fmt.code_values(denc, c.upper)
        # the decoy's live weights and interior on-grid share, counted as for the real weights (float32 lattice)
        ends = (int(c.nearest.min()), int(c.nearest.max()))
        t = _tally(_Weights(shifted, torch.float32, c, (dlo, dhi, None, None), ends, exclude=exclude))
        counts += t.live_counts
        on_grid.append(t.interior_on_grid / max(shifted.numel() - t.zeros, 1))
    return counts, sum(on_grid) / len(on_grid)


def cell_score(
    x: torch.Tensor, fmt: Format, name: str = "tensor", enc: Encoding | None = None, *, own_lattice: bool = False
) -> CellScore:
    """Score one tensor under one target format (the format whose quantizer an attacker would target).

    `enc` is fmt.encode(x) when the caller already has it (hardening does). `own_lattice` (experimental, off by
    default; HardeningConfig.detector_lattice_null, the scans' --lattice-null): a tensor with runs that repeat a few
    values is scored twice, against the local decoys alone (`local`) and with those runs judged against their own
    lattice (lattice_null.py); the verdict flags it only when both flag it. The local decoys flag most clean
    checkpoints dequantized from another format (README, detection limits), the lattice null some whose level counts
    are too peaked for it."""
    enc = enc if enc is not None else fmt.encode(x, name)
    if own_lattice and holds_lattice_runs(x.float()):
        return replace(_score(x, fmt, name, enc, lattice=True), local=_score(x, fmt, name, enc, lattice=False))
    return _score(x, fmt, name, enc, lattice=False)


def _score(x: torch.Tensor, fmt: Format, name: str, enc: Encoding, lattice: bool) -> CellScore:
    """cell_score's body: `lattice` judges the lattice runs by their own null (the torch pass)."""
    cells = enc.cells
    values = x.float()
    bottom, top = cells.nearest.aminmax()
    bottom, top = int(bottom), int(top)
    rule = fmt.code_value_rule(enc) if native.enabled(values) and not fmt.fits_scales and not lattice else None
    if rule is not None:  # the native pass computes the four code values itself
        code_values: _CodeValues = rule
    else:
        lo, hi = fmt.code_values(enc, cells.lower), fmt.code_values(enc, cells.upper)
        nearest = torch.where(cells.nearest == cells.lower, lo, hi)  # the nearest code is its cell's lower or upper
        above = None
        if not fmt.fits_scales:  # in-cell decoys (scales held fixed) need the code next to each on-code weight's
            above = fmt.code_values(enc, torch.where(cells.nearest < top, cells.nearest + 1, cells.nearest - 1))
        code_values = (lo, hi, nearest, above)
    t = _tally(_Weights(values, x.dtype, cells, code_values, (bottom, top), lattice=lattice))
    n = x.numel()
    judged = n - t.zeros  # the fractions are of the weights not exactly zero on a code
    if judged == 0:  # nothing but zeros: every weight is its code's value
        return CellScore(fmt.name, fmt.family, n, 0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, t.steerable, 0.0, t.zeros)
    fractions = (t.on_grid / judged, t.interior_on_grid / judged)
    common = {
        "format": fmt.name,
        "family": fmt.family,
        "elements": n,
        "on_grid_fraction": fractions[0],
        "interior_on_grid_fraction": fractions[1],
        "near_code_fraction": t.near_code / judged,
        "steerable": t.steerable,
        "repeated_fraction": repeated_fraction(values),
        "zeros": t.zeros,
        "lattice_fraction": t.lattice_live / max(t.live, 1),
        "unjudged": t.unjudged,
    }
    if t.live == 0:
        score = CellScore(off_grid=0, distance=0.0, at=0.0, decoy_on_grid_fraction=0.0, **common)
        return _rescaled_grid(score, values, x.dtype, fmt, enc, rule)
    if fmt.fits_scales:
        decoy_counts, decoy_on_grid = _refit_decoys(values, x.dtype, fmt, enc, lo, hi, t.lattice_mask)
        if t.lattice_counts is not None:  # lattice runs: their own null, on codes too
            decoy_counts = decoy_counts.double() + len(REFIT_SHIFTS) * t.lattice_counts
            in_lattice = int(t.lattice_mask.count_nonzero()) / n
            decoy_on_grid = decoy_on_grid * (1.0 - in_lattice) + t.lattice_on_code / judged
    else:
        decoy_counts, decoy_on_grid = t.decoy_counts, t.decoy_on_code / max(len(DECOY_SHIFTS) * t.source, 1)
    grid = torch.linspace(0, 0.5, _CDF_POINTS + 1, dtype=torch.float32)[1:]
    excess = _cdf(t.live_counts) - _cdf(decoy_counts)
    at = int(torch.argmax(excess.abs()))
    score = CellScore(
        off_grid=t.live,
        distance=float(excess[at]),
        at=float(grid[at]),
        decoy_on_grid_fraction=decoy_on_grid,
        **common,
    )
    return _rescaled_grid(score, values, x.dtype, fmt, enc, rule)


def _rescaled_grid(
    score: CellScore,
    values: torch.Tensor,
    dtype: torch.dtype,
    fmt: Format,
    enc: Encoding,
    rule: CodeValueRule | None,
) -> CellScore:
    """score with its rescaled_grid_fraction (rescaled_grid.py), for a tensor that repeats values without sitting on
    this grid (continuous weights never need it) and that the default verdict could flag: its distance or pinned
    excess at least half the smallest default threshold, or weights left unjudged (the others pass anyway, and the
    test costs a few milliseconds per tensor; a caller's lower threshold can only flag more)."""
    pinned = score.interior_on_grid_fraction - score.decoy_on_grid_fraction
    could_flag = max(abs(score.distance), pinned) >= _RESCALED_GRID_FROM or score.unjudged > 0
    if score.grid_aligned or score.repeated_fraction < _LATTICE_REPEATED or not could_flag:
        return score
    rule = rule or fmt.code_value_rule(enc)
    if rule is None:
        return score
    judged = values != 0
    on_rescaled, read = rescaled_grid_weights(values, enc.cells.nearest, rule, dtype, judged, first_look=True)
    if on_rescaled >= _GRID_ALIGNED * read and read < int(judged.count_nonzero()):  # aligned on all weights, or not
        on_rescaled, read = rescaled_grid_weights(values, enc.cells.nearest, rule, dtype, judged)
    return replace(score, rescaled_grid_fraction=on_rescaled / max(read, 1))


def verdict(
    score: CellScore, threshold: float | None = None, partial_grid: tuple[float, float] = (0.02, 0.98)
) -> Verdict:
    """Suspicious when the real cell positions depart from the decoy's beyond both the threshold and the sampling
    noise floor, or when a partial share of weights, beyond what the decoys hit by lattice coincidence, sits exactly
    on interior codes (all of them on codes is a dequantized model: not a backdoor). A grid-aligned tensor (see
    CellScore.grid_aligned) is not judged. Suspicious too when most weights sit in degenerate lattice runs
    (lattice_null.py), which neither null can judge. A score that carries its `local` twin (cell_score's
    own_lattice) is suspicious only when that twin is too."""
    if score.grid_aligned:
        return Verdict(False, ())
    if score.local is not None and not verdict(score.local, threshold, partial_grid).suspicious:
        return Verdict(False, ())  # the local decoys pass it: the lattice null only re-judges their flags
    reasons = []
    threshold = threshold_for(score.family, score.format) if threshold is None else threshold
    if abs(score.distance) > max(threshold, score.noise_floor):
        reasons.append(
            f"cell positions depart from the decoy null by {abs(score.distance):.1%} of weights "
            f"(largest gap {score.at:.3f} cell from a rounding boundary)"
        )
    low, high = partial_grid
    pinned = score.interior_on_grid_fraction - score.decoy_on_grid_fraction
    if pinned > low and score.on_grid_fraction < high:
        reasons.append(
            f"{score.interior_on_grid_fraction:.1%} of weights sit exactly on interior {score.format} codes "
            f"(decoys: {score.decoy_on_grid_fraction:.1%})"
        )
    unjudged = score.unjudged / max(score.elements - score.zeros, 1)
    if unjudged > _UNJUDGED_MAX:
        reasons.append(
            f"{unjudged:.1%} of weights sit on a lattice at one distance from the rounding boundary per run of 32 "
            "(each weight its code plus one offset per run), which no null here can judge"
        )
    if reasons and score.repeats_values:
        null = (
            "judged here against its own lattice"
            if score.lattice_fraction > 0
            else "which the local decoys flag even when clean; the lattice null (--lattice-null, "
            "detector_lattice_null) judges such runs against their own lattice"
        )
        reasons.append(
            f"caution: {score.repeated_fraction:.0%} of weights repeat a value within their run of 32, as in a "
            f"checkpoint dequantized from another format ({null}) or weights clamped to an attack's box edges: "
            "check where the checkpoint came from"
        )
    return Verdict(bool(reasons), tuple(reasons))
