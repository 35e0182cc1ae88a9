"""Hardening: the standard quantizer's scales, with every rounding decision drawn at random over its cell.

For a weight at position p in its cell (p = 0 on the lower code, 1 on the upper), the hardened code is the upper one
with probability p: unbiased stochastic rounding, E[value] = weight. An attacker who parks weights near one edge of a
cell so that round-to-nearest lands on a chosen code now gets that code only with the probability the weight's
position gives, from randomness keyed by a secret seed they cannot predict. The scales are left exactly as the
standard quantizer computes them, so the output is a valid tensor of the format, packed in its native layout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .. import native
from ..detection import DETECTOR_SAMPLE, CellScore, Verdict, cell_score, sample_rows, verdict
from ..errors import QcbguardError
from ..formats.base import Encoding, Format, QuantizedTensor
from .config import HardeningConfig
from .rng import uniform_grid
from .seed import DeploymentSeed

__all__ = [
    "Screened",
    "SuspiciousTensorError",
    "TensorReport",
    "change_stats",
    "detector_sample_key",
    "detector_score",
    "harden_encoding",
    "harden_tensor",
    "screen",
    "stochastic_codes",
    "tensor_report",
]


class SuspiciousTensorError(QcbguardError):
    """The detector flagged a tensor and the policy is to refuse."""


@dataclass(frozen=True)
class TensorReport:
    """What hardening changed in one tensor (no secret in here: safe to log and export)."""

    name: str
    format: str
    mode: str
    elements: int
    steerable: int
    codes_changed: int
    mean_change_steps: float
    max_change_steps: int
    detector_distance: float
    detector_sampled: int  # weights the detector read (its sample: the whole tensor when small)
    on_grid_fraction: float
    suspicious: bool
    reasons: tuple[str, ...]
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


#: screen()'s result for one tensor: the detector's score and the verdict on it
Screened = tuple[CellScore, Verdict]

#: elements drawn per Philox pass in torch (whole rows, at least one): ten rounds of a dozen int64 ops stay in cache
#: (8x faster than one whole-tensor pass on 4M weights, measured); the draws depend only on the coordinates, so
#: chunking changes no bit
_PHILOX_CHUNK = 1 << 16


def stochastic_codes(enc: Encoding, key: int, row_offset: int = 0, col_offset: int = 0) -> torch.Tensor:
    """Codes drawn per element: upper with probability `position`, from the uniform of its global (row, col)
    (rng.uniform_grid: word col % 4 of Philox(key, (col // 4, row, 0, 0))).

    Leading dimensions flatten into rows, the last is columns; (row, col) are global coordinates in the full tensor
    (offsets place a shard). The 24-bit uniform u and the float32 position compare exactly, so P(upper) = position
    rounded to 2**-24 and the draw for an element depends only on the key and its global coordinates (not on
    chunking, device or sharding).
    """
    cells = enc.cells
    shape = enc.shape
    cols = shape[-1] if len(shape) else 1
    rows = shape.numel() // cols if cols else 0
    if rows + row_offset > 2**32 or cols + col_offset > 2**32:
        raise ValueError("tensor coordinates must stay below 2**32 (Philox counters are 32-bit)")
    position = cells.position.reshape(rows, cols)
    if native.enabled(position):  # the same draws and choices in one pass (native/philox.c)
        lower, upper = cells.lower.reshape(rows, cols), cells.upper.reshape(rows, cols)
        return native.stochastic_codes(key, row_offset, col_offset, position, lower, upper).reshape(shape)
    upper = torch.empty((rows, cols), dtype=torch.bool)
    step = max(1, _PHILOX_CHUNK // max(cols, 1))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        u = uniform_grid(key, start + row_offset, n, col_offset, cols)
        upper[start : start + n] = u < position[start : start + n]
    return torch.where(upper.reshape(shape), cells.upper, cells.lower)


def detector_sample_key(seed: DeploymentSeed, name: str) -> int:
    """The key that picks the detector's sample rows of a tensor (detection.sampling) under a deployment seed: the
    seed's key of a name of its own, independent of the tensor's Philox key."""
    return seed.key_for(f"qcbguard.detector-sample/{name}")


def detector_score(
    x: torch.Tensor,
    fmt: Format,
    name: str,
    enc: Encoding | None = None,
    budget: int = DETECTOR_SAMPLE,
    key: int | None = None,
    own_lattice: bool = False,
) -> CellScore:
    """cell_score of x on the detector's sample (detection.sample_rows: at most `budget` weights, rows drawn with
    `key` or, without one, evenly spread), on the CPU wherever x lives; enc = fmt.encode(x) is reused when given and
    the sample is the whole tensor, else the sample is encoded. `own_lattice`: cell_score's lattice null."""
    sample = sample_rows(x, budget, key)
    if sample is x and enc is not None:
        return cell_score(x, fmt, name, enc, own_lattice=own_lattice)
    return cell_score(sample.detach().cpu(), fmt, name, own_lattice=own_lattice)


def screen(
    x: torch.Tensor,
    fmt: Format,
    name: str,
    config: HardeningConfig,
    enc: Encoding | None = None,
    seed: DeploymentSeed | None = None,
) -> Screened:
    """The detector's score and verdict for x, on sample rows drawn with the deployment seed (detector_sample_key;
    evenly spread without one); under on_suspicious="refuse" a flagged tensor raises SuspiciousTensorError (before
    anything is quantized)."""
    key = None if seed is None else detector_sample_key(seed, name)
    score = detector_score(x, fmt, name, enc, config.detector_sample, key, config.detector_lattice_null)
    judged = verdict(score, threshold=config.detector_threshold)
    if judged.suspicious and config.on_suspicious == "refuse":
        raise SuspiciousTensorError(f"tensor {name!r} looks tampered for {fmt.name}: {'; '.join(judged.reasons)}")
    return score, judged


def harden_tensor(
    x: torch.Tensor,
    fmt: Format,
    name: str,
    seed: DeploymentSeed,
    config: HardeningConfig | None = None,
    *,
    row_offset: int = 0,
    col_offset: int = 0,
    screened: Screened | None = None,
) -> tuple[QuantizedTensor, TensorReport]:
    """Quantize x in `fmt` as the config says; returns the packed tensor and what changed vs round-to-nearest.

    `name` keys the randomness (use the tensor's name in the checkpoint); `row_offset`/`col_offset` place a shard in
    the full tensor, so that every tensor-parallel rank draws what a single rank would for the same element.
    The detector runs first: under on_suspicious="refuse" a flagged tensor raises SuspiciousTensorError. A caller
    that quantizes a tensor in row chunks screens the whole tensor once and passes `screened` (screen()'s result)
    with every chunk instead.
    """
    start = time.perf_counter()
    enc = fmt.encode(x, name)
    place = {"row_offset": row_offset, "col_offset": col_offset}
    return harden_encoding(x, enc, fmt, name, seed, config, **place, started=start, screened=screened)


def harden_encoding(
    x: torch.Tensor,
    enc: Encoding,
    fmt: Format,
    name: str,
    seed: DeploymentSeed,
    config: HardeningConfig | None = None,
    *,
    row_offset: int = 0,
    col_offset: int = 0,
    started: float | None = None,
    draw: Callable[[Encoding, int], torch.Tensor] | None = None,
    screened: Screened | None = None,
) -> tuple[QuantizedTensor, TensorReport]:
    """harden_tensor for a caller that already holds enc = fmt.encode(x, name) (and wants it: RTN values, cells).

    `started` is the perf_counter() reading the report's seconds count from (default: now, encoding not counted).
    `draw(enc, key)` replaces stochastic_codes(enc, key, row_offset, col_offset) where one tensor's rows are not one
    block of the full tensor (the vLLM hook's fused, tensor-parallel shards). `screened`: as in harden_tensor.
    """
    config = config or HardeningConfig()
    start = time.perf_counter() if started is None else started
    score, judged = screened if screened is not None else screen(x, fmt, name, config, enc, seed)
    if config.mode == "harden":
        key = seed.key_for(name)
        codes = draw(enc, key) if draw is not None else stochastic_codes(enc, key, row_offset, col_offset)
    else:
        codes = enc.cells.nearest
    packed = fmt.pack(enc, codes)
    changed, mean_change, max_change = change_stats(codes, enc.cells.nearest)
    report = tensor_report(
        name,
        fmt,
        config,
        (score, judged),
        start,
        elements=x.numel(),
        steerable=int(enc.cells.steerable.count_nonzero()),
        codes_changed=changed,
        mean_change_steps=mean_change,
        max_change_steps=max_change,
    )
    return packed, report


def change_stats(codes: torch.Tensor, nearest: torch.Tensor) -> tuple[int, float, int]:
    """Codes that differ from round-to-nearest, the mean |change| in steps and its largest value. A stochastic code
    is one of its cell's two codes, so every change is one step and the mean is the changed share: counted with
    count_nonzero (CPU torch sums integers 25x slower than it counts them); other changes take the exact int64 sum."""
    if codes.numel() == 0:
        return 0, 0.0, 0
    change = (codes - nearest).abs_()
    changed = int(change.count_nonzero())
    largest = int(change.max())
    total = changed if largest <= 1 else int(change.sum(dtype=torch.int64))
    return changed, total / codes.numel(), largest


def tensor_report(
    name: str,
    fmt: Format,
    config: HardeningConfig,
    screened: Screened,
    started: float,
    *,
    elements: int,
    steerable: int,
    codes_changed: int,
    mean_change_steps: float,
    max_change_steps: int,
) -> TensorReport:
    """The report of one hardened tensor: the counts from the path that quantized it, the detector's fields from
    screen(), seconds since `started`."""
    score, judged = screened
    return TensorReport(
        name=name,
        format=fmt.name,
        mode=config.mode,
        elements=elements,
        steerable=steerable,
        codes_changed=codes_changed,
        mean_change_steps=mean_change_steps,
        max_change_steps=max_change_steps,
        detector_distance=score.distance,
        detector_sampled=score.elements,
        on_grid_fraction=score.on_grid_fraction,
        suspicious=judged.suspicious,
        reasons=judged.reasons,
        seconds=time.perf_counter() - started,
    )
