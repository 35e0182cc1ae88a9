"""Triton kernels: the standard quantizer's scales, the hardening draw and the native packing fused in one pass.

One parameterized kernel per packing family, each bit-exact with the plain-torch reference of its formats (same
scales, same round-to-nearest codes, same Philox draw for hardened codes, same bytes). Importing this package does not
import Triton: the family modules are loaded on first use, so `qcbguard_kernels` keeps working where Triton is not
installed (the dispatch then uses the references).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..formats.base import Format, QuantizedTensor

__all__ = ["TRITON_FAMILIES", "quantize_triton", "supports", "triton_available"]

#: packing family -> (module, launcher) of its kernel
TRITON_FAMILIES: dict[str, tuple[str, str]] = {
    "absmax-int": ("absmax_int", "quantize_absmax_int"),
    "codebook-4bit": ("codebook4", "quantize_codebook4"),
    "fp8-mx": ("fp8_mx", "quantize_fp8_mx"),
    "gguf-legacy": ("gguf_legacy", "quantize_gguf_legacy"),
    "gguf-kquant": ("gguf_kquant", "quantize_gguf_kquant"),
}


@functools.cache
def triton_available() -> bool:
    """True when the `triton` package can be imported (checked without importing it, once per process: the search
    walks sys.path, 0.1 ms, and the dispatch asks for every chunk of every tensor)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as absent
        return False


def supports(fmt: Format) -> bool:
    """True when a Triton kernel covers this format."""
    return fmt.family in TRITON_FAMILIES


def quantize_triton(
    fmt: Format, x: torch.Tensor, key: int | None, row_offset: int = 0, col_offset: int = 0
) -> QuantizedTensor:
    """Quantize a validated tensor with its family's kernel; `key` None is round-to-nearest, else the hardened draw.

    x must already have passed `fmt.validate` (dtype, shape, finiteness).
    """
    module_name, launcher = TRITON_FAMILIES[fmt.family]
    module = importlib.import_module(f".{module_name}", __name__)
    return getattr(module, launcher)(fmt, x, key, row_offset, col_offset)
