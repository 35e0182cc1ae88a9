"""Absmax-int family in one Triton kernel: bnb_int8, int8_per_channel, torchao_int8 (rows) and torchao_int4 (groups).

One program quantizes one scale group (a whole row for the int8 rules, ``group_size`` columns for int4): a first
sweep reduces absmax / min / max, a second computes every element's code (round-to-nearest exactly as the reference,
or the Philox draw over its cell) and writes the native bytes. The rule is a constexpr:

- RULE_BNB (bitsandbytes LLM.int8, float32): ``u = x * (reciprocal(rowmax) * 127)``, torch.round, int8 cast.
- RULE_VLLM (vLLM int8_per_channel, in the weight dtype): ``scale = amax / 127`` (float32 weights: times
  float32(1/127)), codes ``clamp(round(x / scale), -127, 127)`` with the quotient rounded to the weight dtype.
- RULE_TORCHAO (torchao Int8WeightOnlyConfig): ``scale = max(bound / 127.5, 2**-23)`` in the weight dtype, codes
  ``clamp(round(x * (1 / scale)), -128, 127)`` in float32.
- RULE_INT4 (torchao tinygemm int4): ``scale = max((max - min) / 15, eps)``, ``zero = min + 8 * scale``, codes
  ``clamp(round((x - (zero - 8 * scale)) / scale), 0, 15)``, every op rounded to the weight dtype; two codes a byte,
  element 2j in the high nibble.

Each op of a bf16/fp16 reference is computed in float32 and rounded to the dtype, which is what torch does on a CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.base import Format, QuantizedTensor
from .common import (
    EXACT_LAUNCH,
    choose_code,
    clamp_keep_nan,
    collapse_outside,
    dtype_code,
    grouped_draws,
    hardening_uniforms,
    integer_cells,
    load_f32,
    pair_uniforms,
    round_half_even,
    round_to,
    store_as,
    x86_to_int,
    x86_to_int8,
)

__all__ = ["quantize_absmax_int"]

RULE_BNB = 0
RULE_VLLM = 1
RULE_TORCHAO = 2
RULE_INT4 = 3

INV_127 = tl.constexpr(float(torch.tensor(1.0 / 127.0, dtype=torch.float32)))  # vLLM on CUDA: amax * float32(1/127)
_TORCHAO_EPS = float(torch.finfo(torch.float32).eps)


@triton.jit
def _code(x, scale, recip, zero, lo_bound, draw, RULE: tl.constexpr, DTYPE: tl.constexpr, HARDEN: tl.constexpr):
    """Code of float32 x (exact value of the input) given its group's scale parameters."""
    if RULE == 0:
        u = x * recip
        nearest = x86_to_int8(round_half_even(u))
        lower, upper, position = integer_cells(u, nearest, -127, 127)
    elif RULE == 1:
        q = round_half_even(round_to(tl.math.div_rn(x, scale), DTYPE))
        nearest = x86_to_int8(clamp_keep_nan(q, -127.0, 127.0))
        u = tl.math.div_rn(x, scale)
        lower, upper, position = integer_cells(u, nearest, -127, 127)
        lower, upper, position = collapse_outside(lower, upper, position, nearest)
    elif RULE == 2:
        q = round_half_even(x * recip)
        nearest = x86_to_int8(clamp_keep_nan(q, -128.0, 127.0))
        u = tl.math.div_rn(x, scale)
        lower, upper, position = integer_cells(u, nearest, -128, 127)
        lower, upper, position = collapse_outside(lower, upper, position, nearest)
    else:
        shifted = round_to(x - lo_bound, DTYPE)
        q = clamp_keep_nan(round_half_even(round_to(tl.math.div_rn(shifted, scale), DTYPE)), 0.0, 15.0)
        nearest = x86_to_int(q) & 0xF
        u = tl.math.div_rn(x - zero, scale) + 8.0
        lower, upper, position = integer_cells(u, nearest, 0, 15)
        lower, upper, position = collapse_outside(lower, upper, position, nearest)
    return choose_code(lower, upper, position, nearest, draw, HARDEN)


@triton.jit
def absmax_int_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    zero_ptr,
    key,
    cols,
    group_len,
    groups,
    row_offset,
    col_offset,
    eps,
    RULE: tl.constexpr,
    DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    HARDEN: tl.constexpr,
    GROUPED: tl.constexpr,
):
    row = tl.program_id(0)
    group = tl.program_id(1)
    base = row.to(tl.int64) * cols + group * group_len
    lanes = tl.arange(0, CHUNK)
    amax = tl.zeros((), tl.float32)
    hi = tl.full((), float("-inf"), tl.float32)
    lo = tl.full((), float("inf"), tl.float32)
    for start in range(0, group_len, CHUNK):
        offs = start + lanes
        mask = offs < group_len
        x = load_f32(x_ptr, base + offs, mask, DTYPE)
        amax = tl.maximum(amax, tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(mask, x, float("-inf")), axis=0))
        lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), axis=0))

    scale = amax
    recip = amax
    zero = amax
    lo_bound = amax
    if RULE == 0:
        recip = tl.math.div_rn(1.0, amax) * 127.0
        tl.store(scale_ptr + row, amax)
    elif RULE == 1:
        if DTYPE == 0:
            scale = amax * INV_127  # as CUDA divides a float32 by a Python scalar
        else:
            scale = round_to(tl.math.div_rn(amax, 127.0), DTYPE)
        tl.store(scale_ptr + row, scale)
    elif RULE == 2:
        bound = tl.maximum(-tl.minimum(lo, 0.0), tl.maximum(hi, 0.0))
        scale = round_to(tl.math.div_rn(bound, 127.5), DTYPE)
        scale = tl.where(scale < eps, eps, scale)
        recip = tl.math.div_rn(1.0, scale)
        tl.store(scale_ptr + row, scale)
    else:
        scale = round_to(tl.math.div_rn(round_to(hi - lo, DTYPE), 15.0), DTYPE)
        scale = tl.where(scale < eps, eps, scale)
        eight = round_to(scale * 8.0, DTYPE)
        zero = round_to(lo + eight, DTYPE)
        lo_bound = round_to(zero - eight, DTYPE)
        # scale_and_zero is [groups, rows, 2] in the weight dtype
        sz = (group.to(tl.int64) * tl.num_programs(0) + row) * 2
        store_as(scale_ptr, sz, scale, True, DTYPE)
        store_as(scale_ptr, sz + 1, zero, True, DTYPE)

    grow = row + row_offset
    if RULE == 3:
        pair_lanes = tl.arange(0, CHUNK // 2)
        for start in range(0, group_len, CHUNK):
            even = start + 2 * pair_lanes
            mask = even < group_len
            gcol = group * group_len + even
            x0 = load_f32(x_ptr, base + even, mask, DTYPE)
            x1 = load_f32(x_ptr, base + even + 1, mask, DTYPE)
            draw0, draw1 = pair_uniforms(key, grow, gcol + col_offset, grow, gcol + 1 + col_offset, HARDEN, GROUPED)
            c0 = _code(x0, scale, recip, zero, lo_bound, draw0, RULE, DTYPE, HARDEN)
            c1 = _code(x1, scale, recip, zero, lo_bound, draw1, RULE, DTYPE, HARDEN)
            byte = ((c0 << 4) | c1).to(tl.uint8)
            tl.store(q_ptr + (row.to(tl.int64) * cols + gcol) // 2, byte, mask=mask)
    else:
        for start in range(0, group_len, CHUNK):
            offs = start + lanes
            mask = offs < group_len
            x = load_f32(x_ptr, base + offs, mask, DTYPE)
            draw = hardening_uniforms(key, grow, offs + col_offset, HARDEN, GROUPED)
            c = _code(x, scale, recip, zero, lo_bound, draw, RULE, DTYPE, HARDEN)
            tl.store(q_ptr + base + offs, c.to(tl.int8), mask=mask)


def _rule(fmt: Format) -> int:
    if fmt.name == "bnb_int8":
        return RULE_BNB
    if fmt.name == "torchao_int4":
        return RULE_INT4
    return RULE_VLLM if fmt.rule.quotient == "divide" else RULE_TORCHAO


def quantize_absmax_int(
    fmt: Format, x: torch.Tensor, key: int | None, row_offset: int, col_offset: int
) -> QuantizedTensor:
    """Launch the absmax-int kernel for a validated tensor; returns the format's native tensors."""
    rule = _rule(fmt)
    dtype = dtype_code(x.dtype)
    cols = x.shape[-1]
    rows = x.numel() // cols
    src = x.contiguous()
    src = src.view(torch.int16) if x.dtype == torch.bfloat16 else src
    device = x.device
    if rule == RULE_INT4:
        group_len = fmt.group_size
        groups = cols // group_len
        q = torch.empty(rows, cols // 2, dtype=torch.uint8, device=device)
        sz = torch.empty(groups, rows, 2, dtype=x.dtype, device=device)
        scale_out = sz.view(torch.int16) if x.dtype == torch.bfloat16 else sz
        eps_value = fmt.eps if fmt.eps is not None else torch.finfo(x.dtype).smallest_normal
        eps = float(torch.tensor(eps_value, dtype=x.dtype).float())
        chunk = triton.next_power_of_2(group_len)
        # a group is one program: four elements per thread, so each thread's Philox call serves all four draws
        warps = max(1, min(4, chunk // 128))
    else:
        group_len, groups = cols, 1
        q = torch.empty(x.shape, dtype=torch.int8, device=device)
        scale_out = torch.empty(rows, dtype=torch.float32, device=device)
        eps = _TORCHAO_EPS
        chunk = min(triton.next_power_of_2(cols), 2048)
        warps = 4
    absmax_int_kernel[(rows, groups)](
        src,
        q,
        scale_out,
        scale_out,
        0 if key is None else key,
        cols,
        group_len,
        groups,
        row_offset,
        col_offset,
        eps,
        RULE=rule,
        DTYPE=dtype,
        CHUNK=chunk,
        HARDEN=key is not None,
        GROUPED=grouped_draws(cols, col_offset),
        num_warps=warps,
        **EXACT_LAUNCH,
    )
    if rule == RULE_BNB:
        return QuantizedTensor(fmt.name, x.shape, {"int8": q, "row_stats": scale_out})
    if rule == RULE_VLLM:
        return QuantizedTensor(fmt.name, x.shape, {"weight": q, "scale": scale_out.view(x.shape[:-1])})
    if rule == RULE_TORCHAO:
        scale = scale_out.view(*x.shape[:-1], 1)
        zero = torch.zeros_like(scale, dtype=torch.int8)
        return QuantizedTensor(fmt.name, x.shape, {"qdata": q, "scale": scale, "zero_point": zero})
    return QuantizedTensor(fmt.name, x.shape, {"qdata": q, "scale_and_zero": sz})
