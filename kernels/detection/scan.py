"""Model-level scan: every weight tensor scored under every target format an attacker could have aimed at.

A QCB targets one format, and the defender does not know which, so a scan scores each tensor under a set of formats
and flags the tensor when any of them does. The model verdict is suspicious when any tensor is flagged: thresholds are
per tensor (detection.threshold_for), set from the false-positive rates measured on clean real models.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedInputError
from ..formats import format_names, get_format
from ..formats.base import SUPPORTED_INPUT_DTYPES, Format
from .cell_statistic import CellScore, Verdict, cell_score, verdict
from .sampling import sample_rows

__all__ = [
    "DEFAULT_SCAN_FORMATS",
    "FormatFinding",
    "ModelVerdict",
    "TensorScan",
    "default_scan_formats",
    "resolve_formats",
    "scan_tensor",
    "scan_verdict",
]

#: One format per distinct rounding grid an attacker can target (variants sharing another's cells are left out:
#: nf4_dq rounds like nf4, torchao_int8 like int8_per_channel up to dtype, fp8_per_block like fp8_per_channel on
#: finer blocks).
DEFAULT_SCAN_FORMATS = (
    "bnb_int8",
    "nf4",
    "fp4",
    "fp8_per_tensor",
    "fp8_per_channel",
    "mxfp4",
    "mxfp8",
    "int8_per_channel",
    "torchao_int4",
    "q8_0",
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q2_k",
    "q3_k",
    "q4_k",
    "q5_k",
    "q6_k",
)


@dataclass(frozen=True)
class FormatFinding:
    score: CellScore
    verdict: Verdict

    def as_dict(self) -> dict[str, object]:
        s = self.score
        return {
            "format": s.format,
            "distance": s.distance,
            "at": s.at,
            "on_grid_fraction": s.on_grid_fraction,
            "interior_on_grid_fraction": s.interior_on_grid_fraction,
            "decoy_on_grid_fraction": s.decoy_on_grid_fraction,
            "near_code_fraction": s.near_code_fraction,
            "rescaled_grid_fraction": s.rescaled_grid_fraction,
            "grid_aligned": s.grid_aligned,  # not judged: a model dequantized from this format (or trained for it)
            "repeated_fraction": s.repeated_fraction,
            "zeros_on_a_code": s.zeros,
            "lattice_fraction": s.lattice_fraction,
            "unjudged": s.unjudged,
            "suspicious": self.verdict.suspicious,
            "reasons": list(self.verdict.reasons),
        }


@dataclass(frozen=True)
class TensorScan:
    """One tensor's findings; `skipped` names the formats whose block rules do not fit its shape."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    findings: tuple[FormatFinding, ...]
    skipped: tuple[str, ...] = ()

    @property
    def suspicious(self) -> bool:
        return any(f.verdict.suspicious for f in self.findings)

    @property
    def worst(self) -> FormatFinding | None:
        """The finding with the largest distance from the null (None when no format applied)."""
        return max(self.findings, key=lambda f: abs(f.score.distance), default=None)

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "suspicious": self.suspicious,
            "findings": [f.as_dict() for f in self.findings],
            "skipped_formats": list(self.skipped),
        }


@dataclass(frozen=True)
class ModelVerdict:
    tensors: int
    flagged: tuple[str, ...]
    flagged_by_format: dict[str, int] = field(default_factory=dict)
    #: the flagged tensors each of whose flags carries the repeated-values caution (CellScore.repeats_values): a
    #: checkpoint dequantized from another format (flagged even when clean) or an attack's clamped weights
    cautioned: tuple[str, ...] = ()

    @property
    def suspicious(self) -> bool:
        return bool(self.flagged)

    def summary(self, formats: int) -> str:
        """One line: the verdict, what was flagged, and how many of the flags may be a foreign lattice's."""
        line = f"{'suspicious' if self.suspicious else 'clean'}: {len(self.flagged)} of {self.tensors} tensors flagged"
        return line + f" under {formats} formats" + self.caution()

    def caution(self) -> str:
        """How many flagged tensors carry the repeated-values caution, as a parenthesis ('' when none)."""
        if not self.cautioned:
            return ""
        return (
            f" ({len(self.cautioned)} of them repeat values within blocks, as checkpoints dequantized from another"
            " format do; the local decoys flag those even when clean, --lattice-null judges them against their"
            " own lattice: see their cautions)"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "suspicious": self.suspicious,
            "tensors": self.tensors,
            "flagged": list(self.flagged),
            "flagged_by_format": dict(self.flagged_by_format),
            "cautioned": list(self.cautioned),
        }


def resolve_formats(names: Sequence[str] | None) -> list[Format]:
    """The formats to scan under (default: DEFAULT_SCAN_FORMATS); unknown names are refused."""
    chosen = DEFAULT_SCAN_FORMATS if names is None else names
    if not chosen:
        raise UnsupportedInputError(f"no scan formats given; choose from {', '.join(format_names())}")
    return [get_format(n) for n in chosen]


def _accepts(fmt: Format, x: torch.Tensor) -> bool:
    """Whether fmt's block rules fit x's shape (if not, no attacker could target x in that format)."""
    try:
        fmt.check_shape(x, "tensor")
    except UnsupportedInputError:
        return False
    return True


def default_scan_formats(x: torch.Tensor) -> list[Format]:
    """The DEFAULT_SCAN_FORMATS whose shape rules accept x (the ones an attacker could target with this tensor)."""
    return [fmt for fmt in resolve_formats(None) if _accepts(fmt, x)]


def scan_tensor(
    x: torch.Tensor,
    name: str,
    formats: Sequence[Format],
    shape: Sequence[int] | None = None,
    *,
    own_lattice: bool = False,
) -> TensorScan:
    """Score x (on the detector's sample of it, detection.sample_rows) under each format whose shape rules accept
    it. `shape` is the full tensor's when x is already a sample of its rows (the GGUF scan reads only those).
    `own_lattice`: cell_score's experimental lattice null."""
    if x.dtype not in SUPPORTED_INPUT_DTYPES:
        raise UnsupportedInputError(f"tensor {name!r}: dtype {x.dtype} cannot be scanned (float32/16, bfloat16 only)")
    accepted = [fmt for fmt in formats if _accepts(fmt, x)]
    sample = sample_rows(x)
    scores = [cell_score(sample, fmt, name, own_lattice=own_lattice) for fmt in accepted]
    findings = [FormatFinding(score, verdict(score)) for score in scores]
    skipped = [fmt.name for fmt in formats if fmt not in accepted]
    full_shape = tuple(x.shape) if shape is None else tuple(shape)
    return TensorScan(name, full_shape, str(x.dtype).removeprefix("torch."), tuple(findings), tuple(skipped))


def scan_verdict(scans: Iterable[TensorScan]) -> ModelVerdict:
    """Suspicious when any tensor is flagged under any format."""
    n, flagged, cautioned, by_format = 0, [], [], {}
    for scan in scans:
        n += 1
        flags = [f for f in scan.findings if f.verdict.suspicious]
        if flags:
            flagged.append(scan.name)
            if all(f.score.repeats_values for f in flags):
                cautioned.append(scan.name)
        for f in flags:
            by_format[f.score.format] = by_format.get(f.score.format, 0) + 1
    return ModelVerdict(n, tuple(flagged), by_format, tuple(cautioned))
