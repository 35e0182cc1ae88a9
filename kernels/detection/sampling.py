"""Which weights the detector reads: a bounded set of whole-row runs, the same for every adapter under one seed.

Large tensors cost no more than DETECTOR_SAMPLE weights. Which runs: the scans (no seed) read runs evenly spread
over the tensor, public and the same for every scan; hardening reads runs drawn with a key from the deployment seed,
so an attacker who does not hold the seed cannot leave exactly the sampled rows clean to pass the detector (and
on_suspicious="refuse"), and the vLLM hook and the GGUF tool score a tensor on the same rows under one seed. The
Kolmogorov distance's sampling noise is about 3 / sqrt(n): 0.006 at the default 2**18 weights, a third of the default
threshold 0.02 (HardeningConfig.detector_sample sets another budget, where a deployment would rather read more of each
tensor). Runs of whole rows keep every scale block intact (GGUF and per-channel blocks lie along a row, fp8_per_block
tiles are 128 x 128), so the sample's cells are the full tensor's; only per-tensor scales (fp8_per_tensor) see the
sample's own absmax, which moves no position by more than that ratio.
"""

from __future__ import annotations

import torch

__all__ = ["DETECTOR_SAMPLE", "MIN_DETECTOR_SAMPLE", "ROW_RUN", "sample_row_ranges", "sample_rows"]

DETECTOR_SAMPLE = 1 << 18
MIN_DETECTOR_SAMPLE = 1 << 14  # noise 3 / sqrt(n) = 0.023: above this the default threshold still means something
ROW_RUN = 128  # rows read together, starting at multiples of 128


def sample_row_ranges(
    n_rows: int, row_len: int, budget: int = DETECTOR_SAMPLE, key: int | None = None
) -> list[tuple[int, int]]:
    """Row ranges [start, end) to score: every row when they hold at most `budget` weights (or there are fewer than
    two runs of rows), else runs of ROW_RUN rows at multiples of ROW_RUN, as many as fit in the budget (at least one),
    in order: evenly spread from the first run to the last without a key, drawn without replacement with one."""
    if n_rows * row_len <= budget or n_rows < 2 * ROW_RUN:
        return [(0, n_rows)]
    runs = max(1, budget // (row_len * ROW_RUN))
    blocks = n_rows // ROW_RUN
    if key is None:
        starts = torch.linspace(0, blocks - 1, runs, dtype=torch.float64).long().unique()
    else:
        drawn = torch.randperm(blocks, generator=torch.Generator().manual_seed(key & (2**63 - 1)))
        starts = drawn[:runs].sort().values
    return [(s, s + ROW_RUN) for s in (starts * ROW_RUN).tolist()]


def sample_rows(x: torch.Tensor, budget: int = DETECTOR_SAMPLE, key: int | None = None) -> torch.Tensor:
    """x itself when it is small enough, else the rows sample_row_ranges picks (leading dimensions flattened)."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() >= 2 else x.reshape(1, -1)
    ranges = sample_row_ranges(rows.shape[0], rows.shape[1], budget, key)
    if ranges == [(0, rows.shape[0])]:
        return x
    return torch.cat([rows[start:end] for start, end in ranges])
