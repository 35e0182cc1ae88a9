"""Hardening settings, validated once, shared by the vLLM hook and the GGUF tool."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..detection.sampling import DETECTOR_SAMPLE, MIN_DETECTOR_SAMPLE
from ..errors import QcbguardError

__all__ = ["ALGORITHM_VERSION", "MODES", "ON_SUSPICIOUS", "HardeningConfig"]

#: recorded next to hardened outputs; bump when the codes a seed produces change
ALGORITHM_VERSION = "qcbguard-sr-philox4x32-v2"  # v2: one Philox counter per four columns (rng.py)
MODES = ("harden", "detect-only")
ON_SUSPICIOUS = ("report", "refuse")


@dataclass(frozen=True)
class HardeningConfig:
    """What to do with each tensor.

    mode: "harden" re-draws every rounding at random over its cell (default); "detect-only" packs exactly what the
        standard quantizer would and only reports.
    on_suspicious: "report" (default) flags tensors the detector finds suspicious; "refuse" stops with an error.
    seed_file: a seed file (64 hex characters, mode 600) for reproducible output; None draws a fresh seed per run.
    detector_threshold: Kolmogorov distance (share of weights) above which a tensor is suspicious; None uses each
        format family's default (detection.threshold_for).
    detector_sample: weights the detector reads per tensor at most (whole-row runs, detection.sampling); more reads
        more of each tensor, at a proportional cost in load or quantize time.
    detector_lattice_null: judge runs that repeat a few values against their own lattice (experimental, off by
        default; detection/lattice_null.py): far fewer false alarms on checkpoints dequantized from another format
        (a QAT or GGUF-derived model served in another format); costs a torch pass on such tensors.
    """

    mode: str = "harden"
    on_suspicious: str = "report"
    seed_file: str | None = None
    detector_threshold: float | None = None
    detector_sample: int = DETECTOR_SAMPLE
    detector_lattice_null: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise QcbguardError(f"unknown hardening mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.on_suspicious not in ON_SUSPICIOUS:
            raise QcbguardError(
                f"unknown on_suspicious policy {self.on_suspicious!r}; choose one of {', '.join(ON_SUSPICIOUS)}"
            )
        if self.detector_threshold is not None and not 0.0 < self.detector_threshold < 1.0:
            raise QcbguardError(f"detector_threshold must lie in (0, 1), got {self.detector_threshold}")
        sample = self.detector_sample
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < MIN_DETECTOR_SAMPLE:
            raise QcbguardError(f"detector_sample must be an integer of at least {MIN_DETECTOR_SAMPLE}, got {sample!r}")
        if not isinstance(self.detector_lattice_null, bool):
            raise QcbguardError(f"detector_lattice_null must be true or false, got {self.detector_lattice_null!r}")

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> HardeningConfig:
        """Build from user settings (JSON, CLI); unknown keys are refused, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise QcbguardError(f"unknown qcbguard setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**settings)
