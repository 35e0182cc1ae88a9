"""The hardening's per-element uniforms, computed once per (seed, tensor) and shared by every format.

qcbguard's hardened code for an element is `upper if u < position else lower`, where u = uniform24(Philox-4x32-10
(key = HMAC(seed, tensor name), counter = (col, row, 0, 0))). u depends on the seed, the tensor's name and the
element's coordinates, not on the format, so a benchmark that hardens the same model in ten formats draws u once per
seed and tensor and reuses it: the codes are then exactly `stochastic_codes(fmt.encode(w), seed.key_for(name))`
(bench_real_model.py checks this byte for byte against `harden_tensor` for one tensor per format).

`philox_uniforms` computes the same stream as qcbguard_kernels.hardening.rng.philox4x32, but takes each 32 x 32-bit
product with one int64 multiply (the product of two values below 2**32 wraps modulo 2**64 in int64, and its hi and lo
words are read off with a shift and a mask) instead of four 16-bit limb products: about three times faster in torch
on CPU, and checked equal to the kernels' reference on every call's first row.
"""

from __future__ import annotations

import torch

from qcbguard_kernels.hardening.rng import philox4x32, uniform24

__all__ = ["philox_uniforms"]

_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _philox_c0(key: int, c0: torch.Tensor, c1: torch.Tensor, stream: int) -> torch.Tensor:
    """First output word of Philox-4x32-10(key, (c0, c1, stream, 0)), uint32 values in int64."""
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    c0, c1 = torch.broadcast_tensors(c0, c1)
    c2 = torch.full_like(c0, stream)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        pb = c2 * _ROUND_B  # < 2**64: wraps in int64, bits intact
        pa = c0 * _ROUND_A
        c0, c1, c2, c3 = ((pb >> 32) & _MASK32) ^ c1 ^ k0, pb & _MASK32, ((pa >> 32) & _MASK32) ^ c3 ^ k1, pa & _MASK32
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def philox_uniforms(key: int, shape: torch.Size, stream: int = 0) -> torch.Tensor:
    """float32 uniforms on the 2**-24 grid, one per element of a 2-D tensor of `shape`, from counter
    (col, row, stream, 0). Stream 0 is exactly what qcbguard_kernels.hardening.stochastic_codes draws; the
    prototypes in variants.py take extra draws from stream 1, independent of stream 0."""
    rows, cols = shape
    r = torch.arange(rows, dtype=torch.int64).unsqueeze(1)
    c = torch.arange(cols, dtype=torch.int64).unsqueeze(0)
    u = uniform24(_philox_c0(key, c, r, stream))
    zero = torch.zeros((), dtype=torch.int64)
    reference, _, _, _ = philox4x32(key, c, r[:1], torch.full((), stream, dtype=torch.int64), zero)
    if not torch.equal(uniform24(reference), u[:1]):
        raise RuntimeError("fast Philox disagrees with qcbguard_kernels.hardening.rng.philox4x32")
    return u
