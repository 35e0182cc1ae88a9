"""Hardening: unbiased stochastic rounding over each weight's rounding cell, keyed by a secret per-deployment seed."""

from __future__ import annotations

from .config import ALGORITHM_VERSION, HardeningConfig
from .feedback import FeedbackPlan, HessianAccumulator, feedback_plan, harden_calibrated
from .harden import (
    Screened,
    SuspiciousTensorError,
    TensorReport,
    detector_sample_key,
    harden_encoding,
    harden_tensor,
    screen,
    stochastic_codes,
)
from .rng import philox4x32, tensor_key, uniform24, uniform_grid
from .seed import DeploymentSeed, SeedFileError

__all__ = [
    "ALGORITHM_VERSION",
    "DeploymentSeed",
    "FeedbackPlan",
    "HardeningConfig",
    "HessianAccumulator",
    "Screened",
    "SeedFileError",
    "SuspiciousTensorError",
    "TensorReport",
    "detector_sample_key",
    "feedback_plan",
    "harden_calibrated",
    "harden_encoding",
    "harden_tensor",
    "philox4x32",
    "screen",
    "stochastic_codes",
    "tensor_key",
    "uniform24",
    "uniform_grid",
]
