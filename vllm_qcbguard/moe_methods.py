"""The fused-MoE methods the hook hardens: every expert's w13 ([w1; w3], gate and up) and w2 (down), one 2-D tensor at
a time, after vLLM has rounded them and before it shuffles them into its kernel's format.

| vLLM method (--quantization) | where the hook sits | w13 as | w2 as |
|---|---|---|---|
| Int8OnlineMoEMethod (int8_per_channel_weight_only) | after _quantize_weights | int8_per_channel | int8_per_channel |
| Fp8PerTensorOnlineMoEMethod (fp8_per_tensor) | _setup_kernel's arguments | fp8_per_tensor | fp8_per_tensor |
| Fp8PerBlockOnlineMoEMethod (fp8_per_block) | _setup_kernel's arguments | fp8_per_block | fp8_per_block |
| Fp8PtpcOnlineMoEMethod (fp8_per_channel) | _setup_kernel's arguments | fp8_per_channel | fp8_per_channel |

Ptpc's w13 goes through the dynamic per-token kernel with each row a token: the per-row rule of fp8_per_channel. Where
vLLM all-reduces an amax over the ranks that tensor-shard the experts (per-tensor: each expert's; int8 and ptpc w2:
each row's), the hook reduces the same amax with vLLM's own helper first, so its reference uses vLLM's scale.

Randomness: each expert is a tensor of its own, "{prefix}.{e}.w13_weight" and "{prefix}.{e}.w2_weight" (prefix: the
layer's, "...mlp.experts"; e: the global expert id), drawn at its TP=1 coordinates (layout.expert_layout), so EP and
MoE-TP ranks hold the TP=1 codes wherever the scales agree. With the hessians setting each expert's part is hardened
with error feedback along its slice of the experts module's stacked Hessian (hook.calibration_plan). Other MoE
methods (mxfp8, mxfp4, nvfp4) are left to the model-level check, which refuses them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .hook import LayerJob, as_vllm, harden_against_vllm, reference_format
from .layout import expert_layout, layer_type
from .state import HookState, active_state

__all__ = ["EXPERT_RULES", "harden_experts", "wrap_fp8_moe_setup", "wrap_int8_moe_quantize"]


@dataclass(frozen=True)
class ExpertRule:
    """Formats of w13 and w2, and which amax vLLM all-reduces over MoE-TP ranks ("tensor", "row" or None)."""

    w13: str
    w2: str
    w13_shared: str | None
    w2_shared: str | None


EXPERT_RULES = {
    "Int8OnlineMoEMethod": ExpertRule("int8_per_channel", "int8_per_channel", None, "row"),
    "Fp8PerTensorOnlineMoEMethod": ExpertRule("fp8_per_tensor", "fp8_per_tensor", "tensor", "tensor"),
    "Fp8PerBlockOnlineMoEMethod": ExpertRule("fp8_per_block", "fp8_per_block", None, None),
    "Fp8PtpcOnlineMoEMethod": ExpertRule("fp8_per_channel", "fp8_per_channel", None, "row"),
}


def _prefix(layer: torch.nn.Module) -> str:
    return getattr(layer, "layer_name", "") or getattr(layer, "prefix", "") or type(layer).__name__


def _shared_amax(weights: torch.Tensor, shared: str | None, moe: Any) -> torch.Tensor | None:
    """Each local expert's amax ([E] per tensor, [E, rows] per row) as vLLM all-reduces it; None when unsharded."""
    tp_size = int(getattr(moe, "tp_size", 1) or 1)
    if shared is None or tp_size == 1:
        return None
    from vllm.model_executor.layers.quantization.utils.quant_utils import amax_for_moe_weight_quant, weight_amax

    amax = weight_amax(weights.flatten(1), dim=-1) if shared == "tensor" else weight_amax(weights, dim=-1)
    return amax_for_moe_weight_quant(amax, tp_size).cpu()


def harden_experts(
    state: HookState,
    method: Any,
    layer: torch.nn.Module,
    weights: tuple[torch.Tensor, torch.Tensor],
    codes: tuple[torch.Tensor, torch.Tensor],
    scales: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Check vLLM's codes and scales of every local expert against the reference and overwrite `codes` in place
    with the hardened ones. weights/codes/scales: (w13, w2), each [local experts, ...]."""
    rule = EXPERT_RULES[type(method).__name__]
    prefix = _prefix(layer)
    w13, w2 = weights
    layout = expert_layout(method.moe, getattr(layer, "_expert_map", None), tuple(w13.shape), tuple(w2.shape))
    parts = (
        ("w13", rule.w13, rule.w13_shared, layout.w13),
        ("w2", rule.w2, rule.w2_shared, layout.w2),
    )
    for (part, fmt_name, shared, geometry), fp, q, scale in zip(parts, weights, codes, scales, strict=True):
        fmt = reference_format(fmt_name, fp.device)
        amax = _shared_amax(fp, shared, method.moe)
        label = f"{layer_type(prefix)}.{part}"
        for slot, expert in enumerate(layout.global_ids):
            name = f"{prefix}.{expert}.{part}_weight"
            job = LayerJob(state, layer, type(method).__name__, fmt, name, label=label)
            job.amax = None if amax is None else amax[slot]
            packed = harden_against_vllm(job, fp[slot], {"weight": q[slot], "scale": scale[slot]}, geometry)
            q[slot].copy_(as_vllm(packed.tensors["weight"], q[slot]))


def _skip_requantized(state: HookState, method: Any, layer: torch.nn.Module) -> bool:
    if getattr(method, "requantization_source", None) is None:
        return False
    state.skip(layer, _prefix(layer), "requantization")
    return True


def wrap_int8_moe_quantize(original: Callable[..., Any]) -> Callable[..., Any]:
    """Int8OnlineMoEMethod._quantize_weights(layer[, w13_weight, w2_weight]): rounds every expert in place of the
    layer's parameters; the hook then overwrites the int8 codes before _setup_kernel repacks them."""

    def _quantize_weights(self: Any, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = active_state()
        if state is None or _skip_requantized(state, self, layer):
            return original(self, layer, *args, **kwargs)
        # vLLM 0.33 passes the weights to quantize (positionally or by name), 0.32 reads the layer's own
        w13 = args[0] if args else kwargs.get("w13_weight")
        w2 = args[1] if len(args) > 1 else kwargs.get("w2_weight")
        w13 = layer.w13_weight.data if w13 is None else w13
        w2 = layer.w2_weight.data if w2 is None else w2
        result = original(self, layer, *args, **kwargs)
        codes = (layer.w13_weight.data, layer.w2_weight.data)
        harden_experts(state, self, layer, (w13, w2), codes, (layer.w13_scale.data, layer.w2_scale.data))
        return result

    return _quantize_weights


def wrap_fp8_moe_setup(original: Callable[..., Any]) -> Callable[..., Any]:
    """_Fp8OnlineMoEBase._setup_kernel(layer, w13, w2, w13_scale, w2_scale, ...): receives vLLM's codes and scales
    while the layer still holds the full-precision experts; the hook hardens the codes it passes on."""

    def _setup_kernel(
        self: Any,
        layer: torch.nn.Module,
        w13: torch.Tensor,
        w2: torch.Tensor,
        w13_scale: torch.Tensor,
        w2_scale: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        state = active_state()
        if state is not None and type(self).__name__ in EXPERT_RULES and not _skip_requantized(state, self, layer):
            weights = (layer.w13_weight.data, layer.w2_weight.data)
            harden_experts(state, self, layer, weights, (w13, w2), (w13_scale, w2_scale))
        return original(self, layer, w13, w2, w13_scale, w2_scale, *args, **kwargs)

    return _setup_kernel
