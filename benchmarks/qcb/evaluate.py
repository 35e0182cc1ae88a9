"""What a model does once a deployment quantizes it: standard rounding, qcbguard's hardening, and the baselines.

Every evaluation swaps the quantizable linear weights of a model for the values the deployment would run, scores
ASR and accuracy on a fixed prompt set, and puts the full-precision weights back:

- "fp": the checkpoint as is;
- "rtn": fmt.dequantize(fmt.quantize(w)), the standard quantizer (round to nearest, bit-exact with the real one);
- "harden": fmt.dequantize of qcbguard's harden_tensor(w, fmt, name, seed), one DeploymentSeed per draw;
- "calibrated": the same with harden_calibrated (error feedback along each weight's input Hessian, which the
  defender collects by running the delivered full-precision model on its own benign prompts: calibration_hessians);
- "noise": round to nearest after adding N(0, sigma^2) to every weight (Egashira et al. 2024's defense);
- "flip": deterministic flipping near the boundary: a weight within `band` cells of its rounding boundary
  (|position - 0.5| < band) takes the other code of its cell (a public, deterministic rule).
"""

from __future__ import annotations

import contextlib
import hashlib
import statistics
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qcbguard.calibration import collect_hessians
from qcbguard_kernels import Format
from qcbguard_kernels.detection import cell_score, verdict
from qcbguard_kernels.hardening import DeploymentSeed, harden_calibrated, harden_tensor

from .model import quantizable_linears
from .task import DigitReversalTask, Score

__all__ = [
    "DetectorSummary",
    "Draws",
    "bench_seeds",
    "calibration_hessians",
    "deployed_weights",
    "detector_summary",
    "score_deployment",
    "swapped",
]


def bench_seeds(n: int, label: str = "qcb-efficacy") -> list[DeploymentSeed]:
    """n deployment seeds, derived from public labels so that a benchmark run is reproducible (a real deployment
    draws its seed from the OS and keeps it secret: the attacker never knows it)."""
    return [DeploymentSeed(hashlib.sha256(f"{label}/{i}".encode()).digest()) for i in range(n)]


@contextlib.contextmanager
def swapped(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """The model with its quantizable weights replaced, restored on exit."""
    params = quantizable_linears(model)
    saved = {n: params[n].detach().clone() for n in weights}
    try:
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        yield model
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


def calibration_hessians(
    model: torch.nn.Module, task: DigitReversalTask, generator: torch.Generator, prompts: int = 512
) -> dict[str, torch.Tensor]:
    """H = sum of x x^T over the inputs of every quantizable weight while the model reads `prompts` benign prompts
    with their benign answers (the defender's calibration data: it never holds the injected answers)."""
    batch = task.batch(prompts, generator).input_ids
    return collect_hessians(model, [batch], list(quantizable_linears(model)))


def _flip_codes(fmt: Format, w: torch.Tensor, name: str, band: float) -> torch.Tensor:
    enc = fmt.encode(w, name)
    cells = enc.cells
    near_boundary = cells.steerable & ((cells.position - 0.5).abs() < band)
    other = torch.where(cells.nearest == cells.lower, cells.upper, cells.lower)
    return fmt.code_values(enc, torch.where(near_boundary, other, cells.nearest))


def deployed_weights(
    model: torch.nn.Module,
    fmt: Format | None,
    mode: str,
    *,
    seed: DeploymentSeed | None = None,
    sigma: float = 0.0,
    generator: torch.Generator | None = None,
    band: float = 0.0,
    hessians: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The values a deployment runs for every quantizable weight (see the module docstring for the modes)."""
    out = {}
    for name, p in quantizable_linears(model).items():
        w = p.detach().float()
        if mode == "fp":
            out[name] = w.clone()
        elif fmt is None:
            raise ValueError(f"mode {mode!r} needs a format")
        elif mode == "rtn":
            out[name] = fmt.dequantize(fmt.quantize(w, name))
        elif mode == "harden":
            if seed is None:
                raise ValueError("mode 'harden' needs a DeploymentSeed")
            packed, _ = harden_tensor(w, fmt, name, seed)
            out[name] = fmt.dequantize(packed)
        elif mode == "calibrated":
            if seed is None or hessians is None:
                raise ValueError("mode 'calibrated' needs a DeploymentSeed and the calibration Hessians")
            packed, _ = harden_calibrated(w, fmt, name, seed, hessians[name])
            out[name] = fmt.dequantize(packed)
        elif mode == "noise":
            noisy = w + sigma * torch.randn(w.shape, generator=generator)
            out[name] = fmt.dequantize(fmt.quantize(noisy, name))
        elif mode == "flip":
            out[name] = _flip_codes(fmt, w, name, band)
        else:
            raise ValueError(f"unknown deployment mode {mode!r}")
    return out


@dataclass(frozen=True)
class Draws:
    """Scores over several random draws (seeds) of one randomized deployment."""

    scores: tuple[Score, ...]

    @property
    def asr_mean(self) -> float:
        return statistics.fmean(s.asr for s in self.scores)

    @property
    def asr_max(self) -> float:
        return max(s.asr for s in self.scores)

    @property
    def accuracy_mean(self) -> float:
        return statistics.fmean(s.accuracy for s in self.scores)

    @property
    def accuracy_min(self) -> float:
        return min(s.accuracy for s in self.scores)

    @property
    def perplexity_mean(self) -> float:
        return statistics.fmean(s.perplexity for s in self.scores)


def score_deployment(
    model: torch.nn.Module,
    task: DigitReversalTask,
    eval_digits: torch.Tensor,
    fmt: Format | None,
    mode: str,
    *,
    seeds: list[DeploymentSeed] | None = None,
    sigma: float = 0.0,
    band: float = 0.0,
    draws: int = 1,
    noise_seed: int = 0,
    hessians: dict[str, torch.Tensor] | None = None,
) -> Draws:
    """Score `model` as deployed in `mode`: one draw per seed for "harden" and "calibrated" (which needs the
    model's calibration `hessians`), `draws` noise draws for "noise"."""
    if mode in ("harden", "calibrated"):
        if not seeds:
            raise ValueError(f"mode {mode!r} needs at least one seed")
        configs = [{"seed": s, "hessians": hessians} if mode == "calibrated" else {"seed": s} for s in seeds]
    elif mode == "noise":
        configs = [{"sigma": sigma, "generator": torch.Generator().manual_seed(noise_seed + i)} for i in range(draws)]
    else:
        configs = [{"band": band}]
    scores = []
    for kw in configs:
        with swapped(model, deployed_weights(model, fmt, mode, **kw)):
            scores.append(task.score(model, eval_digits))
    return Draws(tuple(scores))


@dataclass(frozen=True)
class DetectorSummary:
    """The detector over every quantizable tensor of one model, for one target format."""

    flagged: int
    tensors: int
    max_distance: float  # largest |Kolmogorov distance| over tensors
    max_interior_on_grid: float

    def cell(self) -> str:
        return f"{self.flagged}/{self.tensors} ({self.max_distance:.3f})"


def detector_summary(model: torch.nn.Module, fmt: Format) -> DetectorSummary:
    """cell_score and verdict (default thresholds) on every quantizable weight of `model` under `fmt`."""
    flagged = 0
    distances = []
    on_grid = []
    params = quantizable_linears(model)
    for name, p in params.items():
        score = cell_score(p.detach().float(), fmt, name)
        flagged += verdict(score).suspicious
        distances.append(abs(score.distance))
        on_grid.append(score.interior_on_grid_fraction)
    return DetectorSummary(flagged, len(params), max(distances), max(on_grid))
