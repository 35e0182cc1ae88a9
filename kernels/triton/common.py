"""Exact scalar rules shared by the Triton kernels: the hardening draw, C/x86 casts, IEEE roundings, cells.

Every helper is written so that the interpreter (TRITON_INTERPRET=1, numpy) and a GPU compute the same bits as the
plain-torch references on a CPU:

- Division and square root go through ``tl.math.div_rn`` / ``sqrt_rn`` (Triton's ``/`` is approximate on a GPU);
  kernels are launched with ``enable_fp_fusion=False`` so no multiply-add is contracted into an FMA.
- float -> int casts: a GPU saturates and maps NaN to 0, x86 (``cvttss2si``, what the references and ggml do) writes
  INT_MIN for NaN and out-of-range values. ``x86_to_int`` states the x86 rule explicitly.
- clamps use comparisons and ``tl.where`` (a GPU's fminf/fmaxf drop NaN, torch.clamp keeps it).
- bfloat16 values are read and rounded through their bits (the interpreter's bf16 cast flushes subnormals).
- The hardening draw is Philox-4x32-10 keyed by the tensor's 64-bit key, counter (col // 4, row, 0, 0), word col % 4,
  top 24 bits times 2**-24: bit for bit what ``qcbguard_kernels.hardening.stochastic_codes`` draws. Kernels draw a
  whole tile at once (``hardening_uniforms``), one Philox call per four adjacent columns where the tile allows.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "DTYPE_BF16",
    "DTYPE_FP16",
    "DTYPE_FP32",
    "EXACT_LAUNCH",
    "c_roundf",
    "choose_code",
    "clamp_keep_nan",
    "collapse_outside",
    "dtype_code",
    "grouped_draws",
    "hardening_uniforms",
    "integer_cells",
    "load_f32",
    "pair_uniforms",
    "round_half_even",
    "round_to",
    "store_as",
    "trunc",
    "x86_to_int",
    "x86_to_int8",
]

# Launch options every kernel here needs on a GPU: no FMA contraction, and no flush-to-zero in the libdevice
# functions that floor/ceil/abs may lower to (subnormal weights must round as on a CPU). The interpreter ignores both.
EXACT_LAUNCH = {"enable_fp_fusion": False, "enable_reflect_ftz": False}

DTYPE_FP32 = 0
DTYPE_FP16 = 1
DTYPE_BF16 = 2


def dtype_code(dtype: object) -> int:
    """The constexpr code of an input dtype (torch.float32 / float16 / bfloat16)."""
    import torch

    codes = {torch.float32: DTYPE_FP32, torch.float16: DTYPE_FP16, torch.bfloat16: DTYPE_BF16}
    return codes[dtype]


def grouped_draws(cols: int, col_offset: int) -> bool:
    """Whether a kernel's tiles may draw one Philox call per four columns (hardening_uniforms' GROUPED): every run of
    four adjacent elements of a row starts at a global column divisible by 4."""
    return cols % 4 == 0 and col_offset % 4 == 0


@triton.jit
def load_f32(ptr, offs, mask, DTYPE: tl.constexpr):
    """Load elements of the input dtype as float32, exactly (bf16 comes in as its int16 bits)."""
    if DTYPE == 2:
        raw = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
        return (raw << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def round_to(t, DTYPE: tl.constexpr):
    """Round float32 t to the input dtype (nearest, ties to even) and back: how torch finishes a bf16/fp16 op."""
    if DTYPE == 1:
        return t.to(tl.float16).to(tl.float32)
    elif DTYPE == 2:
        bits = t.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return rounded.to(tl.float32, bitcast=True)
    else:
        return t


@triton.jit
def store_as(ptr, offs, value, mask, DTYPE: tl.constexpr):
    """Store float32 values already rounded to the dtype (bf16 goes out as its int16 bits)."""
    if DTYPE == 1:
        tl.store(ptr + offs, value.to(tl.float16), mask=mask)
    elif DTYPE == 2:
        bits = (value.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
        tl.store(ptr + offs, bits, mask=mask)
    else:
        tl.store(ptr + offs, value, mask=mask)


@triton.jit
def _words(a, b, c, d):
    """Philox's four output words of each group laid out as the group's four adjacent columns (lane 0..3, in order)."""
    grouped = tl.join(tl.join(a, c), tl.join(b, d))  # [..., 2, 2]: [k, m] = word 2k + m
    return tl.reshape(grouped, (a.numel * 4,))


@triton.jit
def hardening_uniforms(key, row, col, HARDEN: tl.constexpr, GROUPED: tl.constexpr):
    """The hardening uniform of every element (row, col) of a tile: word col % 4 of Philox(key, (col // 4, row, 0, 0)),
    top 24 bits, times 2**-24 (hardening/rng.py); zeros when not hardening (the draw is compiled out).

    GROUPED: one Philox call per four columns. It needs a tile whose elements, in row-major order, come in runs of
    four that are columns 4g .. 4g + 3 of one row (the launcher checks cols % 4 == 0 and col_offset % 4 == 0; every
    kernel's tile is then built that way). Otherwise every element runs its own group's Philox and keeps its lane:
    the same bits, four times the work.
    """
    row, col = tl.broadcast(row, col)
    if not HARDEN:
        return tl.zeros(col.shape, tl.float32)
    if GROUPED:
        n: tl.constexpr = col.numel
        group = tl.min(tl.reshape(col, (n // 4, 4)), axis=1) >> 2
        group_row = tl.min(tl.reshape(row, (n // 4, 4)), axis=1)
        zero = group.to(tl.uint32) * 0
        a, b, c, d = tl.philox(key, group.to(tl.uint32), group_row.to(tl.uint32), zero, zero)
        word = tl.reshape(_words(a, b, c, d), col.shape)
    else:
        zero = col.to(tl.uint32) * 0
        a, b, c, d = tl.philox(key, (col >> 2).to(tl.uint32), row.to(tl.uint32), zero, zero)
        lane = col & 3
        word = tl.where(lane == 0, a, tl.where(lane == 1, b, tl.where(lane == 2, c, d)))
    return (word >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def pair_uniforms(key, row0, col0, row1, col1, HARDEN: tl.constexpr, GROUPED: tl.constexpr):
    """hardening_uniforms of two same-shape tiles whose elements pair up in storage (a byte's two nibbles). GROUPED
    needs (row1, col1) = (row0, col0 + 1) with col0 even: interleaved, the pairs form runs of adjacent columns."""
    both = hardening_uniforms(key, tl.join(row0, row1), tl.join(col0, col1), HARDEN, GROUPED)
    return tl.split(both)


@triton.jit
def choose_code(lower, upper, position, nearest, u, HARDEN: tl.constexpr):
    """Hardened: upper with probability `position` (u < position, both exact on the 2**-24 grid); else nearest."""
    if HARDEN:
        return tl.where(u < position, upper, lower)
    else:
        return nearest


@triton.jit
def trunc(t):
    return tl.where(t < 0.0, tl.ceil(t), tl.floor(t))


@triton.jit
def x86_to_int(t):
    """C's (int) cast of a float as x86 does it: truncation toward zero; NaN and out-of-range values give INT_MIN."""
    ok = tl.abs(t) < 2147483648.0
    safe = tl.where(ok, t, 0.0)
    return tl.where(ok, safe.to(tl.int32), -2147483648)


@triton.jit
def x86_to_int8(t):
    """C's (int8_t) cast of a float on x86 (and torch's float -> int8): the low byte of the int32 truncation."""
    low = x86_to_int(t) & 0xFF
    return (low ^ 0x80) - 0x80


@triton.jit
def round_half_even(t):
    """torch.round: nearest integer, ties to even (exact: t - floor(t) is exact in float32); inf and NaN stay."""
    f = tl.floor(t)
    d = t - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def c_roundf(t):
    """C roundf: half away from zero (t - trunc(t) is exact in float32)."""
    r = trunc(t)
    away = tl.abs(t - r) >= 0.5
    step = tl.where(t < 0.0, -1.0, 1.0)
    return tl.where(away, r + step, r)


@triton.jit
def clamp_keep_nan(t, lo, hi):
    """torch.clamp: NaN stays NaN (a GPU's fmaxf/fminf would return the bound)."""
    return tl.where(t < lo, lo, tl.where(t > hi, hi, t))


@triton.jit
def integer_cells(u, nearest, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """qcbguard_kernels.formats.cells.integer_grid_cells: (lower, upper, position) of grid coordinate u.

    A non-finite u (a degenerate scale) collapses onto the code the quantizer wrote.
    """
    finite = tl.abs(u) < float("inf")
    u = tl.where(finite, u, nearest.to(tl.float32))
    low = tl.floor(u)
    high = tl.ceil(u)
    position = u - low
    lower = clamp_keep_nan(low, QMIN, QMAX).to(tl.int32)
    upper = clamp_keep_nan(high, QMIN, QMAX).to(tl.int32)
    position = tl.where(lower == upper, 0.0, position)
    return lower, upper, position


@triton.jit
def collapse_outside(lower, upper, position, nearest):
    """Cells whose written code is neither bracketing code collapse onto it (dtype-rounded quantizers)."""
    outside = (nearest != lower) & (nearest != upper)
    return (
        tl.where(outside, nearest, lower),
        tl.where(outside, nearest, upper),
        tl.where(outside, 0.0, position),
    )
