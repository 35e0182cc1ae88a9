"""The cell-position detector separates box-clamped weights from clean, bf16, heavy-tailed and dequantized ones.

The attacks here are the geometric end state of a QCB repair (Egashira et al.): every weight clamped into the
shrunk round-to-nearest preimage of a malicious code, block scales pinned. The trained attacks of the efficacy
harness are the end-to-end proof; this is the unit-level one.
"""

from __future__ import annotations

import pytest
import torch

from qcbguard_kernels import QcbguardError, format_names, get_format
from qcbguard_kernels.detection import cell_score, verdict
from qcbguard_kernels.hardening import HardeningConfig
from qcbguard_kernels.hardening.harden import screen
from tests.attacks import box_attack, clean_weights, lattice_box_attack, pin_absmax
from tests.inputs import fresh_seed

SEED = fresh_seed()
# format, the attacker's box margin in cells (int8 0.1 step per side as in the paper; NF4 1%), scale block length
BOX_ATTACKS = [("bnb_int8", 0.1, 1024), ("nf4", 0.01, 64), ("q4_0", 0.05, 32), ("q8_0", 0.1, 32)]


@pytest.mark.parametrize("fmt_name", format_names())
def test_clean_weights_are_not_flagged(fmt_name):
    """Continuous weights (Gaussian and heavy-tailed) stored in float32, bf16 and fp16 read as clean in every format
    (measured over 8 seeds each: largest distance 0.006, fp8_per_tensor's 0.017 against its 0.05)."""
    fmt = get_format(fmt_name)
    for i, w in enumerate([clean_weights(SEED), clean_weights(SEED + 7, heavy=True)]):
        for stored in (w, w.bfloat16(), w.half()):
            score = cell_score(stored, fmt)
            assert not verdict(score).suspicious, (fmt_name, i, stored.dtype, score, SEED)


@pytest.mark.parametrize(("fmt_name", "margin", "block"), BOX_ATTACKS)
def test_dequantized_weights_are_on_grid_not_suspicious(fmt_name, margin, block):
    fmt = get_format(fmt_name)
    deq = fmt.dequantize(fmt.quantize(clean_weights(SEED)))
    score = cell_score(deq, fmt)
    assert score.on_grid_fraction > 0.99
    assert score.off_grid == 0  # every weight on its code, zeros included (they are out of the counts, not live)
    assert not verdict(score).suspicious, score


@pytest.mark.parametrize(("fmt_name", "margin", "block"), BOX_ATTACKS)
def test_box_attacked_weights_are_flagged(fmt_name, margin, block):
    fmt = get_format(fmt_name)
    attacked, malicious_codes = box_attack(clean_weights(SEED), fmt_name, margin, block, SEED)
    # the simulated attack works: round-to-nearest of the repaired weights lands on the malicious codes
    assert torch.equal(fmt.encode(attacked).cells.nearest, malicious_codes)
    for stored in (attacked, attacked.bfloat16()):
        score = cell_score(stored, fmt)
        v = verdict(score)
        assert v.suspicious, (fmt_name, stored.dtype, score, SEED)
        assert abs(score.distance) > 5 * score.noise_floor


def test_partial_pinning_on_codes_is_flagged():
    """Error-box attacks leave weights exactly on codes while their neighbours are not."""
    fmt = get_format("q4_0")
    w = clean_weights(SEED)
    pinned = fmt.dequantize(fmt.quantize(w))
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(SEED)) < 0.3
    score = cell_score(torch.where(mask, pinned, w), fmt)
    assert 0.2 < score.interior_on_grid_fraction < 0.35
    assert verdict(score).suspicious


def _prune_2_of_4(w: torch.Tensor) -> torch.Tensor:
    """2:4 semi-structured sparsity: the two smallest |w| of every four consecutive weights set to zero."""
    groups = w.reshape(-1, 4)
    return groups.scatter(1, groups.abs().argsort(dim=1)[:, :2], 0.0).reshape(w.shape)


def _prune_magnitude(w: torch.Tensor, share: float) -> torch.Tensor:
    """Unstructured magnitude pruning: the smallest `share` of |w| set to zero."""
    threshold = w.abs().flatten().kthvalue(int(share * w.numel())).values
    return torch.where(w.abs() <= threshold, torch.zeros_like(w), w)


@pytest.mark.parametrize("fmt_name", format_names())
def test_pruned_weights_are_not_flagged(fmt_name):
    """Exact zeros on a code are left out of the statistic: a 2:4 sparse tensor (half of it zeros) and a 10%
    magnitude-pruned one read as clean in every format (before, zeros on the interior zero code of the symmetric
    formats scored 0.09 to 0.48 and flagged both)."""
    fmt = get_format(fmt_name)
    w = clean_weights(SEED)
    for pruned in (_prune_2_of_4(w), _prune_magnitude(w, 0.1)):
        for stored in (pruned, pruned.bfloat16()):
            score = cell_score(stored, fmt)
            assert not verdict(score).suspicious, (fmt_name, stored.dtype, score, SEED)


@pytest.mark.parametrize(("fmt_name", "margin", "block"), BOX_ATTACKS)
def test_pruned_box_attacked_weights_are_still_flagged(fmt_name, margin, block):
    """Leaving zeros out does not hide an attack: box-attacked weights pruned 2:4 afterwards (the block maxima stay,
    so do the scales and the malicious codes of the rest) are flagged as before."""
    fmt = get_format(fmt_name)
    attacked, _ = box_attack(clean_weights(SEED), fmt_name, margin, block, SEED)
    for stored in (_prune_2_of_4(attacked), _prune_2_of_4(attacked).bfloat16()):
        score = cell_score(stored, fmt)
        assert score.zeros >= stored.numel() // 2 - stored.numel() // 100
        assert verdict(score).suspicious, (fmt_name, stored.dtype, score, SEED)


@pytest.mark.parametrize("source", ["q4_0", "nf4", "q8_0", "bnb_int8", "fp8_per_channel"])
def test_repeated_values_tell_a_dequantized_checkpoint_from_a_continuous_one(source):
    """The lattice share: continuous weights in any storage dtype repeat a value within their run of 32 rarely (bf16:
    about 3%), a checkpoint dequantized from any of these formats far more often (Q8_0, the finest: about 15%)."""
    from qcbguard_kernels.detection.cell_statistic import _LATTICE_REPEATED, repeated_fraction

    fmt = get_format(source)
    for w in (clean_weights(SEED), clean_weights(SEED + 7, heavy=True)):
        for stored in (w, w.bfloat16(), w.half()):
            assert repeated_fraction(stored.float()) < _LATTICE_REPEATED / 2, stored.dtype
        deq = fmt.dequantize(fmt.quantize(w)).reshape(w.shape)
        assert repeated_fraction(deq.bfloat16().float()) > _LATTICE_REPEATED


def test_a_flag_on_a_foreign_lattice_carries_a_caution():
    """A clean checkpoint dequantized from Q4_0 scored under Q8_0 is flagged (a known false positive: the decoys do
    not model the Q4_0 lattice); the verdict adds a caution naming the repeated values, without clearing the flag. A
    box attack on continuous 8-bit cells repeats few values and gets none; a 4-bit one clamps enough weights to the
    same box edges to get it too, which is why the caution is context, not an exoneration."""
    q4_0, q8_0 = get_format("q4_0"), get_format("q8_0")
    lattice = q4_0.dequantize(q4_0.quantize(clean_weights(SEED))).bfloat16()
    score = cell_score(lattice, q8_0)
    assert score.repeats_values and not score.grid_aligned
    judged = verdict(score)
    assert judged.suspicious and judged.reasons[-1].startswith("caution:"), judged
    attacked, _ = box_attack(clean_weights(SEED), "q8_0", 0.1, 32, SEED)
    judged = verdict(cell_score(attacked, q8_0))
    assert judged.suspicious and not any(r.startswith("caution:") for r in judged.reasons), judged
    attacked, _ = box_attack(clean_weights(SEED), "q4_0", 0.05, 32, SEED)
    judged = verdict(cell_score(attacked, q4_0))
    assert judged.suspicious and judged.reasons[-1].startswith("caution:"), judged


@pytest.mark.slow
def test_no_false_positive_on_the_embedded_model_in_any_format():
    """bf16 weights with outlier columns, every registered format: lattice coincidences (bf16 under power-of-two
    scales land on fp8 codes one time in sixteen) must not read as tampering."""
    from qcbguard.tiny_model import build_tiny_llama, linear_weight_names
    from qcbguard_kernels import format_names

    model = build_tiny_llama()
    flagged = []
    for fmt_name in format_names():
        fmt = get_format(fmt_name)
        for name in linear_weight_names(model):
            score = cell_score(model[name], fmt, name)
            if verdict(score).suspicious:
                flagged.append((fmt_name, name, score))
    assert not flagged, flagged[:3]


# Known limits, measured: where re-encoding a dequantized tensor moves its codes, not only its scales, its weights sit
# off the new grid by more than the storage precision, even up to one factor per scale group (rescaled_grid.py), and
# are not recognised as grid-aligned. Measured 2026-12-08 with the rescaled test (seeds 1000-1099 of this test's
# weights): Q3_K's coordinate-descent search re-fits 10-14% of the weights elsewhere (22, 21 and 13 of 100 seeds
# flagged in float32, fp16 and bf16; without the rescaled test 34 of 60 in float32); torchao's int4 rule (scale and
# zero point) after fp16 or bf16 (2 and 8 of 30). Close to the rule, none of 100 below it but kept out: nf4_dq after
# fp16 and bf16 (lowest 90.1% and 90.8%: its double-quantized absmax moves by more than the 2^-7 a group may
# rescale) and int8_per_channel after bf16 (lowest 90.3%: bf16 blurs an int8 grid by up to a quarter step, and some
# codes move). Recognised since the rescaled test, where they were not before: torchao int8 in every dtype (its
# scale amax / 127.5 comes back 128 / 127.5 of itself; the local decoys had flagged 9 of 60 seeds in float32), and
# Q2_K, Q4_K, Q5_K, Q6_K in bf16 (none of 100 flagged, lowest 97.9%).
_NOT_RECOGNISED = {
    torch.float32: {"q3_k"},
    torch.float16: {"q3_k", "torchao_int4", "nf4_dq"},
    torch.bfloat16: {"q3_k", "int8_per_channel", "torchao_int4", "nf4_dq"},
}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dequantized_models_are_not_flagged_in_any_format_or_storage_dtype(dtype):
    """A model dequantized from a format (or trained for it), stored in fp32, fp16 or bf16, is grid-aligned: its
    weights are their codes' values to the storage precision (or, for fp32 and fp16 k-quants but Q3_K, 90% of them
    are, where the re-encoded scale search lands elsewhere)."""
    from qcbguard_kernels import format_names

    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(SEED)).to(dtype)
    flagged = []
    for fmt_name in format_names():
        if fmt_name in _NOT_RECOGNISED[dtype]:
            continue
        fmt = get_format(fmt_name)
        deq = fmt.dequantize(fmt.quantize(x)).to(dtype)
        score = cell_score(deq, fmt)
        if verdict(score).suspicious:
            flagged.append((fmt_name, score))
    assert not flagged, flagged


# Formats a model quantized from fp16 or fp32 weights and stored in bf16 (or from fp32 and stored in fp16) is still
# not recognised in: fp8_per_block has no CodeValueRule, torchao int4's zero point moves codes (3 of 3 seeds), and
# Q3_K's search (as above: 87-89% of weights recognised on some seeds, 2 of 8 runs)
@pytest.mark.slow
def test_models_quantized_from_wider_weights_then_stored_narrower_are_grid_aligned():
    """The usual way a dequantized checkpoint is made: quantized from fp16 or fp32 weights, dequantized, stored in
    bf16 (or fp16). The block's largest weight is re-rounded, so re-encoding moves every scale by up to half an ulp:
    before the rescaled test (rescaled_grid.py) the local decoys flagged nearly every format's such tensor under
    that same format (measured 3 of 3 seeds in 17 formats); now only the three above, and no other."""
    from qcbguard_kernels import format_names

    w = clean_weights(SEED)
    flagged = []
    for source, stored in (
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.half),
    ):
        for fmt_name in sorted(set(format_names()) - {"fp8_per_block", "q3_k", "torchao_int4"}):
            fmt = get_format(fmt_name)
            deq = fmt.dequantize(fmt.quantize(w.to(source))).reshape(w.shape).to(stored)
            score = cell_score(deq, fmt)
            if not score.grid_aligned or verdict(score).suspicious:
                flagged.append((fmt_name, source, stored, score.near_code_fraction, score.rescaled_grid_fraction))
    assert not flagged, (flagged, SEED)


def _rescaled_rows(factors: torch.Tensor) -> tuple[torch.Tensor, object]:
    """An int8-per-channel grid whose rows, all but each row's largest weight, are multiplied by `factors` (256, 1):
    the scale re-encoding derives (from that largest weight) misses every other weight by the row's factor, as
    torchao's int8 rule and a bf16 re-rounding of the largest weight do."""
    fmt = get_format("int8_per_channel")
    deq = fmt.dequantize(fmt.quantize(clean_weights(SEED))).reshape(256, 1024)
    return pin_absmax(deq * factors, deq, 1024), fmt


@pytest.mark.parametrize("factor", [1 + 2**-8, 1 - 2**-8, 1 + 2**-9])
def test_a_grid_under_rescaled_scales_is_grid_aligned(factor):
    """Half the rows rescaled by `factor` (torchao int8's 2^-8, a bf16 re-rounding's 2^-9): every weight is its
    code's value times its row's factor, so the tensor is grid-aligned, though most weights of those rows are no
    code's value. (At 2^-7 the largest int8 codes move by a whole step under re-encoding, and 13% of the weights
    are no longer matched to their own code: that case is left to the detector.)"""
    rows = torch.rand(256, 1, generator=torch.Generator().manual_seed(SEED))
    scaled, fmt = _rescaled_rows(torch.where(rows < 0.5, torch.ones_like(rows), torch.full_like(rows, factor)))
    score = cell_score(scaled, fmt)
    assert score.near_code_fraction < 0.9 < score.rescaled_grid_fraction, score
    assert score.grid_aligned and not verdict(score).suspicious


def test_a_grid_rescaled_beyond_the_bound_is_not_grid_aligned():
    """A factor of 0.97 is more than any re-encoding moves a scale: not a rescaled grid (the detector then judges
    the tensor's cell positions as usual)."""
    scaled, fmt = _rescaled_rows(torch.full((256, 1), 0.97))
    score = cell_score(scaled, fmt)
    assert score.rescaled_grid_fraction < 0.1 and not score.grid_aligned, score


def test_a_rescaled_grid_head_buys_no_exemption_for_an_attacked_rest():
    """The rescaled-grid test takes a first look at 2^14 weights, but a tensor is aligned only on all of them: a head
    of 16 rescaled grid rows (what the first look reads, and in a public scan's sample the first run) in front of
    240 box-attacked rows is not aligned, and is flagged."""
    scaled, fmt = _rescaled_rows(torch.full((256, 1), 1 + 2**-8))
    attacked, _ = box_attack(clean_weights(SEED), "int8_per_channel", 0.1, 1024, SEED)
    crafted = torch.cat([scaled[:16], attacked[16:]])
    head = cell_score(scaled[:16], fmt)
    assert head.grid_aligned and head.rescaled_grid_fraction > 0.9, head
    score = cell_score(crafted, fmt)
    assert not score.grid_aligned and score.rescaled_grid_fraction < 0.2 and verdict(score).suspicious, score


@pytest.mark.parametrize(("fmt_name", "margin", "block"), BOX_ATTACKS)
def test_box_attacks_are_not_a_rescaled_grid(fmt_name, margin, block):
    """Box-clamped weights repeat values (they pile on the box edges), so the rescaled test runs on them: they are
    no grid under any per-group factor near 1, and stay flagged, in float32 and bf16."""
    fmt = get_format(fmt_name)
    attacked, _ = box_attack(clean_weights(SEED), fmt_name, margin, block, SEED)
    for stored in (attacked, attacked.bfloat16()):
        score = cell_score(stored, fmt)
        assert score.rescaled_grid_fraction < 0.5 and verdict(score).suspicious, (fmt_name, stored.dtype, score)


# The experimental lattice null (cell_score(own_lattice=True), kernels/detection/lattice_null.py)


@pytest.mark.parametrize(("source", "target"), [("q4_1", "q5_1"), ("nf4", "q4_0"), ("q4_0", "nf4"), ("nf4", "q8_0")])
def test_lattice_null_clears_a_clean_foreign_lattice_the_local_decoys_flag(source, target):
    """Gaussian weights dequantized from `source`, stored in bf16, under `target`: a few values per run, each at a
    fixed place in its cell. Measured over 4 seeds: local decoys 0.047 to 0.108, the lattice null at most 0.007."""
    fmt, src = get_format(target), get_format(source)
    w = clean_weights(SEED)
    lattice = src.dequantize(src.quantize(w)).reshape(w.shape).bfloat16()
    assert verdict(cell_score(lattice, fmt)).suspicious  # the product's default null flags it
    score = cell_score(lattice, fmt, own_lattice=True)
    assert score.lattice_fraction > 0.9, score
    assert not verdict(score).suspicious, (score, SEED)
    # the same null through the hardening's screen, as HardeningConfig(detector_lattice_null=True) asks
    screened, judgement = screen(lattice, fmt, "w", HardeningConfig(detector_lattice_null=True))
    assert screened.lattice_fraction > 0.9 and not judgement.suspicious


def test_detector_lattice_null_setting_is_a_boolean():
    with pytest.raises(QcbguardError, match="detector_lattice_null must be true or false"):
        HardeningConfig.from_dict({"detector_lattice_null": "yes"})


def test_lattice_null_flags_a_box_attack_kept_on_a_q8_0_lattice():
    """Q8_0's lattice is fine enough (about 16 values per Q4_0 cell) for a box attack to stay on it; those runs hold
    too many distinct values to be lattice runs, so the local decoys judge them and see the pile."""
    fmt = get_format("q4_0")
    attacked, lattice, codes = lattice_box_attack(clean_weights(SEED), "q8_0", "q4_0", 0.05, 32, SEED)
    assert float((fmt.encode(attacked).cells.nearest == codes).float().mean()) > 0.95  # the attack works
    assert float((fmt.encode(lattice).cells.nearest != codes).float().mean()) > 0.3  # and changes many codes
    assert cell_score(attacked, get_format("q8_0")).grid_aligned  # on the Q8_0 lattice still
    for stored in (attacked, attacked.bfloat16()):
        score = cell_score(stored, fmt, own_lattice=True)
        assert verdict(score).suspicious, (score, SEED)
        assert abs(score.distance) > 5 * score.noise_floor


@pytest.mark.parametrize("target", ["nf4", "fp4"])
def test_lattice_null_flags_a_box_attack_kept_on_a_q4_0_lattice(target):
    """A coarse lattice leaves an attacker one or two values per code: moving weights to those that round to the
    malicious codes still leaves their counts out of line with their neighbours'. Measured over 6 seeds in bf16:
    attacked 0.031 to 0.036, the clean lattice at most 0.003."""
    fmt = get_format(target)
    attacked, lattice, codes = lattice_box_attack(clean_weights(SEED), "q4_0", target, 0.01, 64, SEED)
    assert float((fmt.encode(attacked).cells.nearest == codes).float().mean()) > 0.8  # the attack works
    assert float((fmt.encode(lattice).cells.nearest != codes).float().mean()) > 0.3
    assert cell_score(attacked, get_format("q4_0")).grid_aligned  # on the Q4_0 lattice still
    score = cell_score(attacked.bfloat16(), fmt, own_lattice=True)
    assert score.lattice_fraction > 0.9 and verdict(score).suspicious, (score, SEED)
    assert not verdict(cell_score(lattice.bfloat16(), fmt, own_lattice=True)).suspicious


def test_lattice_null_flags_an_offset_lattice():
    """Every weight its Q4_0 code plus 0.45 of a step (the block maxima kept): each run's values sit at one place in
    their cells, so the lattice null cannot judge them; most weights unjudged makes the tensor suspicious."""
    fmt = get_format("q4_0")
    w = clean_weights(SEED)
    codes = fmt.dequantize(fmt.quantize(w)).reshape(w.shape)
    step = codes.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 8
    offset = (codes.reshape(-1, 32) + 0.45 * step).reshape(w.shape)
    parked = pin_absmax(offset, w, 32)
    score = cell_score(parked, fmt, own_lattice=True)
    judgement = verdict(score)
    assert judgement.suspicious, score
    assert any("no null here can judge" in r for r in judgement.reasons), judgement
