"""Hardening: reproducible from the seed, independent of chunking and sharding, unbiased, and secret-keeping."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from qcbguard_kernels import QcbguardError, get_format
from qcbguard_kernels.hardening import (
    DeploymentSeed,
    HardeningConfig,
    SeedFileError,
    SuspiciousTensorError,
    harden_tensor,
    philox4x32,
    stochastic_codes,
    uniform24,
    uniform_grid,
)

ROW_LOCAL_FORMATS = ["q4_k", "q8_0", "q4_0", "bnb_int8"]  # scales depend only on a row: row shards agree


def _weight(rows: int = 12, cols: int = 512, seed: int = 0) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02).bfloat16().float()


def test_philox_matches_the_published_known_answer():
    """Random123's Philox-4x32-10 known-answer vector (counter = key = all ones)."""
    ones = torch.tensor([0xFFFFFFFF], dtype=torch.int64)
    out = philox4x32(0xFFFFFFFFFFFFFFFF, ones, ones, ones, ones)
    assert [int(o) for o in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize("name", ["q4_k", "nf4", "q8_0", "bnb_int8"])
def test_same_seed_same_bytes_other_seed_other_bytes(name):
    fmt, x = get_format(name), _weight()
    seed = DeploymentSeed(bytes(range(32)))
    a, _ = harden_tensor(x, fmt, "w", seed)
    b, _ = harden_tensor(x, fmt, "w", DeploymentSeed(bytes(range(32))))
    c, _ = harden_tensor(x, fmt, "w", DeploymentSeed.fresh())
    d, _ = harden_tensor(x, fmt, "other.weight", seed)
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key])
    packed = next(iter(a.tensors))
    assert not torch.equal(a.tensors[packed], c.tensors[packed]), "a fresh seed must change the codes"
    assert not torch.equal(a.tensors[packed], d.tensors[packed]), "another tensor name must draw another stream"


@pytest.mark.parametrize("name", ROW_LOCAL_FORMATS)
def test_row_shards_hold_the_codes_of_the_whole_tensor(name):
    """Tensor parallelism along the output dimension: each rank hardens its rows with their global offset."""
    fmt, x, seed = get_format(name), _weight(rows=16), DeploymentSeed.fresh()
    whole = fmt.dequantize(harden_tensor(x, fmt, "w", seed)[0])
    shards = [fmt.dequantize(harden_tensor(x[r : r + 4], fmt, "w", seed, row_offset=r)[0]) for r in range(0, 16, 4)]
    assert torch.equal(torch.cat(shards), whole)


def test_column_offsets_index_the_global_stream():
    """A column shard draws the same randomness as the same columns of the whole tensor (q8_0: 32-blocks per row)."""
    fmt, x, seed = get_format("q8_0"), _weight(rows=4, cols=256), DeploymentSeed.fresh()
    key = seed.key_for("w")
    whole = stochastic_codes(fmt.encode(x), key)
    right = stochastic_codes(fmt.encode(x[:, 128:]), key, col_offset=128)
    assert torch.equal(whole[:, 128:], right)


def test_each_philox_call_serves_four_adjacent_columns():
    """Element (row, col) takes word col % 4 of Philox(key, (col // 4, row, 0, 0)); any window of the grid (offsets
    not multiples of 4, one column, one row) reads the same uniforms."""
    key = DeploymentSeed.fresh().key_for("w")
    grid = uniform_grid(key, 5, 3, 2, 11)
    for r in range(3):
        for c in range(11):
            col, row = c + 2, r + 5
            words = philox4x32(key, torch.tensor([col // 4]), torch.tensor([row]), torch.tensor(0), torch.tensor(0))
            assert grid[r, c] == uniform24(words[col % 4])[0], (r, c)
    assert torch.equal(uniform_grid(key, 6, 1, 7, 1), grid[1:2, 5:6])
    assert torch.equal(uniform_grid(key, 5, 3, 3, 9), grid[:, 1:10])
    assert uniform_grid(key, 0, 2, 0, 0).shape == (2, 0)


@pytest.mark.parametrize("name", ["q4_0", "nf4", "bnb_int8", "q4_k"])
def test_hardened_rounding_is_unbiased(name):
    """Over many seeds the mean hardened value converges to the weight (round-to-nearest does not)."""
    fmt, x = get_format(name), _weight(rows=2, cols=256, seed=3)
    enc = fmt.encode(x, "w")
    steps = (fmt.code_values(enc, enc.cells.upper) - fmt.code_values(enc, enc.cells.lower)).abs()
    draws = 400
    total = torch.zeros_like(x)
    for i in range(draws):
        seed = DeploymentSeed(i.to_bytes(32, "little"))
        total += fmt.code_values(enc, stochastic_codes(enc, seed.key_for("w")))
    mean = total / draws
    live = enc.cells.steerable
    # Bernoulli mean over 400 draws: standard error <= step / 40; allow 5 standard errors on average.
    bias = ((mean - x).abs()[live] / steps[live]).mean()
    rtn_bias = ((fmt.code_values(enc, enc.cells.nearest) - x).abs()[live] / steps[live]).mean()
    assert bias < 0.03, f"{name}: hardened mean is {bias:.3f} steps from the weight"
    assert rtn_bias > 0.2  # round-to-nearest is off by ~0.25 step on average: the test can tell the difference


def test_report_counts_what_changed_and_holds_no_secret():
    fmt, x, seed = get_format("q4_k"), _weight(), DeploymentSeed.fresh()
    packed, report = harden_tensor(x, fmt, "model.layers.0.mlp.up_proj.weight", seed)
    enc = fmt.encode(x)
    codes_rtn = fmt.quantize(x).tensors["blocks"]
    assert report.elements == x.numel() and report.format == "q4_k"
    assert report.steerable == int(enc.cells.steerable.sum())
    # about E[min(p, 1-p)] = 1/4 of the steerable codes move, each by one step
    assert 0.15 < report.codes_changed / report.steerable < 0.35
    assert report.max_change_steps == 1
    assert abs(report.mean_change_steps - report.codes_changed / report.elements) < 1e-9
    assert not torch.equal(packed.tensors["blocks"], codes_rtn)
    text = repr(report.as_dict())
    assert seed.fingerprint not in text  # the report identifies tensors, not seeds


def test_seed_file_round_trip_and_refusals(tmp_path):
    seed = DeploymentSeed.fresh()
    path = tmp_path / "qcbguard.seed"
    seed.write(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert DeploymentSeed.from_file(path).fingerprint == seed.fingerprint
    with pytest.raises(SeedFileError, match="already exists"):
        seed.write(path)
    os.chmod(path, 0o644)
    with pytest.raises(SeedFileError, match="chmod 600"):
        DeploymentSeed.from_file(path)
    bad = tmp_path / "bad.seed"
    bad.write_text("not hex\n")
    os.chmod(bad, 0o600)
    with pytest.raises(SeedFileError, match="hex"):
        DeploymentSeed.from_file(bad)
    with pytest.raises(SeedFileError, match="cannot read"):
        DeploymentSeed.from_file(tmp_path / "missing.seed")


def test_seed_never_shows_in_repr_str_or_pickle():
    secret = bytes(range(32))
    seed = DeploymentSeed(secret)
    for text in (repr(seed), str(seed), f"{seed}"):
        assert secret.hex() not in text and seed.fingerprint in text
    with pytest.raises(TypeError, match="not serializable"):
        pickle.dumps(seed)


def test_detect_only_packs_round_to_nearest_and_reports():
    fmt, x = get_format("nf4"), _weight()
    packed, report = harden_tensor(x, fmt, "w", DeploymentSeed.fresh(), HardeningConfig(mode="detect-only"))
    assert torch.equal(packed.tensors["weight"], fmt.quantize(x).tensors["weight"])
    assert report.codes_changed == 0 and report.mode == "detect-only"
    assert not report.suspicious and report.detector_distance < 0.02


def test_refuse_policy_stops_on_a_flagged_tensor():
    fmt, x = get_format("q8_0"), _weight()
    pinned = fmt.dequantize(fmt.quantize(x))
    tampered = torch.where(torch.arange(x.numel()).reshape(x.shape) % 3 == 0, pinned, x)  # a third pinned on codes
    refuse = HardeningConfig(on_suspicious="refuse")
    with pytest.raises(SuspiciousTensorError, match=r"'blk\.0\.ffn_up\.weight' looks tampered for q8_0"):
        harden_tensor(tampered, fmt, "blk.0.ffn_up.weight", DeploymentSeed.fresh(), refuse)
    _, report = harden_tensor(tampered, fmt, "blk.0.ffn_up.weight", DeploymentSeed.fresh())
    assert report.suspicious and report.reasons


def test_config_refuses_unknown_keys_and_values():
    assert HardeningConfig.from_dict({"mode": "detect-only"}).mode == "detect-only"
    with pytest.raises(QcbguardError, match=r"unknown qcbguard setting.*sed_file"):
        HardeningConfig.from_dict({"sed_file": "/x"})
    with pytest.raises(QcbguardError, match="unknown hardening mode 'off'"):
        HardeningConfig(mode="off")
    with pytest.raises(QcbguardError, match="on_suspicious"):
        HardeningConfig(on_suspicious="ignore")
