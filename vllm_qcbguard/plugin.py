"""The plugin entry point: install the CLI flags and the hook's wrappers, once per process, on a supported vLLM."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .compat import UnsupportedVllmError, check_vllm_version, wrap_attribute

__all__ = ["register"]

logger = logging.getLogger("vllm_qcbguard")


def register() -> None:
    """vllm.general_plugins entry point. Idempotent: every wrapper is applied at most once per process.

    On a vLLM outside the supported range nothing is wrapped and the --quantization-hook flag is not added, so
    asking for the hook fails at argument parsing, and additional_config["qcbguard"] fails at model load (the
    model-level wrapper below is what raises). Without the hook vLLM runs as if the plugin were absent.
    """
    import vllm

    try:
        check_vllm_version(vllm.__version__)
    except Exception as exc:  # an unsupported vLLM must still run when the hook is not asked for
        logger.warning("qcbguard: %s", exc)
        _install_refusal(str(exc))
        return

    try:
        _install_wrappers()
    except UnsupportedVllmError as exc:  # a supported release whose code moved: refuse the hook, run without it
        logger.warning("qcbguard: %s", exc)
        _install_refusal(str(exc))


def _install_wrappers() -> None:
    """Every vLLM function the hook wraps (linear_methods.py and moe_methods.py say why each)."""
    from vllm import _custom_ops
    from vllm.model_executor.layers.quantization import torchao
    from vllm.model_executor.layers.quantization.online import fp8, int8, mxfp4, mxfp8
    from vllm.model_executor.model_loader import base_loader

    from . import hook, moe_methods
    from . import linear_methods as lm
    from .cli import install_cli

    install_cli()
    # linear layers: the method's process_weights_after_loading opens a job, its rounding call is hardened
    for method, fmt, call, amax in (
        (fp8.Fp8PtpcOnlineLinearMethod, "fp8_per_channel", "_fp8_quant_per_channel", lm.row_parallel_row_amax),
        (fp8.Fp8PerTensorOnlineLinearMethod, "fp8_per_tensor", "scaled_fp8_quant", lm.sharded_tensor_amax),
        (fp8.Fp8PerBlockOnlineLinearMethod, "fp8_per_block", "per_block_cast_to_fp8", None),
        (mxfp8.Mxfp8OnlineLinearMethod, "mxfp8", "mxfp8_e4m3_quantize", None),
        (mxfp4.Mxfp4OnlineLinearMethod, "mxfp4", "mxfp4_quantize", None),
    ):
        wrap_attribute(method, "process_weights_after_loading", lm.wrap_online_linear_process(fmt, call, amax))
    wrap_attribute(fp8, "_fp8_quant_per_channel", lm.wrap_fp8_channel_quant)
    wrap_attribute(_custom_ops, "scaled_fp8_quant", lm.wrap_scaled_fp8_quant)
    wrap_attribute(fp8, "per_block_cast_to_fp8", lm.wrap_per_block_cast)
    wrap_attribute(mxfp8, "mxfp8_e4m3_quantize", lm.wrap_mx_quantize("mxfp8_e4m3_quantize"))
    wrap_attribute(mxfp4, "mxfp4_quantize", lm.wrap_mx_quantize("mxfp4_quantize"))
    wrap_attribute(torchao.TorchAOLinearMethod, "process_weights_after_loading", lm.wrap_torchao_process)
    wrap_attribute(torchao, "torchao_quantize_param_data", lm.wrap_torchao_quantize)
    # fused experts: between vLLM's rounding and its kernel-format shuffle
    wrap_attribute(int8.Int8OnlineMoEMethod, "_quantize_weights", moe_methods.wrap_int8_moe_quantize)
    wrap_attribute(fp8._Fp8OnlineMoEBase, "_setup_kernel", moe_methods.wrap_fp8_moe_setup)
    # the model-level check: every quantized layer hardened or knowingly left alone
    wrap_attribute(base_loader, "process_weights_after_loading", hook.wrap_process_model)


def _install_refusal(message: str) -> None:
    """On an unsupported vLLM: loading a model with the hook requested stops with `message`."""
    try:
        from vllm.model_executor.model_loader import base_loader
    except ImportError:
        return

    from .state import active_state

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def process_weights_after_loading(model: Any, model_config: Any, target_device: Any) -> Any:
            if active_state() is not None:
                raise UnsupportedVllmError(message)
            return original(model, model_config, target_device)

        return process_weights_after_loading

    wrap_attribute(base_loader, "process_weights_after_loading", make)
