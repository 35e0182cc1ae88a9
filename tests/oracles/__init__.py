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


def _vllm_fp8(name: str) -> Callable[[torch.Tensor], object]:
    from .vllm_rules import vllm_fp8_cast_input

    def run(x: torch.Tensor) -> object:
        values, scale = vllm_fp8_cast_input(name, x)
        return values.to(torch.float8_e4m3fn), scale

    return run


def _vllm_int8(x: torch.Tensor) -> object:
    from .vllm_rules import vllm_int8_rows

    return vllm_int8_rows(x)


def _torchao_mx(element: str) -> Callable[[torch.Tensor], object]:
    from .torchao_mx import to_mx_bytes

    return lambda x: to_mx_bytes(x, element)


def _torchao_int8(x: torch.Tensor) -> object:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    linear = torch.nn.Linear(x.shape[1], x.shape[0], bias=False, dtype=x.dtype)
    linear.weight.data = x
    quantize_(linear, Int8WeightOnlyConfig())
    return linear.weight


def _torchao_int4(x: torch.Tensor) -> object:
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    linear = torch.nn.Linear(x.shape[1], x.shape[0], bias=False, dtype=x.dtype)
    linear.weight.data = x
    quantize_(linear, PrototypeInt4WeightOnlyConfig(group_size=128))
    return linear.weight


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
    if format_name.startswith("fp8_"):
        return "vLLM rule + torch e4m3 cast", _vllm_fp8(format_name)
    others = {
        "int8_per_channel": ("vLLM rule in torch", _vllm_int8),
        "mxfp8": ("torchao to_mx (RCEIL)", _torchao_mx("e4m3")),
        "mxfp4": ("torchao to_mx (EVEN)", _torchao_mx("e2m1")),
        "torchao_int8": ("torchao quantize_", _torchao_int8),
        "torchao_int4": ("torchao quantize_ (CPU int4)", _torchao_int4),
    }
    if format_name in others:
        return others[format_name]
    raise KeyError(f"no oracle registered for format {format_name!r}")
