"""The format registry and every format qcbguard hardens. Importing this package registers them all."""

from __future__ import annotations

from . import bnb, fp8, gguf_kquant_affine, gguf_kquant_symmetric, gguf_legacy, int_weight_only, mx  # noqa: F401
from .base import Encoding, Format, QuantizedTensor, RoundingCells
from .registry import format_names, formats_in_family, get_format, register_format

__all__ = [
    "Encoding",
    "Format",
    "QuantizedTensor",
    "RoundingCells",
    "format_names",
    "formats_in_family",
    "get_format",
    "register_format",
]
