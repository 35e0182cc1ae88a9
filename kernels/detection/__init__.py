"""Tamper detection: where weights sit inside their rounding cells, against a local decoy null."""

from __future__ import annotations

from .cell_statistic import CellScore, Verdict, cell_score, threshold_for, verdict
from .lattice_null import LATTICE_NULL_HELP
from .sampling import DETECTOR_SAMPLE, MIN_DETECTOR_SAMPLE, ROW_RUN, sample_row_ranges, sample_rows
from .scan import (
    DEFAULT_SCAN_FORMATS,
    FormatFinding,
    ModelVerdict,
    TensorScan,
    default_scan_formats,
    resolve_formats,
    scan_tensor,
    scan_verdict,
)

__all__ = [
    "DEFAULT_SCAN_FORMATS",
    "DETECTOR_SAMPLE",
    "LATTICE_NULL_HELP",
    "MIN_DETECTOR_SAMPLE",
    "ROW_RUN",
    "CellScore",
    "FormatFinding",
    "ModelVerdict",
    "TensorScan",
    "Verdict",
    "cell_score",
    "default_scan_formats",
    "resolve_formats",
    "sample_row_ranges",
    "sample_rows",
    "scan_tensor",
    "scan_verdict",
    "threshold_for",
    "verdict",
]
