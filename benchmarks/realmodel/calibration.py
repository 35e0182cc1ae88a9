"""Calibration Hessians for calibrated hardening: H = sum of x x^T over every input each linear weight sees while
the full-precision model reads a committed calibration text.

The text (calibration_text.txt beside this file) is the start of the "Compound statements" chapter of the Python
Language Reference as CPython 3.11.7 ships it in `pydoc_data/topics.py` (PSF License), verbatim: the same kind of
English as the evaluation text but none of its chapters, so the perplexity measured after calibration is measured on
text the calibration never saw.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qcbguard.calibration import collect_hessians as collect_calibration
from qcbguard.calibration import token_windows

__all__ = ["CALIBRATION_TEXT", "collect_hessians"]

CALIBRATION_TEXT = Path(__file__).with_name("calibration_text.txt")


def collect_hessians(
    model: torch.nn.Module,
    tokenizer: object,
    weight_names: list[str],
    context: int = 512,
    text: Path = CALIBRATION_TEXT,
) -> dict[str, torch.Tensor]:
    """{weight name: H (inputs x inputs, float64)} while the model reads the text in windows of `context` tokens
    (BOS first where the tokenizer has one): qcbguard calibrate's recipe, on the benchmark's float32 model."""
    ids = tokenizer(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    windows = token_windows(ids, getattr(tokenizer, "bos_token_id", None), context)
    return collect_calibration(model, windows, weight_names)
