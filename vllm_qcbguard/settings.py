"""The hook's settings: what `--quantization-hook-config` or `additional_config={"qcbguard": {...}}` may say.

Keys are the HardeningConfig fields (mode, on_suspicious, seed_file, detector_threshold, detector_sample,
detector_lattice_null) plus `allow_passthrough` (default false: a layer or method the hook cannot harden stops
start-up), `backend` (auto: the fused Triton kernels for weights on a GPU, the plain-torch reference otherwise;
triton or reference to force one) and `hessians` (a `qcbguard calibrate` file under the checkpoint's weight names:
the layers it covers get calibrated hardening). Unknown keys are refused, not ignored: a misspelt "seed_flie" must
not silently fall back to a fresh seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from qcbguard_kernels.dispatch import BACKENDS
from qcbguard_kernels.errors import QcbguardError
from qcbguard_kernels.hardening import HardeningConfig

__all__ = ["ADDITIONAL_CONFIG_KEY", "HOOK_NAME", "HookSettings"]

#: the value of --quantization-hook, and the key under vLLM's additional_config
HOOK_NAME = "qcbguard"
ADDITIONAL_CONFIG_KEY = "qcbguard"
_OWN_KEYS = ("allow_passthrough", "backend", "hessians")


@dataclass(frozen=True)
class HookSettings:
    """Validated hook settings: the hardening config and the pass-through policy."""

    hardening: HardeningConfig
    allow_passthrough: bool = False
    backend: str = "auto"
    hessians: str | None = None

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> HookSettings:
        """Parse the user's settings (a JSON object); unknown keys and wrong types are refused with a clear error."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise QcbguardError(f"qcbguard settings must be a JSON object, got {type(raw).__name__}")
        hardening_keys = {f.name for f in fields(HardeningConfig)}
        unknown = sorted(set(raw) - hardening_keys - set(_OWN_KEYS))
        if unknown:
            known = sorted(hardening_keys | set(_OWN_KEYS))
            raise QcbguardError(f"unknown qcbguard setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        passthrough = raw.get("allow_passthrough", False)
        if not isinstance(passthrough, bool):
            raise QcbguardError(f"qcbguard setting allow_passthrough must be true or false, got {passthrough!r}")
        backend = raw.get("backend", "auto")
        if backend not in BACKENDS:
            raise QcbguardError(f"qcbguard setting backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        hessians = raw.get("hessians")
        if hessians is not None and not isinstance(hessians, str):
            raise QcbguardError(f"qcbguard setting hessians must be a file path, got {hessians!r}")
        hardening = HardeningConfig.from_dict({k: v for k, v in raw.items() if k in hardening_keys})
        return cls(hardening=hardening, allow_passthrough=passthrough, backend=backend, hessians=hessians)
