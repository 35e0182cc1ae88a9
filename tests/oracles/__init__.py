"""The real quantizers our references are compared with, byte for byte. Test and benchmark code only."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["oracle_for"]


def _bnb_4bit(quant_type: str, double_quant: bool) -> Callable[[torch.Tensor], object]:
    def run(x: torch.Tensor) -> object:
        import bitsandbytes.functional as bnb

        return bnb.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)

    return run


def _bnb_int8(x: torch.Tensor) -> object:
    import bitsandbytes.functional as bnb

    return bnb.int8_vectorwise_quant(x)


def _ggml(type_name: str) -> Callable[[torch.Tensor], object]:
    from .ggml import ggml_quantize

    return lambda x: ggml_quantize(type_name, x)


def oracle_for(format_name: str) -> tuple[str, Callable[[torch.Tensor], object]]:
    """(label, quantize function) of the real implementation a format is proven against."""
    from .ggml import GGML_TYPES

    if format_name in GGML_TYPES:
        return "ggml_quantize_chunk", _ggml(format_name)
    bnb = {
        "nf4": _bnb_4bit("nf4", False),
        "nf4_dq": _bnb_4bit("nf4", True),
        "fp4": _bnb_4bit("fp4", False),
        "bnb_int8": _bnb_int8,
    }
    if format_name in bnb:
        return "bitsandbytes 0.50", bnb[format_name]
    raise KeyError(f"no oracle registered for format {format_name!r}")
