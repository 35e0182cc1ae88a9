"""The cell-position detector separates box-clamped weights from clean, bf16, heavy-tailed and dequantized ones.

The attacks here are the geometric end state of a QCB repair (Egashira et al.): every weight clamped into the
shrunk round-to-nearest preimage of a malicious code, block scales pinned. The trained attacks of the efficacy
harness are the end-to-end proof; this is the unit-level one.
"""

from __future__ import annotations

import pytest
import torch

from qcbguard_kernels import get_format
from qcbguard_kernels.detection import cell_score, verdict
from tests.inputs import fresh_seed

SEED = fresh_seed()
# format, the attacker's box margin in cells (int8 0.1 step per side as in the paper; NF4 1%), scale block length
BOX_ATTACKS = [("bnb_int8", 0.1, 1024), ("nf4", 0.01, 64), ("q4_0", 0.05, 32), ("q8_0", 0.1, 32)]


def _clean(seed: int, heavy: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 1024, generator=g) * 0.02
    if heavy:
        w = w * torch.exp(torch.randn(256, 1024, generator=g))
    return w


def _pin(target: torch.Tensor, source: torch.Tensor, block: int) -> torch.Tensor:
    """target with each block's absmax element taken from source, the others kept strictly inside that absmax."""
    t, s = target.reshape(-1, block).clone(), source.reshape(-1, block)
    pinned = s.abs().argmax(dim=1, keepdim=True)
    bound = s.gather(1, pinned).abs() * 0.999
    t = torch.maximum(torch.minimum(t, bound), -bound)
    t.scatter_(1, pinned, s.gather(1, pinned))
    return t.reshape(target.shape)


def _box_attack(w: torch.Tensor, fmt_name: str, margin: float, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp w into the round-to-nearest preimage (shrunk by `margin` cell per side) of the codes of a malicious
    neighbour w + 0.7 step noise; each scale block's absmax element is pinned so the scales stay put.
    Returns (attacked weights, the malicious codes they round to)."""
    fmt = get_format(fmt_name)
    g = torch.Generator().manual_seed(SEED + 1)
    enc = fmt.encode(w)
    step = (fmt.code_values(enc, enc.cells.upper) - fmt.code_values(enc, enc.cells.lower)).abs()
    step = torch.where(step > 0, step, step.max())
    malicious = _pin(w + torch.randn(w.shape, generator=g) * step * 0.7, w, block)
    menc = fmt.encode(malicious)
    q = menc.cells.nearest
    lo_code, hi_code = int(menc.cells.lower.min()), int(menc.cells.upper.max())
    v = fmt.code_values(menc, q)
    below = (v + fmt.code_values(menc, (q - 1).clamp(min=lo_code))) / 2
    above = (v + fmt.code_values(menc, (q + 1).clamp(max=hi_code))) / 2
    lo, hi = torch.minimum(below, above), torch.maximum(below, above)
    lo = lo + 2 * margin * (v - lo)
    hi = hi - 2 * margin * (hi - v)
    attacked = _pin(torch.minimum(torch.maximum(w, lo), hi), w, block)
    return attacked, q


@pytest.mark.parametrize(("fmt_name", "margin", "block"), BOX_ATTACKS)
def test_clean_weights_are_not_flagged(fmt_name, margin, block):
    fmt = get_format(fmt_name)
    for i, w in enumerate([_clean(SEED), _clean(SEED + 7, heavy=True)]):
        for stored in (w, w.bfloat16(), w.half()):
            score = cell_score(stored, fmt)
            assert not verdict(score).suspicious, (fmt_name, i, stored.dtype, score, SEED)


@pytest.mark.parametrize(("fmt_name", "margin", "block"), BOX_ATTACKS)
def test_dequantized_weights_are_on_grid_not_suspicious(fmt_name, margin, block):
    fmt = get_format(fmt_name)
    deq = fmt.dequantize(fmt.quantize(_clean(SEED)))
    score = cell_score(deq, fmt)
    assert score.on_grid_fraction > 0.99
    assert not verdict(score).suspicious, score


@pytest.mark.parametrize(("fmt_name", "margin", "block"), BOX_ATTACKS)
def test_box_attacked_weights_are_flagged(fmt_name, margin, block):
    fmt = get_format(fmt_name)
    attacked, malicious_codes = _box_attack(_clean(SEED), fmt_name, margin, block)
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
    w = _clean(SEED)
    pinned = fmt.dequantize(fmt.quantize(w))
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(SEED)) < 0.3
    score = cell_score(torch.where(mask, pinned, w), fmt)
    assert 0.2 < score.interior_on_grid_fraction < 0.35
    assert verdict(score).suspicious


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
