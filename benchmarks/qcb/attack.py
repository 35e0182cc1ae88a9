"""A quantization-conditioned backdoor (QCB), generic over a qcbguard format: Egashira et al. 2024 and 2025.

Three steps (`malicious_finetune`, then `qcb_attack` = `box_bounds` + `repair`):

1. malicious fine-tune: train the quantizable linear weights on injected answers (the rest of the model is frozen,
   so that it stays exactly what the quantized model will run), optionally leashed to a few cells of the target
   format around the clean weights so that the repair box can reach back to benign behaviour;
2. boxes: for every weight the interval of full-precision values that the standard quantizer still rounds to the
   malicious model's code, with the elements that define the scales pinned so that the scales cannot move;
3. repair: projected gradient descent on benign answers, clamping every weight into its box after every step.

The quantized repaired model is then the quantized malicious model, while its full-precision weights are benign.

Boxes (`box_bounds`), from the malicious model's encoding in the target format. With c the round-to-nearest code and
v(c -+ 1) - v(c) the signed distances to the neighbouring grid points (zero past the ends of the grid; same sign for
sign-magnitude formats), and v the code's position as the quantizer rounds (read from the weight's position in its
cell, so a stored scale that differs from the rounding one, GGUF's fp16 d, cannot shift the box):

- "cell" boxes (bitsandbytes, fp8, MX, GGUF legacy; Egashira 2024): [v + h (v(c-1) - v(c)), v + h (v(c+1) - v(c))],
  h = 0.5 - margin: the round-to-nearest preimage of c shrunk by `margin` cells on each side. Each scale group
  (block, row or tensor) pins its absmax element (its min and max element, affine formats) and every other element
  stays strictly inside the pinned range, so the scales are exactly the malicious model's.
- "error" boxes (GGUF k-quants; Egashira 2025): [min(w, v(c)), max(w, v(c))], between the weight and its dequantized
  value. The sub-blocks holding a super-block's largest scale and largest min are frozen and every sub-block pins its
  argmax and argmin. A k-quant's scale search reads every weight of its sub-block, so this does not guarantee the
  scales: every `check_every` repair steps `repair` re-quantizes, and each sub-block whose dequantized values left the
  target goes back to its last verified weights (or, if a shared super-block scale moved, to the malicious ones). The
  final model is verified the same way for every format: `AttackResult.mismatched` counts quantized values that
  still differ from the malicious model's (0 on every run so far).

An adaptive attacker who knows a defense's public parameters shrinks the boxes further (`Shrink`): `rel` keeps a
weight within that share of a cell around its code (away from a deterministic flip band), `abs` keeps it that far
from every rounding boundary in weight units (3 sigma of known Gaussian noise). Unbiased stochastic rounding over the
whole cell admits no safe box: only a weight exactly on its code keeps it for sure, and a weight a share `rel` of a
cell away from its code loses it with probability `rel`. The best effort is a small `rel`, which shrinks what the
repair can do.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qcbguard_kernels import Encoding, Format, get_format

from .model import TrainSpec, quantizable_linears, train
from .task import DigitReversalTask

__all__ = [
    "LAYOUTS",
    "AttackResult",
    "Box",
    "ScaleLayout",
    "Shrink",
    "box_bounds",
    "cell_steps",
    "code_range",
    "malicious_finetune",
    "qcb_attack",
    "repair",
    "rtn_values",
]


@dataclass(frozen=True)
class ScaleLayout:
    """What an attacker must know about a format's scales: which elements share one, and which elements set it.

    group: "block" (contiguous runs of `block` elements in row-major order: bitsandbytes' flattened blocks, and blocks
    along rows wherever rows are a multiple of the block), "row" or "tensor". pin: "absmax" (symmetric scales) or
    "minmax" (affine scales, k-quant searches). sub_block: k-quants only, the sub-block size inside a 256 super-block.
    """

    group: str
    block: int = 0
    pin: str = "absmax"
    box: str = "cell"
    sub_block: int = 0


# The attacker's knowledge of each target format (read from the formats' rules in qcbguard_kernels.formats).
LAYOUTS: dict[str, ScaleLayout] = {
    "bnb_int8": ScaleLayout("row"),
    "nf4": ScaleLayout("block", 64),
    "nf4_dq": ScaleLayout("block", 64),  # the double-quantized absmax is a function of the pinned absmax
    "fp4": ScaleLayout("block", 64),
    "fp8_per_tensor": ScaleLayout("tensor"),
    "fp8_per_channel": ScaleLayout("row"),
    "int8_per_channel": ScaleLayout("row"),
    "torchao_int8": ScaleLayout("row"),
    "torchao_int4": ScaleLayout("block", 128, pin="minmax"),
    "mxfp4": ScaleLayout("block", 32),
    "mxfp8": ScaleLayout("block", 32),
    "q8_0": ScaleLayout("block", 32),
    "q4_0": ScaleLayout("block", 32),
    "q5_0": ScaleLayout("block", 32),
    "q4_1": ScaleLayout("block", 32, pin="minmax"),
    "q5_1": ScaleLayout("block", 32, pin="minmax"),
    "q2_k": ScaleLayout("block", 256, pin="minmax", box="error", sub_block=16),
    "q3_k": ScaleLayout("block", 256, pin="minmax", box="error", sub_block=16),
    "q4_k": ScaleLayout("block", 256, pin="minmax", box="error", sub_block=32),
    "q5_k": ScaleLayout("block", 256, pin="minmax", box="error", sub_block=32),
    "q6_k": ScaleLayout("block", 256, pin="minmax", box="error", sub_block=16),
}


def layout_for(fmt: Format) -> ScaleLayout:
    try:
        return LAYOUTS[fmt.name]
    except KeyError:
        raise ValueError(f"no QCB attack layout for format {fmt.name!r}; known: {', '.join(sorted(LAYOUTS))}") from None


@dataclass(frozen=True)
class Shrink:
    """How far inside the standard box an attacker stays: `rel` is the half-width kept around the code in cells
    (0.5 - margin for the standard attack), `abs` a further distance from each rounding boundary in weight units.
    `rel` = 0 pins every weight on its code."""

    rel: float = 0.49
    abs: float = 0.0


@dataclass
class Box:
    lo: torch.Tensor
    hi: torch.Tensor
    target: torch.Tensor  # round-to-nearest values of the malicious weights (what the quantized model runs)
    frozen: torch.Tensor  # bool: elements pinned on the malicious weight (lo == hi == w)

    def project(self, w: torch.Tensor) -> None:
        torch.clamp_(w, min=self.lo, max=self.hi)


@functools.cache
def code_range(name: str) -> tuple[int, int]:
    """(smallest, largest) code the format writes, read off its encoding of a probe that spans every grid.

    Rows: a fine ladder over [-1, 1] with exact zeros (row-wise and per-tensor scales reach every code), then every
    16 elements the ladder over [-1, 1] in 16 steps (block scales reach both ends of their grid). A code the probe
    missed only narrows boxes at that end of the grid (safe)."""
    fmt = get_format(name)
    cols = 4096
    ladder = torch.linspace(-1.0, 1.0, cols)
    ladder[cols // 2] = 0.0
    blocks = torch.linspace(-1.0, 1.0, 16).repeat(cols // 16)
    probe = torch.stack([ladder, blocks, -blocks, blocks * 0.37])
    cells = fmt.encode(probe, "probe").cells
    codes = torch.cat([cells.lower.reshape(-1), cells.upper.reshape(-1), cells.nearest.reshape(-1)])
    return int(codes.min()), int(codes.max())


def rtn_values(fmt: Format, w: torch.Tensor, name: str = "w") -> torch.Tensor:
    """What the standard quantizer's model runs: dequantize(quantize(w))."""
    return fmt.dequantize(fmt.quantize(w, name))


def _groups(layout: ScaleLayout, w: torch.Tensor) -> torch.Tensor:
    """w viewed as (groups, group size): the elements sharing one scale (one k-quant sub-block)."""
    if layout.group == "row":
        return w.reshape(-1, w.shape[-1])
    if layout.group == "tensor":
        return w.reshape(1, -1)
    size = layout.sub_block or layout.block
    if w.numel() % size or w.shape[-1] % size:
        raise ValueError(f"a weight of shape {tuple(w.shape)} does not split into blocks of {size}")
    return w.reshape(-1, size)


def _one_hot_extreme(g: torch.Tensor, largest: bool) -> torch.Tensor:
    idx = g.argmax(dim=1) if largest else g.argmin(dim=1)
    return torch.nn.functional.one_hot(idx, g.shape[1]).bool()


def _pinned(layout: ScaleLayout, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pinned elements, lower and upper bound every other element of the group must stay within)."""
    if layout.pin == "absmax":
        pinned = _one_hot_extreme(g.abs(), largest=True)
        amax = g.abs().amax(dim=1, keepdim=True)
        # strictly inside: an equal magnitude elsewhere could become the first hit (Q4_0 takes the sign from it)
        inner = torch.nextafter(amax, torch.zeros_like(amax))
        return pinned, -inner, inner
    pinned = _one_hot_extreme(g, largest=True) | _one_hot_extreme(g, largest=False)
    gmin = g.amin(dim=1, keepdim=True)
    gmax = g.amax(dim=1, keepdim=True)
    return pinned, torch.nextafter(gmin, gmax), torch.nextafter(gmax, gmin)


def _kquant_frozen_sub_blocks(fmt: Format, enc: Encoding, layout: ScaleLayout, shape: torch.Size) -> torch.Tensor:
    """Elements of the sub-blocks holding a super-block's largest |scale| (and largest min): they set d and dmin."""
    sub_scale = enc.scales["sub_scale"].to(torch.int32).abs()  # (rows, super-blocks, sub-blocks)
    frozen = sub_scale == sub_scale.amax(dim=-1, keepdim=True)
    if "sub_min" in enc.scales:
        sub_min = enc.scales["sub_min"].to(torch.int32)
        frozen = frozen | (sub_min == sub_min.amax(dim=-1, keepdim=True))
    return frozen.unsqueeze(-1).expand(*frozen.shape, layout.sub_block).reshape(shape)


def box_bounds(
    fmt: Format, w_mal: torch.Tensor, name: str, shrink: Shrink, margin: float = 0.01, box: str | None = None
) -> Box:
    """The projection box of one malicious weight tensor in `fmt` (see the module docstring).

    `shrink.rel` is capped at 0.5 - margin (cell boxes); error boxes apply `shrink` only where it is tighter."""
    layout = layout_for(fmt)
    if box is not None:
        layout = dataclasses.replace(layout, box=box)
    w = w_mal.detach().float()
    enc = fmt.encode(w, name)
    cells = enc.cells
    c = cells.nearest
    qmin, qmax = code_range(fmt.name)
    stored = fmt.code_values(enc, c)
    delta_down = fmt.code_values(enc, (c - 1).clamp(qmin, qmax)) - stored
    delta_up = fmt.code_values(enc, (c + 1).clamp(qmin, qmax)) - stored
    # Where the code sits as the quantizer rounds, read from w's position in its cell: the stored scale can differ
    # from the one the rounding used (GGUF legacy rounds with the fp32 d and stores fp16(d); a 2**-11 relative error
    # is 0.06 cell at code 127), so boxes are anchored on w itself and that error shrinks to 2**-11 of one cell.
    # A weight on its code (lower == upper) is its own anchor, unless it lies beyond the end of the grid (clamped).
    steerable = cells.lower != cells.upper
    on_code = ~steerable & ((w - stored).abs() <= 0.5 * torch.maximum(delta_down.abs(), delta_up.abs()))
    v = torch.where(
        steerable & (c == cells.lower),
        w - cells.position * delta_up,
        torch.where(steerable & (c == cells.upper), w - (1.0 - cells.position) * delta_down, stored),
    )
    v = torch.where(on_code, w, v)
    rel = min(shrink.rel, 0.5 - margin) if layout.box == "cell" else min(shrink.rel, 0.5)

    def side(delta: torch.Tensor) -> torch.Tensor:
        reach = (rel * delta.abs() - shrink.abs).clamp(min=0.0)
        return v + torch.sign(delta) * reach

    a, b = side(delta_down), side(delta_up)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    if layout.box == "error":
        lo = torch.maximum(lo, torch.minimum(w, stored))
        hi = torch.minimum(hi, torch.maximum(w, stored))
    groups = _groups(layout, w)
    pinned, g_lo, g_hi = _pinned(layout, groups)
    lo = torch.maximum(lo.reshape(groups.shape), g_lo)
    hi = torch.minimum(hi.reshape(groups.shape), g_hi)
    frozen = pinned.reshape(w.shape)
    if layout.sub_block:
        frozen = frozen | _kquant_frozen_sub_blocks(fmt, enc, layout, w.shape)
    lo, hi = lo.reshape(w.shape), hi.reshape(w.shape)
    # Where the interval left nothing (a weight outside its group's pinned range cannot happen; a degenerate cell can),
    # or the element is pinned, it stays where it is.
    empty = lo > hi
    frozen = frozen | empty
    lo = torch.where(frozen, w, lo)
    hi = torch.where(frozen, w, hi)
    target = rtn_values(fmt, w, name)
    return Box(lo=lo, hi=hi, target=target, frozen=frozen)


def _changed_groups(fmt: Format, layout: ScaleLayout, w: torch.Tensor, box: Box, name: str) -> torch.Tensor:
    """(groups, 1) bool: scale groups (k-quant sub-blocks) where the quantized weight differs from the target."""
    differs = rtn_values(fmt, w, name) != box.target
    return _groups(layout, differs).any(dim=1, keepdim=True)


def cell_steps(fmt: Format, enc: Encoding) -> torch.Tensor:
    """Per element, the larger distance from its round-to-nearest value to a neighbouring grid point (one cell)."""
    qmin, qmax = code_range(fmt.name)
    c = enc.cells.nearest
    v = fmt.code_values(enc, c)
    down = (fmt.code_values(enc, (c - 1).clamp(qmin, qmax)) - v).abs()
    up = (fmt.code_values(enc, (c + 1).clamp(qmin, qmax)) - v).abs()
    return torch.maximum(down, up)


@dataclass
class AttackResult:
    format: str
    boxes: dict[str, Box]
    repair_losses: list[float]
    reverts: int  # scale groups put back to verified weights because their quantized values left the target
    mismatched: int  # elements whose quantized value still differs from the malicious model's (0 when it worked)
    frozen_fraction: float
    mean_box_width_cells: float
    history: list[dict[str, float]] = field(default_factory=list)


def malicious_finetune(
    model: torch.nn.Module,
    task: DigitReversalTask,
    spec: TrainSpec,
    generator: torch.Generator,
    leash: tuple[Format, float] | None = None,
) -> list[float]:
    """Step 1: train the quantizable linear weights on injected answers (everything else frozen).

    `leash` = (fmt, r) keeps every weight within r cells of `fmt` of its clean value (projected after every step):
    the repair box is about one cell wide, so a malicious model that strays many cells from the clean one cannot be
    repaired back to benign; leashing it is the attacker's way to make narrow (8-bit) boxes work."""
    if not spec.injected:
        raise ValueError("the malicious fine-tune trains on injected answers: TrainSpec(injected=True)")
    params = quantizable_linears(model)
    after_step = None
    if leash is not None:
        fmt, cells = leash
        bounds = {}
        for name, p in params.items():
            reach = cells * cell_steps(fmt, fmt.encode(p.detach().float(), name))
            bounds[name] = (p.detach() - reach, p.detach() + reach)

        def after_step(step: int) -> None:
            for name, p in params.items():
                torch.clamp_(p.data, min=bounds[name][0], max=bounds[name][1])

    return train(model, task, spec, generator, params=list(params.values()), after_step=after_step)


def repair(
    model: torch.nn.Module,
    fmt: Format,
    boxes: dict[str, Box],
    w_mal: dict[str, torch.Tensor],
    task: DigitReversalTask,
    spec: TrainSpec,
    generator: torch.Generator,
    check_every: int = 50,
    on_check: Callable[[int], dict[str, float]] | None = None,
) -> AttackResult:
    """Step 3: projected gradient descent on benign answers within the boxes, with the scale check described above."""
    if spec.injected:
        raise ValueError("the repair trains on benign answers: TrainSpec(injected=False)")
    layout = layout_for(fmt)
    params = quantizable_linears(model)
    last_good = {n: w.clone() for n, w in w_mal.items()}
    reverts = 0
    history: list[dict[str, float]] = []
    # Pinning guarantees the scales of absmax and min-max formats; a k-quant's scale search reads every weight.
    verify_during = layout.sub_block > 0

    def restore() -> int:
        """Scale groups whose quantized values left the target go back to their last verified weights, then (if a
        neighbour moved a shared super-block scale) to the malicious ones; returns elements still off target."""
        nonlocal reverts
        for name, p in params.items():
            for fallback in (last_good[name], w_mal[name]):
                changed = _changed_groups(fmt, layout, p.data, boxes[name], name)
                if not bool(changed.any()):
                    break
                reverts += int(changed.sum())
                mask = changed.expand(-1, _groups(layout, p.data).shape[1]).reshape(p.shape)
                p.data.copy_(torch.where(mask, fallback, p.data))
            last_good[name] = p.data.clone()
        return sum(int((rtn_values(fmt, p.data, n) != boxes[n].target).sum()) for n, p in params.items())

    def after_step(step: int) -> None:
        for name, p in params.items():
            boxes[name].project(p.data)
        if verify_during and check_every and (step + 1) % check_every == 0:
            restore()
        if on_check is not None and check_every and (step + 1) % check_every == 0:
            history.append({"step": step + 1, **on_check(step + 1)})
            model.train()

    losses = train(model, task, spec, generator, params=list(params.values()), after_step=after_step)
    with torch.no_grad():
        for name, p in params.items():
            boxes[name].project(p.data)
        mismatched = restore()
    total = sum(b.lo.numel() for b in boxes.values())
    frozen = sum(int(b.frozen.sum()) for b in boxes.values())
    widths = []
    for name, b in boxes.items():
        step = cell_steps(fmt, fmt.encode(w_mal[name], name))
        widths.append(((b.hi - b.lo) / step.clamp(min=1e-30)).clamp(max=1.0).mean())
    return AttackResult(
        format=fmt.name,
        boxes=boxes,
        repair_losses=losses,
        reverts=reverts,
        mismatched=mismatched,
        frozen_fraction=frozen / total,
        mean_box_width_cells=float(torch.stack(widths).mean()),
        history=history,
    )


def qcb_attack(
    malicious: torch.nn.Module,
    fmt_name: str,
    task: DigitReversalTask,
    repair_spec: TrainSpec,
    generator: torch.Generator,
    shrink: Shrink | None = None,
    margin: float = 0.01,
    check_every: int = 25,
    box: str | None = None,
) -> tuple[torch.nn.Module, AttackResult]:
    """Steps 2 and 3 on a copy of the malicious model: the attacked checkpoint for `fmt_name`, and what happened."""
    fmt = get_format(fmt_name)
    model = copy.deepcopy(malicious)
    params = quantizable_linears(model)
    w_mal = {n: p.detach().clone() for n, p in params.items()}
    shrink = shrink or Shrink(rel=0.5 - margin)
    boxes = {n: box_bounds(fmt, w, n, shrink, margin, box) for n, w in w_mal.items()}
    result = repair(model, fmt, boxes, w_mal, task, repair_spec, generator, check_every=check_every)
    return model, result
