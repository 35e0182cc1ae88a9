"""Hardening one rank's shard of a (possibly fused) vLLM weight, drawing by the element's place in the full tensor.

vLLM fuses checkpoint weights (q/k/v into qkv_proj, gate/up into gate_up_proj) and, under tensor parallelism, gives
each rank a slice of every part: rank r of a column-parallel qkv_proj holds [q_r; k_r; v_r], which is not one
contiguous block of the TP=1 fused tensor. The randomness of every element is Philox(key(name), (col, row)) with
(row, col) the element's coordinates in the TP=1 fused tensor, so the geometry here maps each run of local rows to
its global rows (and a row-parallel shard's columns to its global columns). A weight hardened at TP=1 and at TP=2
then holds the same codes wherever the format's scales agree (vLLM all-reduces the amax where a scale spans shards).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from qcbguard_kernels.formats.base import Encoding, Format, QuantizedTensor, RoundingCells
from qcbguard_kernels.hardening import (
    DeploymentSeed,
    FeedbackPlan,
    HardeningConfig,
    TensorReport,
    harden_encoding,
    stochastic_codes,
    uniform_grid,
)
from qcbguard_kernels.hardening.feedback import feedback_codes

__all__ = ["RowRun", "ShardGeometry", "calibrated_shard_codes", "harden_shard", "shard_codes"]


@dataclass(frozen=True)
class RowRun:
    """Local rows [local_start, local_start + length) are global rows [global_start, global_start + length)."""

    local_start: int
    length: int
    global_start: int


@dataclass(frozen=True)
class ShardGeometry:
    """Where a rank's 2-D shard [rows, cols] sits in the full (TP=1, fused) weight."""

    runs: tuple[RowRun, ...]
    col_offset: int = 0

    @classmethod
    def whole(cls, rows: int) -> ShardGeometry:
        return cls((RowRun(0, rows, 0),), 0)

    def check(self, rows: int, name: str) -> None:
        """Refuse a geometry that does not tile the shard's rows exactly (a layer layout the hook misread)."""
        expected = 0
        for run in self.runs:
            if run.local_start != expected or run.length < 0:
                raise ValueError(f"{name}: row runs {self.runs} do not tile the shard's {rows} rows in order")
            expected += run.length
        if expected != rows:
            raise ValueError(f"{name}: row runs cover {expected} rows, the shard has {rows}")


def _rows(enc: Encoding, start: int, length: int) -> Encoding:
    """The encoding of rows [start, start + length) of a 2-D tensor: only the cells (stochastic_codes reads those)."""
    c = enc.cells
    s = slice(start, start + length)
    cells = RoundingCells(lower=c.lower[s], upper=c.upper[s], position=c.position[s], nearest=c.nearest[s])
    return Encoding(enc.format, torch.Size((length, *enc.shape[1:])), cells)


def _pinned_encoding(fmt: Format, x: torch.Tensor, name: str, amax: torch.Tensor) -> Encoding:
    """Encode x as if its absmax were `amax`: one value per row (row-absmax formats, a row split over ranks) or one
    for the whole tensor (per-tensor formats, a tensor split over ranks).

    The scale depends on the weights only through that absmax, so appending one column holding the global amax
    gives exactly the scale vLLM computes from its all-reduced amax; the extra column is then cut off the cells and
    off every per-element entry of the scales.
    """
    if x.dim() != 2 or amax.numel() not in (1, x.shape[0]):
        raise ValueError(
            f"{name}: a pinned amax is one value per row of the 2-D shard or one value, got {tuple(amax.shape)}"
        )
    cols = x.shape[1]
    column = amax.reshape(-1, 1).to(x.dtype).expand(x.shape[0], 1)
    enc = fmt.encode(torch.cat([x, column], dim=1), name)
    c = enc.cells
    cells = RoundingCells(
        lower=c.lower[:, :cols], upper=c.upper[:, :cols], position=c.position[:, :cols], nearest=c.nearest[:, :cols]
    )
    scales = {k: (v[:, :cols] if v.shape == enc.shape else v) for k, v in enc.scales.items()}
    return Encoding(enc.format, x.shape, cells, scales)


def shard_codes(enc: Encoding, key: int, geometry: ShardGeometry) -> torch.Tensor:
    """Stochastic codes of a shard: each run of rows drawn at its global rows and the shard's global columns."""
    parts = [
        stochastic_codes(_rows(enc, run.local_start, run.length), key, run.global_start, geometry.col_offset)
        for run in geometry.runs
        if run.length
    ]
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def calibrated_shard_codes(
    x: torch.Tensor, enc: Encoding, fmt: Format, plan: FeedbackPlan, key: int, geometry: ShardGeometry
) -> torch.Tensor:
    """shard_codes with error feedback along `plan` (the shard's own columns of the Hessian): rows never feed each
    other, so one pass covers every run, each run's uniforms drawn at its global rows. A format without a code-value
    rule (fp8_per_block) draws without feedback."""
    rule = fmt.code_value_rule(enc)
    if rule is None:
        return shard_codes(enc, key, geometry)
    cols = x.shape[1]
    runs = [run for run in geometry.runs if run.length]
    u = torch.cat([uniform_grid(key, run.global_start, run.length, geometry.col_offset, cols) for run in runs])
    return feedback_codes(x, enc, rule, plan, u)


def harden_shard(
    x: torch.Tensor,
    fmt: Format,
    name: str,
    seed: DeploymentSeed,
    config: HardeningConfig,
    geometry: ShardGeometry,
    amax: torch.Tensor | None = None,
    plan: FeedbackPlan | None = None,
) -> tuple[Encoding, QuantizedTensor, TensorReport]:
    """harden_tensor for a shard placed by `geometry`; also returns the encoding (the standard quantizer's scales and
    nearest codes, which the hook compares with what vLLM itself computed). `amax`: the full rows' absmax (or the
    full tensor's) when the quantizer shares a scale across ranks (row-absmax and per-tensor formats only). `plan`:
    calibrated hardening along the shard's columns of a calibration Hessian."""
    start = time.perf_counter()
    geometry.check(x.shape[0], name)
    enc = fmt.encode(x, name) if amax is None else _pinned_encoding(fmt, x, name, amax)

    def draw(e: Encoding, key: int) -> torch.Tensor:
        if plan is None:
            return shard_codes(e, key, geometry)
        return calibrated_shard_codes(x, e, fmt, plan, key, geometry)

    packed, report = harden_encoding(x, enc, fmt, name, seed, config, started=start, draw=draw)
    return enc, packed, report
