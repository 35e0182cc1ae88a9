"""The detector's sample (qcbguard_kernels.detection.sampling): bounded, whole rows in runs that keep every scale
block intact, spread over the whole tensor for the scans, drawn with the deployment seed for hardening."""

from __future__ import annotations

import pytest
import torch

from qcbguard_kernels.detection import (
    DETECTOR_SAMPLE,
    MIN_DETECTOR_SAMPLE,
    ROW_RUN,
    cell_score,
    sample_row_ranges,
    sample_rows,
    scan_tensor,
)
from qcbguard_kernels.errors import QcbguardError
from qcbguard_kernels.formats import get_format
from qcbguard_kernels.hardening import DeploymentSeed, HardeningConfig
from qcbguard_kernels.hardening.harden import detector_sample_key, detector_score, screen
from tests.attacks import box_attack


@pytest.mark.parametrize(
    ("n_rows", "row_len"), [(1, 7), (255, 4096), (256, 4097), (4099, 256), (50_000, 64), (262_144, 576), (300, 1 << 16)]
)
def test_ranges_cover_small_tensors_and_bound_large_ones(n_rows, row_len):
    ranges = sample_row_ranges(n_rows, row_len)
    if n_rows * row_len <= DETECTOR_SAMPLE or n_rows < 2 * ROW_RUN:
        assert ranges == [(0, n_rows)]
        return
    starts = [s for s, _ in ranges]
    assert all(e - s == ROW_RUN and s % ROW_RUN == 0 and e <= n_rows for s, e in ranges)
    assert starts == sorted(set(starts))  # disjoint, in order
    sampled = len(ranges) * ROW_RUN * row_len
    assert sampled <= max(DETECTOR_SAMPLE, ROW_RUN * row_len)  # one run at least, even for very long rows
    assert sampled > DETECTOR_SAMPLE // 2 or len(ranges) == 1 or len(ranges) == n_rows // ROW_RUN
    # spread from the first run to the last whole run, not bunched at the start
    assert starts[0] == 0 and (len(ranges) == 1 or starts[-1] == (n_rows // ROW_RUN - 1) * ROW_RUN)


def test_sample_rows_is_the_tensor_when_small_and_those_rows_when_large():
    small = torch.randn(64, 96)
    assert sample_rows(small) is small
    big = torch.randn(4096, 512)
    s = sample_rows(big)
    expected = torch.cat([big[a:b] for a, b in sample_row_ranges(4096, 512)])
    assert s.shape[0] < 4096 and torch.equal(s, expected)
    three_d = torch.randn(8, 1024, 256)  # leading dims flatten into rows
    assert torch.equal(sample_rows(three_d), sample_rows(three_d.reshape(-1, 256)))


def test_scans_and_unseeded_scores_read_the_same_public_sample():
    """Without a deployment seed (the scans, detector_score alone) the sample is the evenly spread one."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3000, 512, generator=g).to(torch.bfloat16)
    fmt = get_format("q4_0")
    expected = cell_score(sample_rows(x), fmt, "w")
    hardening = detector_score(x, fmt, "w", fmt.encode(x, "w"))
    scan = scan_tensor(x, "w", [fmt])
    assert hardening == expected
    assert scan.findings[0].score == expected and scan.shape == (3000, 512)


def test_the_configured_budget_sets_the_sample_everywhere(tmp_path):
    """HardeningConfig.detector_sample reaches every screen: hardening's (the vLLM hook's path) reads that many weights
    and the GGUF tool's sample rows follow it; budgets below MIN_DETECTOR_SAMPLE or not integers are refused."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4096, 512, generator=g).to(torch.bfloat16)
    fmt = get_format("q8_0")
    wide = HardeningConfig(detector_sample=1 << 20)
    score, _ = screen(x, fmt, "w", wide)
    assert score.elements == 1 << 20 and score == cell_score(sample_rows(x, 1 << 20), fmt, "w")
    assert screen(x, fmt, "w", HardeningConfig())[0].elements == DETECTOR_SAMPLE
    for bad in (MIN_DETECTOR_SAMPLE - 1, 2.0**20, True, "262144"):
        with pytest.raises(QcbguardError, match="detector_sample"):
            HardeningConfig(detector_sample=bad)
    assert HardeningConfig.from_dict({"detector_sample": 1 << 16}).detector_sample == 1 << 16


def test_keyed_runs_are_whole_bounded_and_differ_by_key():
    """With a key the runs are drawn without replacement: whole ROW_RUN runs at multiples of ROW_RUN, in order, as
    many as the spread takes, the same for the same key, different across keys, and every run reachable."""
    n_rows, row_len = 4096, 512  # 32 runs, 4 fit in the default budget
    spread = sample_row_ranges(n_rows, row_len)
    seen: set[int] = set()
    draws = set()
    for k in range(200):
        ranges = sample_row_ranges(n_rows, row_len, key=k)
        assert ranges == sample_row_ranges(n_rows, row_len, key=k) and len(ranges) == len(spread) == 4
        assert all(e - s == ROW_RUN and s % ROW_RUN == 0 for s, e in ranges) and ranges == sorted(set(ranges))
        seen.update(s for s, _ in ranges)
        draws.add(tuple(ranges))
    assert seen == set(range(0, n_rows, ROW_RUN)) and len(draws) > 150
    assert sample_row_ranges(200, 512, key=1) == [(0, 200)]  # small tensors are read whole either way


def test_hardening_draws_its_sample_rows_with_the_deployment_seed():
    """An attacker who leaves the scans' public rows clean and tampers with every other row passes a spread sample
    but not hardening's, whose rows come from the deployment seed; under one seed the vLLM path (screen on the whole
    tensor) and the GGUF tool (sample_row_ranges with detector_sample_key) read the same rows."""
    g = torch.Generator().manual_seed(5)
    clean = torch.randn(4096, 512, generator=g) * 0.02
    attacked, _ = box_attack(clean, "q8_0", margin=0.1, block=32, seed=5)
    public = torch.zeros(4096, dtype=torch.bool)
    for start, end in sample_row_ranges(4096, 512):
        public[start:end] = True
    x = torch.where(public[:, None], clean, attacked)
    fmt, config = get_format("q8_0"), HardeningConfig()
    assert not screen(x, fmt, "w", config)[1].suspicious  # the public spread sees only clean rows
    for secret in (bytes(32), bytes(range(32)), b"\x07" * 32):
        seed = DeploymentSeed(secret)
        score, judged = screen(x, fmt, "w", config, seed=seed)
        assert judged.suspicious, score
        rows = sample_row_ranges(4096, 512, config.detector_sample, detector_sample_key(seed, "w"))
        assert score == cell_score(torch.cat([x[s:e] for s, e in rows]), fmt, "w")
