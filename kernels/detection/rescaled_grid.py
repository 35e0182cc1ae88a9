"""Is a tensor a format's grid under slightly different scales? A second test of grid alignment.

A model dequantized from a format is grid-aligned when its weights equal their codes' values to the checkpoint's
precision (CellScore.grid_aligned). That fails wherever re-encoding the dequantized weights does not return the
scales they came from, although every weight still sits on its code: the block's largest weight, which sets the
scale, was rounded to the storage dtype (a model quantized from fp16 or fp32 weights and stored in bf16 moves its
scales by up to half a bf16 ulp, 2^-9 relative), or the scale rule does not round-trip (torchao's int8 scale amax /
127.5 with codes to -128 comes back 128 / 127.5 of itself). Measured on Gaussian weights quantized from fp16 or fp32
and stored in bf16: the local decoys flagged nearly every format's dequantized tensors under that same format.

The test: per scale group (CodeValueRule.group consecutive weights), the most weights w whose nearest code's value
v is one common factor alpha away to storage precision, |w - alpha v| <= half an ulp of w, with alpha within
_MAX_RESCALE of 1. Each weight admits an interval of alpha; the best alpha is the deepest point of the group's
intervals (one sort of their ends). Safe for the same reason as grid alignment: such weights carry no rounding
freedom, and the quantized model is the full-precision one with each scale group multiplied by 1 / alpha, the
freedom an attacker already has by picking a block's largest weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..formats.base import CodeValueRule

#: the largest rescale of a group admitted, |alpha - 1| (torchao's 128 / 127.5: 2^-8; a bf16 re-rounding: 2^-9)
_MAX_RESCALE = 2.0**-7
#: weights a first look reads: the first whole scale groups up to this many (or the first this many of one larger
#: group). Only a share the first look finds below the rule stands on it: a tensor is judged aligned on all its
#: weights, or a crafted head would buy an attacked rest an exemption.
FIRST_LOOK = 1 << 14


def rescaled_grid_weights(
    values: torch.Tensor,
    nearest: torch.Tensor,
    rule: CodeValueRule,
    half_ulp: Callable[[torch.Tensor], torch.Tensor],
    judged: torch.Tensor,
    first_look: bool = False,
) -> tuple[int, int]:
    """How many `judged` weights (float32 `values` and their nearest codes) sit on their nearest code's value times
    one factor per scale group of `rule`, to within half_ulp(w), half the storage dtype's spacing at w. Where the
    rule has a shift (an affine format's minimum), the factor applies to the value less the shift, and the shift's
    own half ulp is added to the tolerance: it was a weight, re-rounded to storage like the others. Returns the
    count and the judged weights read: all of them, or with `first_look` only the first FIRST_LOOK (see there)."""
    n, group = values.numel(), rule.group
    if n == 0 or n % group:
        return 0, 0
    if first_look and n > FIRST_LOOK:  # the first whole groups, or the start of one group larger than that
        n = FIRST_LOOK // group * group if group <= FIRST_LOOK else FIRST_LOOK
        group = min(group, n)
        keep = n // group
        rule = replace(
            rule,
            scale=rule.scale.reshape(-1)[:keep],
            group=group,
            negative=None if rule.negative is None else rule.negative.reshape(-1)[:n],
            shift=None if rule.shift is None else rule.shift.reshape(-1)[:keep],
        )
        values, nearest, judged = (t.reshape(-1)[:n] for t in (values, nearest, judged))
    code_value = rule.table[(nearest.reshape(-1).long() - rule.first_code).clamp(0, rule.table.numel() - 1)]
    if rule.negative is not None:
        code_value = torch.where(rule.negative.reshape(-1), -code_value, code_value)
    code_value = code_value.double() * rule.scale.reshape(-1).double().repeat_interleave(rule.group)
    w = values.reshape(-1).double()
    h = half_ulp(values.reshape(-1)).double() + _float32_ulp(values.reshape(-1))
    if rule.shift is not None:  # w - shift against the scaled part; the shift (a weight) was re-rounded too
        shift = rule.shift.reshape(-1).double().repeat_interleave(rule.group)
        w, h = w - shift, h + half_ulp(shift.float()).double()
    # each weight's interval of alpha; a code worth 0 (before the shift) takes every alpha, or none
    on_zero = code_value == 0
    safe = torch.where(on_zero, torch.ones_like(code_value), code_value)
    ends = torch.stack(((w - h) / safe, (w + h) / safe)).sort(dim=0).values  # v < 0 swaps the ends
    low, high = ends[0].clamp(min=1.0 - _MAX_RESCALE), ends[1].clamp(max=1.0 + _MAX_RESCALE)
    low = torch.where(on_zero, torch.full_like(low, 1.0 - _MAX_RESCALE), low)
    high = torch.where(on_zero, torch.full_like(high, 1.0 + _MAX_RESCALE), high)
    usable = judged.reshape(-1) & torch.where(on_zero, w.abs() <= h, low <= high)
    # the deepest point of each group's intervals: +1 at each start, -1 after each end (starts first at a tie)
    groups = n // group
    at = torch.cat((low.reshape(groups, -1), high.reshape(groups, -1)), dim=1)
    weight = usable.reshape(groups, -1).to(torch.int32)
    step = torch.cat((weight, -weight), dim=1)
    order = at.argsort(dim=1, stable=True)  # starts come first in `at`: a stable sort keeps them before equal ends
    depth = step.gather(1, order).cumsum(dim=1)
    return int(depth.max(dim=1).values.clamp(min=0).sum()), int(judged.count_nonzero())


def _float32_ulp(x: torch.Tensor) -> torch.Tensor:
    """float32's spacing at each |x| (float64): the slack for a dequantization's own arithmetic, which rounds a
    product or two in float32 (a rescale needs it; a weight equal to its code's value does not)."""
    _, exponent = torch.frexp(x.abs().float().clamp(min=torch.finfo(torch.float32).tiny))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 24)
