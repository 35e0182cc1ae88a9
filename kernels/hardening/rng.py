"""Counter-based randomness for hardening: Philox-4x32-10, bit-identical with Triton's tl.philox.

Every random draw is a pure function of (key, counter): the key comes from the deployment's secret seed and the tensor's
name, the counter from the element's global coordinates. The stream therefore does not depend on chunking, device,
thread count or how a tensor is sharded, and the Triton kernels draw the very same bits in registers.

One Philox call yields four 32-bit words, so one counter serves four adjacent columns: element (row, col) takes word
col % 4 of Philox(key, (col // 4, row, stream, 0)). Each word is as uniform and as independent of the others as a
word from a counter of its own (Philox's outputs are a bijection of the counter under the key), and the stream costs a
quarter of the Philox rounds of one call per element.
"""

from __future__ import annotations

import hashlib
import hmac

import torch

from .. import native

__all__ = [
    "LANES",
    "PHILOX_ROUNDS",
    "philox4x32",
    "tensor_key",
    "uniform24",
    "uniform_grid",
    "uniform_grid_reference",
]

PHILOX_ROUNDS = 10
LANES = 4  # output words per Philox call: adjacent columns 4g .. 4g + 3 share counter g
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * b, for uint32 values in int64.

    The product can pass 2**63: torch's int64 multiply wraps in two's complement (checked at import by
    _check_wrapping), so its 64 bits are the unsigned product's and the arithmetic shift, masked, gives the high word.
    One multiply instead of four 16-bit limb products: Philox runs about 4x faster on CPU."""
    p = b * a
    hi = (p >> 32).bitwise_and_(_MASK32)
    return hi, p.bitwise_and_(_MASK32)  # in place: every temporary is our own, and fewer of them (memory-bound)


def _check_wrapping() -> None:
    """Fail closed where int64 multiplication does not wrap (it does on every torch backend we know)."""
    b = torch.tensor([0xFFFFFFFF, 0x80000000, 0x9E3779B9], dtype=torch.int64)
    for a in (_ROUND_A, _ROUND_B):
        hi, lo = _mulhilo(a, b)
        expected = [((a * v) >> 32, (a * v) & _MASK32) for v in b.tolist()]
        if list(zip(hi.tolist(), lo.tolist(), strict=True)) != expected:
            raise RuntimeError("torch int64 multiplication does not wrap on this platform: Philox would be wrong")


def philox4x32(
    key: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, rounds: int = PHILOX_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32 with a 64-bit key, as triton.language.philox(key, c0, c1, c2, c3) computes it.

    Counters are uint32 values in int64 tensors (any shape, broadcast together); returns four int64 tensors of uint32.
    """
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    c0, c1, c2, c3 = torch.broadcast_tensors(*(c.to(torch.int64) & _MASK32 for c in (c0, c1, c2, c3)))
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0), lo_b, hi_a.bitwise_xor_(c3).bitwise_xor_(k1), lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


_check_wrapping()


def uniform24(bits: torch.Tensor) -> torch.Tensor:
    """uint32 draws -> float32 uniforms on the 2**-24 grid of [0, 1), exactly representable (no rounding)."""
    return (bits >> 8).to(torch.float32) * (2.0**-24)


def uniform_grid(key: int, row_start: int, rows: int, col_start: int, cols: int, stream: int = 0) -> torch.Tensor:
    """float32 uniforms [rows, cols] of the elements at global rows row_start.. and columns col_start..: word
    col % 4 of Philox(key, (col // 4, row, stream, 0)), its top 24 bits times 2**-24. Natively where built (the
    same bits: qcbguard_kernels.native), else uniform_grid_reference."""
    if native.enabled():
        return native.philox_uniform_grid(key, row_start, rows, col_start, cols, stream)
    return uniform_grid_reference(key, row_start, rows, col_start, cols, stream)


def uniform_grid_reference(
    key: int, row_start: int, rows: int, col_start: int, cols: int, stream: int = 0
) -> torch.Tensor:
    """uniform_grid in plain torch: philox4x32 over the row's counters, words interleaved back onto the columns."""
    first, end = col_start // LANES, -(-(col_start + cols) // LANES)
    groups = torch.arange(first, end, dtype=torch.int64).unsqueeze(0)
    row = torch.arange(row_start, row_start + rows, dtype=torch.int64).unsqueeze(1)
    words = philox4x32(key, groups, row, torch.tensor(stream), torch.zeros((), dtype=torch.int64))
    bits = torch.stack(words, dim=-1).reshape(rows, (end - first) * LANES)  # columns 4g + lane, in order
    lead = col_start - first * LANES
    return uniform24(bits[:, lead : lead + cols])


def tensor_key(seed: bytes, tensor_name: str) -> int:
    """The 64-bit Philox key of one tensor: HMAC-SHA256(seed, name), so keys of different tensors are independent and
    reveal nothing about the seed."""
    digest = hmac.new(seed, tensor_name.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little")
