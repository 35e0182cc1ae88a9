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

    from vllm.model_executor.layers.quantization import torchao
    from vllm.model_executor.layers.quantization.online import fp8
    from vllm.model_executor.model_loader import base_loader

    from . import hook
    from .cli import install_cli

    install_cli()
    wrap_attribute(fp8.Fp8PtpcOnlineLinearMethod, "process_weights_after_loading", hook.wrap_ptpc_process)
    wrap_attribute(fp8, "_fp8_quant_per_channel", hook.wrap_fp8_channel_quant)
    wrap_attribute(torchao.TorchAOLinearMethod, "process_weights_after_loading", hook.wrap_torchao_process)
    wrap_attribute(torchao, "torchao_quantize_param_data", hook.wrap_torchao_quantize)
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
