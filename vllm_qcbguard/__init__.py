"""vLLM adapter: `--quantization-hook qcbguard` hardens every layer vLLM quantizes at load, with metrics.

Registered through the `vllm.general_plugins` entry point (`register`), which vLLM runs in every process it starts
(API server, engine core, workers). Installing the plugin changes nothing until the hook is asked for:
`--quantization-hook qcbguard` on the command line, or `additional_config={"qcbguard": {...}}`.
"""

from __future__ import annotations

from .compat import SUPPORTED_VLLM, UnsupportedVllmError
from .plugin import register
from .settings import HOOK_NAME, HookSettings

__all__ = ["HOOK_NAME", "SUPPORTED_VLLM", "HookSettings", "UnsupportedVllmError", "register"]
