"""`--quantization-hook qcbguard` and `--quantization-hook-config JSON` on vLLM's command line.

vLLM loads general plugins inside AsyncEngineArgs.add_cli_args, just before it calls EngineArgs.add_cli_args to
build the parser, so the plugin wraps EngineArgs.add_cli_args to add the two flags, and EngineArgs.from_cli_args to
turn them into additional_config["qcbguard"] (which vLLM hands to every engine and worker process). The settings are
validated here, in the API server, so that a typo stops `vllm serve` before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from qcbguard_kernels.errors import QcbguardError

from .compat import is_wrapped
from .settings import ADDITIONAL_CONFIG_KEY, HOOK_NAME, HookSettings

__all__ = ["add_hook_arguments", "hook_settings_from_args", "install_cli"]

_MARK = "__qcbguard_wrapped__"


def add_hook_arguments(parser: argparse.ArgumentParser) -> None:
    if any("--quantization-hook" in action.option_strings for action in parser._actions):
        return
    group = parser.add_argument_group("qcbguard", "Harden every layer vLLM quantizes at load (qcbguard plugin).")
    group.add_argument(
        "--quantization-hook",
        choices=[HOOK_NAME],
        default=None,
        help="Run this hook on every layer vLLM quantizes at load: 'qcbguard' redraws each rounding decision "
        "stochastically from a secret seed (quantization-conditioned backdoor hardening).",
    )
    group.add_argument(
        "--quantization-hook-config",
        default=None,
        metavar="JSON",
        help="Hook settings as a JSON object: mode (harden|detect-only), on_suspicious (report|refuse), seed_file, "
        "detector_threshold, detector_sample, detector_lattice_null, allow_passthrough, backend, hessians. "
        "Same as --additional-config '{\"qcbguard\": {...}}'.",
    )


def hook_settings_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The qcbguard settings the flags ask for (validated), or None without --quantization-hook."""
    hook = getattr(args, "quantization_hook", None)
    raw = getattr(args, "quantization_hook_config", None)
    if hook is None:
        if raw is not None:
            raise QcbguardError("--quantization-hook-config needs --quantization-hook qcbguard")
        return None
    try:
        settings = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise QcbguardError(f"--quantization-hook-config is not valid JSON: {exc}") from None
    HookSettings.from_mapping(settings)
    return settings


def _wrap_add_cli_args(engine_args_cls: type) -> None:
    original = engine_args_cls.__dict__["add_cli_args"].__func__

    def add_cli_args(parser: Any, *args: Any, **kwargs: Any) -> Any:
        parser = original(parser, *args, **kwargs)
        add_hook_arguments(parser)
        return parser

    setattr(add_cli_args, _MARK, True)
    engine_args_cls.add_cli_args = staticmethod(add_cli_args)


def _wrap_from_cli_args(engine_args_cls: type) -> None:
    original = engine_args_cls.__dict__["from_cli_args"].__func__

    def from_cli_args(cls: type, args: argparse.Namespace) -> Any:
        engine_args = original(cls, args)
        settings = hook_settings_from_args(args)
        extra = dict(engine_args.additional_config or {})
        if settings is not None:
            if ADDITIONAL_CONFIG_KEY in extra and extra[ADDITIONAL_CONFIG_KEY] != settings:
                raise QcbguardError(
                    "qcbguard settings given twice (--quantization-hook-config and --additional-config) and differ"
                )
            extra[ADDITIONAL_CONFIG_KEY] = settings
            engine_args.additional_config = extra
        if ADDITIONAL_CONFIG_KEY not in extra:
            return engine_args
        HookSettings.from_mapping(extra[ADDITIONAL_CONFIG_KEY])
        from .metrics_bridge import install_collector

        install_collector()
        return engine_args

    setattr(from_cli_args, _MARK, True)
    engine_args_cls.from_cli_args = classmethod(from_cli_args)


def install_cli() -> None:
    """Wrap vLLM's EngineArgs once per process."""
    from vllm.engine.arg_utils import EngineArgs

    if not is_wrapped(EngineArgs.__dict__["add_cli_args"].__func__):
        _wrap_add_cli_args(EngineArgs)
    if not is_wrapped(EngineArgs.__dict__["from_cli_args"].__func__):
        _wrap_from_cli_args(EngineArgs)
