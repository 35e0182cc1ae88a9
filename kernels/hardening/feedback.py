"""Calibrated hardening: qcbguard's unbiased per-element draw, with GPTQ-style error feedback over calibration data.

Unbiased stochastic rounding leaves each weight an error variance of p(1-p) step^2, twice round-to-nearest's on
average, and no data-free rule lowers it without handing back a bias an attacker can steer. A linear layer's output,
though, feels the error matrix E through E H E^T, H = sum over calibration inputs of x x^T. Error feedback (Frantar
et al. 2022, GPTQ) rounds one input column at a time and folds each column's error into the columns not yet rounded
along H's inverse, so that where inputs are correlated later roundings cancel earlier ones.

Here every rounding stays qcbguard's draw: element (r, j) takes the upper code of the cell its *updated* value falls
in with probability equal to that value's position, compared with the same Philox uniform harden_tensor uses for
(r, j). Each column's error is zero-mean given the columns before it, and the feedback is linear in those errors, so
E[hardened value] = weight still holds, and an attacker's parking of weights inside cells buys nothing. The scales
are the standard quantizer's (fmt.encode(x)), so the result packs into the format's native layout as ever. Formats
reach the grid through their CodeValueRule (value of code c = table[c] * sign * scale + shift, per element).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import native
from ..errors import UnsupportedInputError
from ..formats.base import CodeValueRule, Encoding, Format, QuantizedTensor
from .config import HardeningConfig
from .harden import Screened, TensorReport, harden_encoding
from .rng import uniform_grid
from .seed import DeploymentSeed

__all__ = ["FeedbackPlan", "HessianAccumulator", "feedback_codes", "feedback_plan", "harden_calibrated"]

#: GPTQ's dampening: this share of H's mean diagonal is added to its diagonal, so that inputs the calibration data
#: barely excites do not dominate the inverse
DAMPING = 0.01
#: columns rounded between two whole-matrix updates (GPTQ's lazy batch): the per-column work stays in cache
_BLOCK = 128


class HessianAccumulator:
    """H = sum of x x^T over the inputs a linear layer sees (float64, inputs on the last dimension)."""

    def __init__(self, features: int) -> None:
        self.hessian = torch.zeros(features, features, dtype=torch.float64)

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(device="cpu", dtype=torch.float64)
        if x.shape[1] != self.hessian.shape[0]:
            raise ValueError(f"inputs have {x.shape[1]} features, the accumulator {self.hessian.shape[0]}")
        self.hessian.addmm_(x.T, x)


@dataclass(frozen=True)
class FeedbackPlan:
    """What error feedback needs from a Hessian, computed once per tensor (every seed, format and row chunk reuses
    it): the rounding order (act-order) and the update matrix in that order."""

    order: torch.Tensor
    factor: torch.Tensor

    @property
    def inputs(self) -> int:
        return self.factor.shape[0]


def feedback_plan(hessian: torch.Tensor, damping: float = DAMPING) -> FeedbackPlan:
    """Columns in descending order of H's diagonal (GPTQ's act-order: the inputs with the most energy are rounded
    first, while the most columns remain to absorb their errors; on SmolLM2-135M in Q4_0, feedback in natural order
    left +19% perplexity over round-to-nearest, act-order -6%), and the update matrix of H in that order. A matrix
    that is not a Hessian (not positive semi-definite: no Cholesky factor even after damping) is refused."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise UnsupportedInputError(f"a Hessian must be square, got {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise UnsupportedInputError("the Hessian has non-finite entries")
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    try:
        return FeedbackPlan(order, _inverse_factor(hessian[order][:, order], damping))
    except torch.linalg.LinAlgError:
        raise UnsupportedInputError("the Hessian is not positive semi-definite (not a sum of x x^T)") from None


def _inverse_factor(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damping * mean(diag H) * I)^-1, GPTQ's update matrix. Inputs the data never
    excited (zero diagonal) get a unit diagonal: their columns are rounded, and feed nothing forward."""
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    diag = torch.diagonal(h)
    diag += damping * float(diag.mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


class _Grid:
    """Each element's grid under a CodeValueRule, transposed to (cols, rows) so that a column is contiguous: value of
    table index i = table[i] * multiplier + shift (multiplier = sign * scale), float64. `live` is False where every
    code is worth the same (a zero multiplier: an all-zero block) or the scale is not finite (a block of huge weights):
    there the standard quantizer's code stays and nothing is fed forward."""

    def __init__(self, rule: CodeValueRule, rows: int, cols: int, order: torch.Tensor) -> None:
        multiplier, shift = rule.element_terms(rows * cols)
        multiplier = multiplier.reshape(rows, cols)[:, order].T
        shift = torch.zeros_like(multiplier) if shift is None else shift.reshape(rows, cols)[:, order].T
        self.live = (multiplier != 0) & multiplier.isfinite() & shift.isfinite()
        self.multiplier = torch.where(self.live, multiplier, 0.0)
        self.inverse = torch.where(self.live, 1.0 / torch.where(self.live, multiplier, 1.0), 0.0)
        self.shift = torch.where(self.live, shift, 0.0)
        self.table = rule.table.double()

    def draw(self, j: int, target: torch.Tensor, u: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Table indices for column j of the targets: the upper code of the cell each target falls in with
        probability its position (u < position), clamped at the grid's ends; `nearest` where not live."""
        table, last = self.table, self.table.numel() - 1
        z = (target - self.shift[j]) * self.inverse[j]  # the target in table units
        lower = (torch.searchsorted(table, z, right=True) - 1).clamp_(0, last)
        upper = (lower + 1).clamp_(max=last)
        base = table[lower]
        span = table[upper] - base
        position = ((z - base) / torch.where(span > 0, span, 1.0)).clamp_(0.0, 1.0)  # 0 where the grid ends
        return torch.where(self.live[j], torch.where(u < position, upper, lower), nearest)

    def error(self, j: int, target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """target - value of the drawn codes; 0 where not live."""
        return torch.where(self.live[j], target - (self.table[index] * self.multiplier[j] + self.shift[j]), 0.0)


def feedback_codes(
    x: torch.Tensor,
    enc: Encoding,
    rule: CodeValueRule,
    plan: FeedbackPlan,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """Codes of a 2-D weight (rows = outputs, cols = inputs) drawn column by column, in the plan's order, with error
    feedback along its Hessian.

    `uniforms` (rows, cols) are stochastic_codes' draws for these elements (rng.uniform_grid at each element's global
    (row, col)), whatever the rounding order; with H diagonal nothing is fed forward and every element is drawn from
    its own cell, as harden_tensor does, but for positions taken on the stored scales (Q4_0's quantizer rounds x / d
    with d in float32, then stores d as float16: the value-based cell is the one the served weights see). Inside a
    block of columns the steps run natively on a CPU (kernels/native/feedback.c, the same bits), one row range per
    thread; the update of the later blocks is one matrix product either way."""
    rows, cols = x.shape
    order, factor = plan.order, plan.factor.contiguous()
    # everything per column is transposed to (cols, rows), in rounding order
    nearest = (enc.cells.nearest.reshape(rows, cols) - rule.first_code).to(torch.int32)[:, order].T.contiguous()
    u = uniforms.to(torch.float32)[:, order].T.contiguous()
    work = x.double()[:, order].T.contiguous()  # the targets, updated as errors are fed forward
    index = torch.empty((cols, rows), dtype=torch.int32)
    if native.enabled(x):

        def block(start: int, end: int, errors: torch.Tensor) -> None:
            native.feedback_block(rule, order, start, end, factor, work, u, nearest, index, errors)

    else:
        grid = _Grid(rule, rows, cols, order)

        def block(start: int, end: int, errors: torch.Tensor) -> None:
            for j in range(start, end):
                index[j] = grid.draw(j, work[j], u[j].double(), nearest[j])
                error = grid.error(j, work[j], index[j]).div_(factor[j, j])
                work[j + 1 : end] -= factor[j, j + 1 : end, None] * error
                errors[j - start] = error

    for start in range(0, cols, _BLOCK):
        end = min(start + _BLOCK, cols)
        errors = torch.empty((end - start, rows), dtype=torch.float64)
        block(start, end, errors)
        work[end:] -= factor[start:end, end:].T @ errors
    codes = torch.empty((rows, cols), dtype=torch.int32)
    codes[:, order] = index.T
    return codes + rule.first_code


def harden_calibrated(
    x: torch.Tensor,
    fmt: Format,
    name: str,
    seed: DeploymentSeed,
    hessian: torch.Tensor | FeedbackPlan,
    config: HardeningConfig | None = None,
    *,
    row_offset: int = 0,
    col_offset: int = 0,
    screened: Screened | None = None,
) -> tuple[QuantizedTensor, TensorReport]:
    """harden_tensor with error feedback along `hessian` (inputs x inputs, e.g. HessianAccumulator's, or its
    feedback_plan when one tensor is hardened more than once: several seeds, formats or row chunks) for a 2-D weight
    of a format with a CodeValueRule; detection, modes and the report are harden_tensor's (a fed-back code may lie
    more than one step from round-to-nearest: max_change_steps says how far)."""
    if x.dim() != 2:
        raise UnsupportedInputError(f"tensor {name!r}: calibrated hardening takes a 2-D weight, got {tuple(x.shape)}")
    try:
        plan = hessian if isinstance(hessian, FeedbackPlan) else feedback_plan(hessian)
    except UnsupportedInputError as e:
        raise UnsupportedInputError(f"tensor {name!r}: {e}") from None
    if plan.inputs != x.shape[1]:
        raise UnsupportedInputError(
            f"tensor {name!r}: the Hessian must be {x.shape[1]} x {x.shape[1]} (the weight's inputs), "
            f"got {plan.inputs} x {plan.inputs}"
        )
    enc = fmt.encode(x, name)
    rule = fmt.code_value_rule(enc)
    if rule is None:
        raise UnsupportedInputError(
            f"{fmt.name} has no code-value rule for calibrated hardening; use harden_tensor (no feedback)"
        )

    def draw(enc: Encoding, key: int) -> torch.Tensor:
        u = uniform_grid(key, row_offset, x.shape[0], col_offset, x.shape[1])
        return feedback_codes(x, enc, rule, plan, u)

    place = {"row_offset": row_offset, "col_offset": col_offset}
    return harden_encoding(x, enc, fmt, name, seed, config, **place, draw=draw, screened=screened)
