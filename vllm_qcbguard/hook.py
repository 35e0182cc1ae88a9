"""The quantization hook: vLLM computes its scales and codes, qcbguard checks them and swaps in hardened codes.

Where it sits. vLLM quantizes a layer in its method's process_weights_after_loading, once the layer's full-precision
weight is loaded and fused (qkv_proj, gate_up_proj, MoE w13/w2); online methods run it layer by layer during
load_weights (model_loader/reload/layerwise.py), torchao at the end of loading. For a linear layer the hook wraps that
method and, while it runs, the one function inside it that rounds the weight (linear_methods.py); for fused experts
it sits between vLLM's rounding and its kernel-format shuffle (moe_methods.py). Once vLLM has rounded, the hook:

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
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qcbguard_kernels import get_format
from qcbguard_kernels.dispatch import harden_fused, pick_backend
from qcbguard_kernels.errors import QcbguardError
from qcbguard_kernels.formats.base import Format, QuantizedTensor
from qcbguard_kernels.formats.fp8 import FP8_PER_BLOCK_CPU
from qcbguard_kernels.hardening import FeedbackPlan, feedback_plan

from .compat import UnsupportedVllmError
from .layout import layer_geometry
from .shard import ShardGeometry, harden_shard
from .state import HookState, active_state

__all__ = [
    "HARDENED_LAYER_METHODS",
    "ONLINE_QUANTIZATION",
    "PRE_QUANTIZED",
    "LayerJob",
    "RuleDriftError",
    "as_vllm",
    "check_model",
    "current_job",
    "harden_against_vllm",
    "reference_format",
    "run_layer",
]

logger = logging.getLogger("vllm_qcbguard")

#: vLLM method class -> qcbguard format(s) whose reference reproduces its rounding (MoE: w13, w2)
HARDENED_LAYER_METHODS = {
    "Fp8PtpcOnlineLinearMethod": "fp8_per_channel",
    "Fp8PerTensorOnlineLinearMethod": "fp8_per_tensor",
    "Fp8PerBlockOnlineLinearMethod": "fp8_per_block",
    "Mxfp8OnlineLinearMethod": "mxfp8",
    "Mxfp4OnlineLinearMethod": "mxfp4",
    "TorchAOLinearMethod": "torchao_int8",
    "Int8OnlineMoEMethod": "int8_per_channel",
    "Fp8PerTensorOnlineMoEMethod": "fp8_per_tensor",
    "Fp8PerBlockOnlineMoEMethod": "fp8_per_block",
    "Fp8PtpcOnlineMoEMethod": "fp8_per_channel",
}
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
#: (mxfp4 and mxfp8 also quantize a full-precision checkpoint online; check_model tells the two apart by method)
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
    """The layer being quantized right now, and what its rounding call (`call`, the vLLM function's name) must be
    hardened as."""

    state: HookState
    layer: torch.nn.Module
    method: str
    fmt: Format
    name: str
    call: str = ""
    label: str | None = None  # metrics layer type, where the layer's prefix does not give it
    amax: torch.Tensor | None = None  # the all-reduced absmax where vLLM shares a scale across ranks
    done: int = 0


_JOB: contextvars.ContextVar[LayerJob | None] = contextvars.ContextVar("qcbguard_layer_job", default=None)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (so -0.0 != 0.0, NaN == NaN, and an e8m0 scale compares with the same uint8 byte)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()


def _check_same(job: LayerJob, plain: QuantizedTensor, vllm: dict[str, torch.Tensor]) -> None:
    for key, theirs in vllm.items():
        ours = plain.tensors[key]
        if theirs.element_size() != ours.element_size() or theirs.numel() != ours.numel():
            raise RuleDriftError(
                f"qcbguard: vLLM's {job.method} stores {key} of {job.name} as {theirs.dtype} {tuple(theirs.shape)}, "
                f"qcbguard's {job.fmt.name} reference as {ours.dtype} {tuple(ours.shape)}; refusing to harden a layout "
                "it does not know"
            )
        width = ours.element_size()
        differ = (_bytes(theirs) != _bytes(ours)).reshape(-1, width).any(dim=1).nonzero()
        if differ.numel():
            raise RuleDriftError(
                f"qcbguard: vLLM's {job.method} {key} of {job.name} differs from qcbguard's {job.fmt.name} reference "
                f"in {differ.numel()} of {ours.numel()} entries (first at flat index {int(differ[0])}); vLLM's "
                "rounding rule is not the one qcbguard reproduces, so the hook refuses to harden on another grid"
            )


def as_vllm(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Our packed tensor in the dtype (same width), shape and device vLLM holds it in."""
    if ours.dtype != theirs.dtype:
        ours = ours.contiguous().view(theirs.dtype)
    return ours.reshape(theirs.shape).to(theirs.device)


def harden_against_vllm(
    job: LayerJob, x: torch.Tensor, vllm: dict[str, torch.Tensor], geometry: ShardGeometry | None = None
) -> QuantizedTensor:
    """Harden the shard x vLLM just quantized to `vllm` (its packed tensors by qcbguard's key names). `geometry`
    places the shard in the full weight (by default read from the linear layer's tensor-parallel attributes)."""
    if x.dim() != 2:
        raise UnsupportedVllmError(f"qcbguard: {job.name} reached the hook with shape {tuple(x.shape)}, expected 2-D")
    geometry = geometry or layer_geometry(job.layer, x.shape[0])
    settings = job.state.settings
    plan = calibration_plan(job, x.shape[1], geometry)
    if plan is None and _fused(x, job, geometry, settings.backend):
        # one block of the full tensor with its own scales: the fused kernels, on the weight's device
        (run,) = geometry.runs
        nearest, packed, report = harden_fused(
            x.detach(), job.fmt, job.name, job.state.seed, settings.hardening,
            row_offset=run.global_start, col_offset=geometry.col_offset, backend=settings.backend,
        )  # fmt: skip
    else:
        enc, packed, report = harden_shard(
            x.detach().cpu(), job.fmt, job.name, job.state.seed, settings.hardening, geometry, amax=job.amax, plan=plan
        )
        nearest = job.fmt.pack(enc)
    _check_same(job, nearest, vllm)
    job.state.record(job.layer, report, job.label)
    job.done += 1
    return packed


#: vLLM's fused layers and the checkpoint weight whose inputs they read (every part of one reads the same input, so
#: the calibration file holds one Hessian for them all, aliased)
_FUSED_PARTS = {"qkv_proj": "q_proj", "gate_up_proj": "gate_proj"}
#: a fused expert as moe_methods names it ("{prefix}.{global expert}.w13_weight"), and the stacked Hessian that
#: `qcbguard calibrate` writes for its part under the experts module's name (one slice per expert)
_EXPERT_WEIGHT = re.compile(r"^(?P<prefix>.+)\.(?P<expert>\d+)\.(?P<part>w13|w2)_weight$")
_EXPERT_HESSIANS = {"w13": "gate_up_proj", "w2": "down_proj"}


def calibration_plan(job: LayerJob, cols: int, geometry: ShardGeometry) -> FeedbackPlan | None:
    """The feedback plan of a layer's shard from the hessians setting (the shard's own columns of its Hessian; for a
    fused expert, of its slice of the experts module's stacked Hessian), or None: no calibration file, detect-only
    (nothing is drawn), or no Hessian in it for this layer (it is hardened without feedback)."""
    hessians = job.state.hessians
    if hessians is None or job.state.settings.hardening.mode != "harden":
        return None
    expert = _EXPERT_WEIGHT.match(job.name)
    if expert is not None:  # vLLM's Mixtral says block_sparse_moe where transformers (which calibrate ran) says mlp
        stacked = _EXPERT_HESSIANS[expert["part"]]
        candidates = [
            f"{p}.{stacked}" for p in (expert["prefix"], expert["prefix"].replace(".block_sparse_moe.", ".mlp."))
        ]
    else:
        prefix, _, leaf = job.name.removesuffix(".weight").rpartition(".")
        candidates = [job.name, f"{prefix}.{_FUSED_PARTS.get(leaf, leaf)}.weight"]
    name = next((n for n in candidates if n in hessians.names), None)
    if name is None:
        logger.info("qcbguard: no calibration Hessian for %s; hardened without feedback", job.name)
        return None
    if expert is None:
        h = hessians.get(name)
    elif int(expert["expert"]) < hessians.slices(name) and len(hessians.shape(name)) == 3:
        h = hessians.get(name, int(expert["expert"]))
    else:
        raise QcbguardError(
            f"qcbguard: the calibration Hessian {name} {hessians.shape(name)} has no slice for expert "
            f"{expert['expert']} ({job.name}): is the hessians file for another model?"
        )
    start = geometry.col_offset
    if h.shape[0] < start + cols:
        raise QcbguardError(
            f"qcbguard: the calibration Hessian of {name} covers {h.shape[0]} inputs, {job.name} has "
            f"{start + cols}: is the hessians file for another model?"
        )
    return feedback_plan(h[start : start + cols, start : start + cols])


def _fused(x: torch.Tensor, job: LayerJob, geometry: ShardGeometry, backend: str) -> bool:
    """Whether the fused kernels harden this shard: the backend picks Triton (auto: a GPU tensor) or the fused native
    pass (auto: a CPU tensor of a format that has one), and the shard is one run of rows with scales of its own. Fused
    tensor-parallel shards ([q_r; k_r; v_r]) and shards whose amax vLLM all-reduces take the reference, which draws
    each run at its own offset from one encoding."""
    if pick_backend(x, job.fmt, backend) == "reference":
        return False
    if job.amax is None and len(geometry.runs) == 1:
        return True
    if backend == "triton":
        raise UnsupportedVllmError(
            f"qcbguard: backend 'triton' cannot harden {job.name}: a fused tensor-parallel shard or an all-reduced "
            "scale needs the reference; set backend to auto or reference"
        )
    return False


def reference_format(name: str, device: torch.device) -> Format:
    """qcbguard's reference of a vLLM rule for weights on `device`: vLLM's per_block_cast_to_fp8 divides by 448 on a
    CPU where the GPU build multiplies by its reciprocal (kernels/formats/fp8.py); every other rule is the same."""
    if name == "fp8_per_block" and device.type == "cpu":
        return FP8_PER_BLOCK_CPU
    return get_format(name)


def current_job(call: str) -> LayerJob | None:
    """The job whose rounding call `call` is running now (None outside one, or for another call vLLM makes)."""
    job = _JOB.get()
    return job if job is not None and job.call == call else None


def run_layer(job: LayerJob, original: Callable[..., Any], method: Any, layer: torch.nn.Module) -> Any:
    """Run vLLM's process_weights_after_loading with `job` active; exactly one rounding call must be hardened."""
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
        # A layer vLLM quantizes at load ("...Online...Method": it also serves `--quantization mxfp4`/`mxfp8` on a
        # full-precision checkpoint, and online layers composed onto a pre-quantized one) is never "pre-quantized".
        if quantization in PRE_QUANTIZED and "Online" not in method_name:
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
