"""One entry point for quantizing (and hardening) a tensor: a fused Triton kernel on a GPU, a fused native pass on a
CPU where the format has one (Format.native_quantize: vLLM's per-tensor and per-channel fp8, GGUF's legacy types),
the reference elsewhere.

Every path produces the same bytes for the same input, format, tensor name and seed (the tests prove it under
TRITON_INTERPRET=1 on a CPU, and on CUDA where a GPU is present; the native pass against the reference on the CPU):
the scales are the standard quantizer's, and a hardened code is drawn from the same Philox stream, indexed by the
element's global (row, column).

Backend choice: ``backend="auto"`` (default) takes Triton for CUDA tensors when Triton is installed and covers the
format's family, the fused native pass for CPU tensors of a format that has one, the reference otherwise.
``"triton"`` forces the kernels (on a CPU tensor this only works under TRITON_INTERPRET=1, for tests) and refuses
when they cannot run; ``"reference"`` forces the encode-and-pack path.
The environment variable QCBGUARD_BACKEND sets the default for ``"auto"`` calls (``triton`` or ``reference``).
"""

from __future__ import annotations

import os
import time

import torch

from .errors import QcbguardError, UnsupportedInputError
from .formats.base import Format, QuantizedTensor
from .hardening.config import HardeningConfig
from .hardening.harden import Screened, TensorReport, screen, stochastic_codes, tensor_report
from .hardening.seed import DeploymentSeed
from .triton import quantize_triton, supports, triton_available

__all__ = ["BACKENDS", "FusedKernelError", "harden_fused", "pick_backend", "quantize_packed", "resolve_backend"]

BACKENDS = ("auto", "triton", "reference")
_ENV = "QCBGUARD_BACKEND"
_COUNTER_LIMIT = 2**32


class FusedKernelError(QcbguardError):
    """A fused kernel failed to run (not a refusal of the input): the reference backend is the way around."""


def resolve_backend(backend: str = "auto") -> str:
    """The backend a caller asked for, with "auto" replaced by QCBGUARD_BACKEND when that is set (an unknown value of
    either is refused). Callers that place tensors before quantizing them decide with this, as pick_backend does."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(_ENV, "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{_ENV}={backend!r} is not one of {BACKENDS}")
    return backend


def pick_backend(x: torch.Tensor, fmt: Format, backend: str = "auto") -> str:
    """'triton', 'native' or 'reference' for this tensor and format; a forced Triton that cannot run is refused.
    'native' is auto's choice on a CPU where the format fuses quantizing into one native pass (Format.fuses_on_cpu)."""
    backend = resolve_backend(backend)
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if not triton_available():
            raise UnsupportedInputError("backend 'triton' asked for, but the triton package is not installed")
        if not supports(fmt):
            raise UnsupportedInputError(
                f"no Triton kernel covers {fmt.name} (family {fmt.family}); use backend='reference'"
            )
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise UnsupportedInputError(
                "backend 'triton' on a CPU tensor needs TRITON_INTERPRET=1 (the interpreter); move the tensor to a GPU"
            )
        return "triton"
    if x.is_cuda and triton_available() and supports(fmt):
        return "triton"
    return "native" if (backend == "auto" and fmt.fuses_on_cpu(x)) else "reference"


def quantize_packed(
    x: torch.Tensor,
    fmt: Format,
    name: str = "tensor",
    seed: DeploymentSeed | None = None,
    *,
    row_offset: int = 0,
    col_offset: int = 0,
    backend: str = "auto",
) -> QuantizedTensor:
    """Quantize x in fmt to its native packed layout: round-to-nearest when seed is None, else hardened.

    Hardened codes are the upper code of each element's cell with probability equal to its position, drawn from
    Philox keyed by ``seed.key_for(name)`` at counter (col + col_offset, row + row_offset, 0, 0): a shard placed by
    its offsets gets exactly the codes of the same elements of the whole tensor. Output tensors live on x's device.
    """
    _check_offsets(row_offset, col_offset)
    chosen = pick_backend(x, fmt, backend)
    key = None if seed is None else seed.key_for(name)
    if chosen == "reference":
        enc = fmt.encode(x, name)
        codes = None if key is None else stochastic_codes(enc, key, row_offset, col_offset)
        return fmt.pack(enc, codes)
    if chosen == "native":  # native_quantize validates x itself
        _check_coordinates(x, row_offset, col_offset)
        nearest, hardened, _ = fmt.native_quantize(x, name, key, row_offset, col_offset)
        return nearest if hardened is None else hardened
    fmt.validate(x, name)
    _check_coordinates(x, row_offset, col_offset)
    return quantize_triton(fmt, x, key, row_offset, col_offset)


def _check_offsets(row_offset: int, col_offset: int) -> None:
    if row_offset < 0 or col_offset < 0:
        raise ValueError(f"row_offset and col_offset must be >= 0, got {row_offset}, {col_offset}")


def _check_coordinates(x: torch.Tensor, row_offset: int, col_offset: int) -> None:
    """What the fused paths need besides the format's input rules: global coordinates within 32-bit Philox counters."""
    cols = x.shape[-1] if x.dim() else 1
    if (x.numel() // cols) + row_offset > _COUNTER_LIMIT or cols + col_offset > _COUNTER_LIMIT:
        raise ValueError("tensor coordinates must stay below 2**32 (Philox counters are 32-bit)")


def harden_fused(
    x: torch.Tensor,
    fmt: Format,
    name: str,
    seed: DeploymentSeed,
    config: HardeningConfig | None = None,
    *,
    row_offset: int = 0,
    col_offset: int = 0,
    backend: str = "auto",
    screened: Screened | None = None,
) -> tuple[QuantizedTensor, QuantizedTensor, TensorReport]:
    """harden_tensor through the fused kernels: (round-to-nearest, what the config asks for, report), on x's device.

    The bytes are harden_tensor's. The detector scores the same CPU sample as every other path under the seed
    (detection.sampling, at most config.detector_sample weights), so the verdict is the reference's. Codes changed
    are counted by the native pass, or on the Triton outputs' dequantized values (a moved code dequantizes to another
    value, except in a block whose scale is zero, where no code matters); stochastic rounding moves a code by at most
    one step, so the mean change in steps is the share changed; the steerable count is the sample's (exact when the
    sample is the whole tensor), scaled to the tensor.
    `screened`: screen()'s result for the whole tensor, when x is one of its row chunks (as in harden_tensor).
    """
    _check_offsets(row_offset, col_offset)
    config = config or HardeningConfig()
    start = time.perf_counter()
    score, judged = screened if screened is not None else screen(x, fmt, name, config, seed=seed)
    place = {"row_offset": row_offset, "col_offset": col_offset, "backend": backend}
    key = seed.key_for(name) if config.mode == "harden" else None
    try:
        if pick_backend(x, fmt, backend) == "native":  # both outputs and the count from one pass
            _check_coordinates(x, row_offset, col_offset)
            nearest, hardened, changed = fmt.native_quantize(x, name, key, row_offset, col_offset)
            out = nearest if hardened is None else hardened
        else:
            nearest = quantize_packed(x, fmt, name, None, **place)
            out, changed = nearest, 0
            if key is not None:
                out = quantize_packed(x, fmt, name, seed, **place)
                changed = int((fmt.dequantize(out) != fmt.dequantize(nearest)).count_nonzero())
    except QcbguardError:
        raise
    except Exception as exc:  # a kernel or device failure: stop, and say how to harden without the kernels
        raise FusedKernelError(
            f"the fused {fmt.family} kernel failed on tensor {name!r} ({type(exc).__name__}: {exc}); the plain-torch "
            "reference (backend 'reference') hardens the same bytes without it"
        ) from exc
    n = x.numel()
    report = tensor_report(
        name,
        fmt,
        config,
        (score, judged),
        start,
        elements=n,
        steerable=round(score.steerable * n / score.elements),
        codes_changed=changed,
        mean_change_steps=changed / n,
        max_change_steps=int(changed > 0),
    )
    return nearest, out, report
