"""Tamper detection: where weights sit inside their rounding cells, against a local decoy null."""

from __future__ import annotations

from .cell_statistic import CellScore, Verdict, cell_score, threshold_for, verdict

__all__ = ["CellScore", "Verdict", "cell_score", "threshold_for", "verdict"]
