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

import torch

from ..formats.base import CodeValueRule
from .precision import storage_ulp

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
    dtype: torch.dtype,
    judged: torch.Tensor,
    first_look: bool = False,
) -> tuple[int, int]:
    """How many `judged` weights (float32 `values` of a `dtype` checkpoint, and their nearest codes) sit on their
    nearest code's value times one factor per scale group of `rule`, to within half the storage spacing at w (plus a
    float32 ulp: the dequantization's own arithmetic rounds a product or two; a rescale needs that slack, a weight
    equal to its code's value does not). Where the rule has a shift (an affine format's minimum), the factor applies
    to the value less the shift, and the shift's own half ulp joins the tolerance: it was a weight, re-rounded to
    storage like the others. Returns the count and the judged weights read: all of them, or with `first_look` only
    the first FIRST_LOOK (see there)."""
    n, group = values.numel(), rule.group
    if n == 0 or n % group:
        return 0, 0
    if first_look and n > FIRST_LOOK:  # the first whole groups, or the start of one group larger than that
        n = FIRST_LOOK // group * group if group <= FIRST_LOOK else FIRST_LOOK
        group = min(group, n)
    values, nearest, judged = (t.reshape(-1)[:n] for t in (values, nearest, judged))
    multiplier, shift = rule.element_terms(n)
    code_value = rule.table[(nearest.long() - rule.first_code).clamp(0, rule.table.numel() - 1)].double() * multiplier
    w = values.double()
    h = 0.5 * storage_ulp(values, dtype).double() + storage_ulp(values, torch.float32).double()
    if shift is not None:  # w - shift against the scaled part; the shift (a weight) was re-rounded too
        w, h = w - shift, h + 0.5 * storage_ulp(shift.float(), dtype).double()
    # each weight's interval of alpha; a code worth 0 (before the shift) takes every alpha, or none
    on_zero = code_value == 0
    safe = torch.where(on_zero, torch.ones_like(code_value), code_value)
    ends = torch.stack(((w - h) / safe, (w + h) / safe)).sort(dim=0).values  # v < 0 swaps the ends
    low, high = ends[0].clamp(min=1.0 - _MAX_RESCALE), ends[1].clamp(max=1.0 + _MAX_RESCALE)
    low = torch.where(on_zero, torch.full_like(low, 1.0 - _MAX_RESCALE), low)
    high = torch.where(on_zero, torch.full_like(high, 1.0 + _MAX_RESCALE), high)
    usable = judged & torch.where(on_zero, w.abs() <= h, low <= high)
    # the deepest point of each group's intervals: +1 at each start, -1 after each end (starts first at a tie)
    groups = n // group
    at = torch.cat((low.reshape(groups, -1), high.reshape(groups, -1)), dim=1)
    weight = usable.reshape(groups, -1).to(torch.int32)
    step = torch.cat((weight, -weight), dim=1)
    order = at.argsort(dim=1, stable=True)  # starts come first in `at`: a stable sort keeps them before equal ends
    depth = step.gather(1, order).cumsum(dim=1)
    return int(depth.max(dim=1).values.clamp(min=0).sum()), int(judged.count_nonzero())
