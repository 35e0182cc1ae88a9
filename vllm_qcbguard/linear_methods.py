"""The linear-layer methods the hook hardens: which vLLM call rounds each online method's weight, and as what format.

| vLLM method | rounding call wrapped | qcbguard format | amax all-reduced across TP ranks |
|---|---|---|---|
| Fp8PtpcOnlineLinearMethod | online.fp8._fp8_quant_per_channel | fp8_per_channel | each row's, row-parallel |
| Fp8PerTensorOnlineLinearMethod | _custom_ops.scaled_fp8_quant (static) | fp8_per_tensor | the tensor's, any shard |
| Fp8PerBlockOnlineLinearMethod | online.fp8.per_block_cast_to_fp8 | fp8_per_block | none (128x128 local blocks) |
| Mxfp8OnlineLinearMethod | online.mxfp8.mxfp8_e4m3_quantize | mxfp8 | none (1x32 blocks in a row) |
| Mxfp4OnlineLinearMethod | online.mxfp4.mxfp4_quantize | mxfp4 | none (1x32 blocks in a row) |
| TorchAOLinearMethod (Int8WeightOnlyConfig) | torchao.torchao_quantize_param_data | torchao_int8 | none |

Each method's process_weights_after_loading is wrapped to open a LayerJob; the rounding call, wrapped once per process
and active only inside that job, hands vLLM's output and the full-precision weight to harden_against_vllm, which
checks vLLM's codes and scales against the reference bit for bit and returns the hardened codes in vLLM's dtype. Where
vLLM all-reduces an amax across ranks, the hook reduces the same amax the same way first (every rank makes the same
collective call in the same order), so its reference uses the scale vLLM uses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from qcbguard_kernels import get_format
from qcbguard_kernels.errors import QcbguardError

from .compat import UnsupportedVllmError
from .hook import LayerJob, as_vllm, current_job, harden_against_vllm, reference_format, run_layer
from .state import active_state

__all__ = [
    "wrap_fp8_channel_quant",
    "wrap_mx_quantize",
    "wrap_online_linear_process",
    "wrap_per_block_cast",
    "wrap_scaled_fp8_quant",
    "wrap_torchao_process",
    "wrap_torchao_quantize",
]

logger = logging.getLogger("vllm_qcbguard")

AmaxRule = Callable[[torch.nn.Module], "torch.Tensor | None"]


def _tp_size(layer: torch.nn.Module) -> int:
    return int(getattr(layer, "tp_size", 1) or 1)


def _all_reduced_amax(weight: torch.Tensor, per_row: bool) -> torch.Tensor:
    from vllm.model_executor.layers.quantization.utils.quant_utils import amax_for_tp_weight_quant, weight_amax

    amax = weight_amax(weight, dim=-1, keepdim=True) if per_row else weight_amax(weight).reshape(1)
    return amax_for_tp_weight_quant(amax, True).cpu()


def row_parallel_row_amax(layer: torch.nn.Module) -> torch.Tensor | None:
    """fp8_per_channel: a row-parallel layer's rows are split over ranks, and vLLM all-reduces each row's amax."""
    if _tp_size(layer) > 1 and layer.input_size != layer.input_size_per_partition:
        return _all_reduced_amax(layer.weight, per_row=True)
    return None


def sharded_tensor_amax(layer: torch.nn.Module) -> torch.Tensor | None:
    """fp8_per_tensor: any sharded layer (row or column parallel) takes the amax of the whole tensor."""
    if _tp_size(layer) == 1:
        return None
    if layer.input_size != layer.input_size_per_partition or layer.output_size != layer.output_size_per_partition:
        return _all_reduced_amax(layer.weight, per_row=False)
    return None


def wrap_online_linear_process(fmt_name: str, call: str, amax_rule: AmaxRule | None = None) -> Callable[..., Any]:
    """A wrapper maker for an online linear method's process_weights_after_loading: layers being re-quantized from a
    checkpoint format are skipped (out of the threat model), every other layer is hardened at its `call`."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def process_weights_after_loading(self: Any, layer: torch.nn.Module) -> Any:
            state = active_state()
            if state is None or getattr(layer, "_already_called_process_weights_after_loading", False):
                return original(self, layer)
            prefix = getattr(layer, "prefix", "") or type(layer).__name__
            if getattr(self, "requantization_source", None) is not None:
                state.skip(layer, prefix, "requantization")
                return original(self, layer)
            fmt = reference_format(fmt_name, layer.weight.device)
            job = LayerJob(state, layer, type(self).__name__, fmt, f"{prefix}.weight", call)
            if amax_rule is not None:
                job.amax = amax_rule(layer)
            return run_layer(job, original, self, layer)

        return process_weights_after_loading

    return make


def _hardened(job: LayerJob, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, fp8: bool = True) -> torch.Tensor:
    """vLLM's codes q (with its scale) checked against the reference and replaced by the hardened codes."""
    if fp8 and q.dtype != torch.float8_e4m3fn:
        raise UnsupportedVllmError(
            f"qcbguard: {job.name} quantizes to {q.dtype}; the hook's fp8 references are float8_e4m3fn only"
        )
    packed = harden_against_vllm(job, x, {"weight": q, "scale": scale})
    return as_vllm(packed.tensors["weight"], q)


def wrap_fp8_channel_quant(original: Callable[..., Any]) -> Callable[..., Any]:
    def _fp8_quant_per_channel(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out = original(weight, scale)
        job = current_job("_fp8_quant_per_channel")
        if job is None:
            return out
        return _hardened(job, weight, out, scale)

    return _fp8_quant_per_channel


def wrap_scaled_fp8_quant(original: Callable[..., Any]) -> Callable[..., Any]:
    """vLLM's fp8 quantization op, also used for activations at run time: only the static per-tensor call made
    inside an fp8_per_tensor layer job is hardened, everything else passes through untouched."""

    def scaled_fp8_quant(input: torch.Tensor, scale: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        out, out_scale = original(input, scale, *args, **kwargs)
        job = current_job("scaled_fp8_quant")
        if job is None:
            return out, out_scale
        if scale is None or scale.numel() != 1 or args or any(v not in (None, False) for v in kwargs.values()):
            raise UnsupportedVllmError(
                f"qcbguard: vLLM's {job.method} quantized {job.name} with scaled_fp8_quant options the hook does not "
                "know (expected one static per-tensor scale); this vLLM's code path is not one qcbguard supports"
            )
        return _hardened(job, input, out, out_scale), out_scale

    return scaled_fp8_quant


def wrap_per_block_cast(original: Callable[..., Any]) -> Callable[..., Any]:
    def per_block_cast_to_fp8(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        q, sf = original(x, *args, **kwargs)
        job = current_job("per_block_cast_to_fp8")
        if job is None:
            return q, sf
        block = kwargs.get("block_size", args[0] if args else [128, 128])
        ue8m0 = kwargs.get("use_ue8m0", args[1] if len(args) > 1 else False)
        if list(block) != [128, 128] or ue8m0:
            raise UnsupportedVllmError(
                f"qcbguard: vLLM's {job.method} quantized {job.name} in blocks {list(block)} (ue8m0 scales: {ue8m0}); "
                "qcbguard's fp8_per_block reference is 128x128 blocks with float32 scales"
            )
        return _hardened(job, x, q, sf), sf

    return per_block_cast_to_fp8


def wrap_mx_quantize(call: str) -> Callable[..., Any]:
    """mxfp8_e4m3_quantize(x, is_sf_swizzled_layout=False, alignment=0) and mxfp4_quantize(x): (elements, e8m0
    scale bytes). Only the plain row-major layout is the reference's."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def quantize(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            q, scale = original(x, *args, **kwargs)
            job = current_job(call)
            if job is None:
                return q, scale
            if any(args) or any(kwargs.values()):
                raise UnsupportedVllmError(
                    f"qcbguard: vLLM's {job.method} quantized {job.name} with swizzled or aligned MX scales; "
                    f"qcbguard's {job.fmt.name} reference holds one e8m0 byte per 32 weights, row-major"
                )
            return _hardened(job, x, q, scale, fp8=call != "mxfp4_quantize"), scale

        quantize.__name__ = call
        return quantize

    return make


# ---- torchao (TorchAOLinearMethod) ----


def torchao_format(config: Any) -> str | None:
    """The qcbguard format of a torchao config, or None when the hook has no reference for it."""
    if type(config).__name__ != "Int8WeightOnlyConfig":
        return None
    granularity = type(getattr(config, "granularity", None)).__name__
    if getattr(config, "version", None) != 2 or getattr(config, "group_size", None) is not None:
        return None
    if granularity != "PerRow" or getattr(config.granularity, "dim", -1) not in (-1, 1):
        return None
    return "torchao_int8"


def wrap_torchao_process(original: Callable[..., Any]) -> Callable[..., Any]:
    def process_weights_after_loading(self: Any, layer: torch.nn.Module) -> Any:
        state = active_state()
        if state is None:
            return original(self, layer)
        prefix = getattr(layer, "prefix", "") or type(layer).__name__
        if self.quant_config.is_checkpoint_torchao_serialized:
            state.skip(layer, prefix, "pre-quantized")
            return original(self, layer)
        config = self.quant_config.torchao_config
        fmt = torchao_format(config)
        if fmt is None:
            if state.settings.allow_passthrough:
                logger.warning("qcbguard: %s left unhardened (torchao %s, pass-through allowed)", prefix, config)
                state.skip(layer, prefix, "passthrough")
                return original(self, layer)
            raise QcbguardError(
                f"qcbguard cannot harden {prefix}: torchao config {type(config).__name__} has no qcbguard reference "
                "(supported: Int8WeightOnlyConfig, per row, version 2); set allow_passthrough to serve it unhardened"
            )
        job = LayerJob(
            state, layer, type(self).__name__, get_format(fmt), f"{prefix}.weight", "torchao_quantize_param_data"
        )
        return run_layer(job, original, self, layer)

    return process_weights_after_loading


def wrap_torchao_quantize(original: Callable[..., Any]) -> Callable[..., Any]:
    def torchao_quantize_param_data(param: torch.Tensor, torchao_config: Any) -> Any:
        out = original(param, torchao_config)
        job = current_job("torchao_quantize_param_data")
        if job is None:
            return out
        qdata, scale = getattr(out, "qdata", None), getattr(out, "scale", None)
        if qdata is None or scale is None:
            raise UnsupportedVllmError(
                f"qcbguard: torchao returned {type(out).__name__} for {job.name}, not an Int8Tensor with qdata/scale"
            )
        packed = harden_against_vllm(job, param.detach(), {"qdata": qdata, "scale": scale})
        qdata.copy_(packed.tensors["qdata"])
        return out

    return torchao_quantize_param_data
