"""The hardening's per-element uniforms, computed once per (seed, tensor) and shared by every format.

qcbguard's hardened code for an element is `upper if u < position else lower`, where u is the element's uniform from
qcbguard_kernels.hardening.rng.uniform_grid (Philox-4x32-10, key = HMAC(seed, tensor name), counter from the
element's coordinates). u depends on the seed, the tensor's name and the element's coordinates, not on the format, so
a benchmark that hardens the same model in ten formats draws u once per seed and tensor and reuses it: the codes are
then exactly `stochastic_codes(fmt.encode(w), seed.key_for(name))` (bench_real_model.py checks this byte for byte
against `harden_tensor` for one tensor per format).
"""

from __future__ import annotations

import torch

from qcbguard_kernels.hardening.rng import uniform_grid

__all__ = ["philox_uniforms"]

_ROWS_ELEMENTS = 1 << 20  # uniforms drawn per pass (whole rows), to bound the Philox temporaries


def philox_uniforms(key: int, shape: torch.Size, stream: int = 0) -> torch.Tensor:
    """float32 uniforms on the 2**-24 grid, one per element of a 2-D tensor of `shape`. Stream 0 is exactly what
    qcbguard_kernels.hardening.stochastic_codes draws; the prototypes in variants.py take extra draws from stream 1,
    independent of stream 0."""
    rows, cols = shape
    step = max(1, _ROWS_ELEMENTS // max(cols, 1))
    return torch.cat([uniform_grid(key, r, min(step, rows - r), 0, cols, stream) for r in range(0, rows, step)])
