"""qcbguard's numerics: format registry, references (and, later, hardening, detection and Triton kernels).

Installed as `qcbguard_kernels` (the folder is `kernels/` in the source tree): PyPI's popular `kernels` package must
stay importable beside us. Nothing here imports vLLM, gguf-py, Prometheus or Triton at import time.
"""

from __future__ import annotations

from .errors import NonFiniteInputError, QcbguardError, UnsupportedInputError
from .formats import Encoding, Format, QuantizedTensor, RoundingCells, format_names, get_format

__version__ = "0.1.0"

__all__ = [
    "Encoding",
    "Format",
    "NonFiniteInputError",
    "QcbguardError",
    "QuantizedTensor",
    "RoundingCells",
    "UnsupportedInputError",
    "format_names",
    "get_format",
]
