"""The quantization hook: vLLM computes its scales and codes, qcbguard checks them and swaps in hardened codes.

Where it sits. vLLM quantizes a layer in its method's process_weights_after_loading, once the layer's full-precision
weight is loaded and fused (qkv_proj, gate_up_proj); online methods run it layer by layer during load_weights
(model_loader/reload/layerwise.py), torchao at the end of loading. The hook wraps that method and, while it runs, the
one function inside it that rounds the weight (`_fp8_quant_per_channel` for fp8_per_channel,
`torchao_quantize_param_data` for torchao). When that function returns, the hook:

1. encodes the same full-precision shard with qcbguard's reference of the method's rule (kernels/formats) and draws
   the hardened codes: Philox keyed by the deployment seed and the layer's weight name ("...qkv_proj.weight"),
   indexed by each element's place in the TP=1 fused weight (layout.py, shard.py);
2. checks that vLLM's own codes equal the reference's round-to-nearest codes and its scales equal the reference's
   scales, bit for bit. Any difference means vLLM's rule is not the one the reference reproduces (a new release, an
   unusual platform): start-up stops rather than hardening on a grid that is not vLLM's;
3. returns the hardened codes in place of vLLM's, with vLLM's scales untouched. Whatever vLLM does next (kernel
   repacking, transposed views) it does to the hardened codes.

Every layer vLLM quantizes must be hardened or knowingly left alone: pre-quantized checkpoints and layers being
re-quantized from a checkpoint format are out of the threat model (counted as skipped); any other quantized layer
stops start-up with a message naming it, unless the settings say allow_passthrough.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qcbguard_kernels import get_format
from qcbguard_kernels.errors import QcbguardError
from qcbguard_kernels.formats.base import Format, QuantizedTensor

from .compat import UnsupportedVllmError
from .layout import layer_geometry
from .shard import harden_shard
from .state import HookState, active_state

__all__ = [
    "HARDENED_LAYER_METHODS",
    "ONLINE_QUANTIZATION",
    "PRE_QUANTIZED",
    "RuleDriftError",
    "check_model",
    "harden_against_vllm",
]

logger = logging.getLogger("vllm_qcbguard")

#: vLLM method class -> qcbguard format whose reference reproduces its rounding
HARDENED_LAYER_METHODS = {"Fp8PtpcOnlineLinearMethod": "fp8_per_channel", "TorchAOLinearMethod": "torchao_int8"}
#: --quantization values that quantize full-precision weights at load time (the layers decide what is hardened)
ONLINE_QUANTIZATION = frozenset(
    {
        "online",
        "fp8_per_tensor",
        "fp8_per_block",
        "fp8_per_channel",
        "int8_per_channel_weight_only",
        "experts_int8",
        "nvfp4_per_token",
        "mxfp8",
        "torchao",
    }
)
#: --quantization values that load checkpoints someone else already quantized: out of the threat model, left alone
PRE_QUANTIZED = frozenset(
    {
        "awq",
        "auto_awq",
        "awq_marlin",
        "gptq",
        "auto_gptq",
        "gptq_marlin",
        "gguf",
        "fp8",
        "fbgemm_fp8",
        "fp_quant",
        "modelopt",
        "modelopt_fp4",
        "modelopt_mxfp8",
        "modelopt_mixed",
        "humming",
        "compressed-tensors",
        "quark",
        "moe_wna16",
        "inc",
        "mxfp4",
        "gpt_oss_mxfp4",
        "deepseek_v4_fp8",
        "bitsandbytes",
    }
)


class RuleDriftError(QcbguardError):
    """vLLM's scales or round-to-nearest codes differ from qcbguard's reference of its rule."""


@dataclass
class LayerJob:
    """The layer being quantized right now, and what its rounding call must be hardened as."""

    state: HookState
    layer: torch.nn.Module
    method: str
    fmt: Format
    name: str
    row_amax: torch.Tensor | None = None
    done: int = 0


_JOB: contextvars.ContextVar[LayerJob | None] = contextvars.ContextVar("qcbguard_layer_job", default=None)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes reinterpreted as integers of the same width (so -0.0 != 0.0 and NaN == NaN)."""
    t = t.detach().contiguous()
    if not t.dtype.is_floating_point:
        return t
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width)


def _check_same(job: LayerJob, plain: QuantizedTensor, vllm: dict[str, torch.Tensor]) -> None:
    for key, theirs in vllm.items():
        ours = plain.tensors[key]
        if theirs.dtype != ours.dtype or theirs.numel() != ours.numel():
            raise RuleDriftError(
                f"qcbguard: vLLM's {job.method} stores {key} of {job.name} as {theirs.dtype} {tuple(theirs.shape)}, "
                f"qcbguard's {job.fmt.name} reference as {ours.dtype} {tuple(ours.shape)}; refusing to harden a layout "
                "it does not know"
            )
        a, b = _bits(theirs).reshape(-1).cpu(), _bits(ours).reshape(-1)
        differ = (a != b).nonzero()
        if differ.numel():
            first = int(differ[0])
            raise RuleDriftError(
                f"qcbguard: vLLM's {job.method} {key} of {job.name} differs from qcbguard's {job.fmt.name} reference "
                f"in {differ.numel()} of {a.numel()} entries (first at flat index {first}); vLLM's rounding rule is "
                "not the one qcbguard reproduces, so the hook refuses to harden on another grid"
            )


def harden_against_vllm(job: LayerJob, x: torch.Tensor, vllm: dict[str, torch.Tensor]) -> QuantizedTensor:
    """Harden the shard x vLLM just quantized to `vllm` (its packed tensors by qcbguard's key names)."""
    if x.dim() != 2:
        raise UnsupportedVllmError(f"qcbguard: {job.name} reached the hook with shape {tuple(x.shape)}, expected 2-D")
    geometry = layer_geometry(job.layer, x.shape[0])
    hardening = job.state.settings.hardening
    enc, packed, report = harden_shard(
        x.detach().cpu(), job.fmt, job.name, job.state.seed, hardening, geometry, row_amax=job.row_amax
    )
    _check_same(job, job.fmt.pack(enc), vllm)
    job.state.record(job.layer, report)
    job.done += 1
    return packed


def _run_layer(job: LayerJob, original: Callable[..., Any], method: Any, layer: torch.nn.Module) -> Any:
    token = _JOB.set(job)
    try:
        result = original(method, layer)
    finally:
        _JOB.reset(token)
    if job.done != 1:
        raise UnsupportedVllmError(
            f"qcbguard: vLLM's {job.method} quantized {job.name} without the rounding call the hook hardens "
            f"({job.done} calls seen); this vLLM's code path is not one qcbguard supports"
        )
    return result


# ---- fp8_per_channel (Fp8PtpcOnlineLinearMethod) ----


def _row_parallel(layer: torch.nn.Module) -> bool:
    return int(getattr(layer, "tp_size", 1) or 1) > 1 and layer.input_size != layer.input_size_per_partition


def wrap_ptpc_process(original: Callable[..., Any]) -> Callable[..., Any]:
    def process_weights_after_loading(self: Any, layer: torch.nn.Module) -> Any:
        state = active_state()
        if state is None or getattr(layer, "_already_called_process_weights_after_loading", False):
            return original(self, layer)
        prefix = getattr(layer, "prefix", "") or type(layer).__name__
        if getattr(self, "requantization_source", None) is not None:
            state.skip(layer, prefix, "requantization")
            return original(self, layer)
        job = LayerJob(state, layer, type(self).__name__, get_format("fp8_per_channel"), f"{prefix}.weight")
        if _row_parallel(layer):
            # vLLM all-reduces each row's amax over the ranks (amax_for_tp_weight_quant), so every rank uses the
            # full row's scale; the hook takes the same global amax so its reference uses that scale too.
            from vllm.model_executor.layers.quantization.utils.quant_utils import (
                amax_for_tp_weight_quant,
                weight_amax,
            )

            job.row_amax = amax_for_tp_weight_quant(weight_amax(layer.weight, dim=-1, keepdim=True), True).cpu()
        return _run_layer(job, original, self, layer)

    return process_weights_after_loading


def wrap_fp8_channel_quant(original: Callable[..., Any]) -> Callable[..., Any]:
    def _fp8_quant_per_channel(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out = original(weight, scale)
        job = _JOB.get()
        if job is None:
            return out
        if out.dtype != torch.float8_e4m3fn:
            raise UnsupportedVllmError(
                f"qcbguard: {job.name} quantizes to {out.dtype}; the hook's fp8 reference is float8_e4m3fn only"
            )
        packed = harden_against_vllm(job, weight, {"weight": out, "scale": scale})
        return packed.tensors["weight"].to(out.device)

    return _fp8_quant_per_channel


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
        job = LayerJob(state, layer, type(self).__name__, get_format(fmt), f"{prefix}.weight")
        return _run_layer(job, original, self, layer)

    return process_weights_after_loading


def wrap_torchao_quantize(original: Callable[..., Any]) -> Callable[..., Any]:
    def torchao_quantize_param_data(param: torch.Tensor, torchao_config: Any) -> Any:
        out = original(param, torchao_config)
        job = _JOB.get()
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


# ---- the model-level check ----


def _exempt(method_name: str) -> bool:
    """Methods that do not quantize weights: unquantized layers and KV-cache scale holders."""
    return method_name.startswith("Unquantized") or method_name.endswith("KVCacheMethod")


def check_model(model: torch.nn.Module, model_config: Any, state: HookState) -> None:
    """After vLLM processed every layer: each quantized layer was hardened or knowingly skipped, else refuse."""
    quantization = getattr(model_config, "quantization", None)
    if quantization is None:
        logger.info("qcbguard: the model is not quantized; nothing to harden")
        state.publish()
        return
    known = quantization in ONLINE_QUANTIZATION or quantization in PRE_QUANTIZED
    if not known and not state.settings.allow_passthrough:
        raise QcbguardError(
            f"qcbguard does not know the quantization method {quantization!r}; supported online methods: "
            f"{', '.join(sorted(ONLINE_QUANTIZATION))}; set allow_passthrough to serve it unhardened"
        )
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None or module in state.handled or _exempt(type(method).__name__):
            continue
        method_name = type(method).__name__
        if quantization in PRE_QUANTIZED:
            state.skip(module, name, "pre-quantized")
        elif state.settings.allow_passthrough:
            logger.warning("qcbguard: %s left unhardened (%s, pass-through allowed)", name, method_name)
            state.skip(module, name, "passthrough")
        else:
            raise QcbguardError(
                f"qcbguard cannot harden layer {name}: vLLM quantizes it with {method_name} (--quantization "
                f"{quantization}), which the hook does not support (supported: {', '.join(HARDENED_LAYER_METHODS)}); "
                "set allow_passthrough to serve such layers unhardened"
            )
    hardened = len(state.reports)
    changed = sum(r.codes_changed for r in state.reports)
    elements = sum(r.elements for r in state.reports)
    logger.info(
        "qcbguard: hardened %d tensors (%d of %d codes changed), %d left as they were",
        hardened,
        changed,
        elements,
        len(state.skipped),
    )
    state.publish()


def wrap_process_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def process_weights_after_loading(model: torch.nn.Module, model_config: Any, target_device: Any) -> Any:
        result = original(model, model_config, target_device)
        state = active_state()
        if state is not None:
            check_model(model, model_config, state)
        return result

    return process_weights_after_loading
