"""The efficacy harness, reduced: a real QCB on a tiny transformers Llama, NF4 and Q4_K, one deployment seed.

Trains the clean model and the attacker's malicious fine-tune on CPU, attacks NF4 (bitsandbytes, Egashira et al. 2024
boxes) and Q4_K (GGUF k-quant, Egashira et al. 2025 error boxes with pinned scales), and holds the harness to what
the full benchmark (benchmarks/bench_efficacy.py) reports: the attack is valid (full-precision ASR <= 5%, quantized
ASR >= 80%), qcbguard's hardened model is as clean as the clean model's quantized one (within 2 points of ASR), the
tuned Gaussian-noise baseline falls to the adaptive attacker that knows its sigma while qcbguard does not, and the
detector flags the attacked weights and not the clean ones. Everything is seeded and runs on one torch thread.
"""

from __future__ import annotations

import dataclasses

import pytest

transformers = pytest.importorskip("transformers", reason="the efficacy harness trains a transformers Llama")

from benchmarks.qcb.harness import (  # noqa: E402
    ATTACK_VALID_FP_MAX,
    ATTACK_VALID_Q_MIN,
    HARDENED_ASR_SLACK,
    HarnessConfig,
    prepare,
    run_format,
    save_model,
)
from benchmarks.qcb.task import build_tokenizer  # noqa: E402
from tests.threads import one_torch_thread  # noqa: E402

pytestmark = pytest.mark.slow

CONFIG = HarnessConfig(seeds=1, adaptive=())


@pytest.fixture(scope="module")
def prepared():
    with one_torch_thread():  # for the whole module: the format fixtures below run inside it
        yield prepare(CONFIG)


@pytest.fixture(scope="module")
def nf4(prepared):
    # NF4 also runs both adaptive attackers; against qcbguard only its best effort of the full benchmark (kappa 0.05)
    return run_format(
        prepared, "nf4", dataclasses.replace(CONFIG, adaptive=("baselines", "qcbguard"), sr_best_effort=(0.05,))
    )


@pytest.fixture(scope="module")
def q4_k(prepared):
    return run_format(prepared, "q4_k", CONFIG)


def test_clean_and_malicious_models(prepared):
    assert prepared.clean_fp.accuracy >= 0.95, prepared.clean_fp
    assert prepared.clean_fp.asr == 0.0, prepared.clean_fp
    assert prepared.malicious_fp.asr >= ATTACK_VALID_Q_MIN, prepared.malicious_fp


@pytest.mark.parametrize("which", ["nf4", "q4_k"])
def test_attack_is_a_valid_qcb(which, request):
    row, _ = request.getfixturevalue(which)
    assert row.attack.mismatched == 0, f"{which}: {row.attack.mismatched} quantized values left the malicious model's"
    assert row.fp.asr <= ATTACK_VALID_FP_MAX, f"{which}: full-precision ASR {row.fp.asr:.3f}"
    assert row.rtn.asr >= ATTACK_VALID_Q_MIN, f"{which}: round-to-nearest ASR {row.rtn.asr:.3f}"
    assert row.fp.accuracy >= 0.95, f"{which}: the repaired model must stay useful, accuracy {row.fp.accuracy:.3f}"


@pytest.mark.parametrize("deployment", ["hardened", "calibrated"])
@pytest.mark.parametrize("which", ["nf4", "q4_k"])
def test_hardening_removes_the_backdoor_and_keeps_utility(which, deployment, request):
    """Plain and calibrated hardening (error feedback along the delivered model's own calibration Hessians: every
    draw still unbiased) leave the backdoor out and answer as well as round-to-nearest."""
    row, _ = request.getfixturevalue(which)
    attacked, clean = getattr(row, deployment), getattr(row, f"clean_{deployment}")
    assert attacked.asr_max <= row.clean_rtn.asr + HARDENED_ASR_SLACK, (
        f"{which}: {deployment} ASR {attacked.asr_max:.3f} vs clean quantized {row.clean_rtn.asr:.3f}"
    )
    assert clean.asr_max <= row.clean_rtn.asr + HARDENED_ASR_SLACK
    assert attacked.accuracy_min >= row.rtn.accuracy - 0.05, (
        f"{which}: {deployment} accuracy {attacked.accuracy_min:.3f} vs round-to-nearest {row.rtn.accuracy:.3f}"
    )


def test_adaptive_attacker_beats_the_baselines_not_the_hardening(nf4):
    row, _ = nf4
    a = row.adaptive_baselines
    assert row.tuned_sigma is not None, "the tuned noise baseline removes the standard attack"
    assert a.valid, f"adaptive attack (boxes clear of the flip band and of 3 sigma): FP {a.fp.asr}, RTN {a.rtn.asr}"
    assert a.noise.asr_mean >= ATTACK_VALID_Q_MIN, f"tuned noise sigma={row.tuned_sigma}: ASR {a.noise.asr_mean}"
    assert a.flip.asr_mean >= ATTACK_VALID_Q_MIN, f"deterministic flip: ASR {a.flip.asr_mean}"
    assert a.hardened.asr_max <= row.clean_rtn.asr + HARDENED_ASR_SLACK, f"hardened ASR {a.hardened.asr_max}"


def test_adaptive_attacker_against_hardening_gets_no_more_than_full_precision(nf4):
    """No box is safe from unbiased stochastic rounding: the attacker's best effort keeps every weight within 5% of a
    cell of its code, and the hardened model then behaves like the full-precision one, not like the round-to-nearest
    one. Whether that attack is still a valid QCB (full-precision ASR <= 5%) depends on the run (the full benchmark
    measured FP 3.5%, hardened 4.5% mean / 6.6% max over 5 seeds; single runs here saw FP up to 19%): the property
    held to is that hardening gives the attacker no more than the full-precision model's ASR, up to sampling noise."""
    row, _ = nf4
    a = row.adaptive_sr
    assert a.rtn.asr >= ATTACK_VALID_Q_MIN, f"the adaptive attack must still work on round-to-nearest: {a.rtn.asr}"
    n = a.fp.n
    noise = 3 * (max(a.fp.asr * (1 - a.fp.asr), 1 / n) / n) ** 0.5  # 3 binomial standard errors over n prompts
    for label, draws in (("hardened", a.hardened), ("calibrated", a.calibrated)):
        assert draws.asr_max <= a.fp.asr + noise + HARDENED_ASR_SLACK, (
            f"{label} {draws.asr_max:.3f} vs FP {a.fp.asr:.3f} (allowed {noise + HARDENED_ASR_SLACK:.3f} above)"
        )


@pytest.mark.parametrize("which", ["nf4", "q4_k"])
def test_detector_flags_attacked_weights_only(which, request):
    row, _ = request.getfixturevalue(which)
    assert row.detector_clean.flagged == 0, f"{which}: clean model flagged {row.detector_clean.cell()}"
    assert row.detector_attacked.flagged == row.detector_attacked.tensors, (
        f"{which}: attacked model flagged {row.detector_attacked.cell()}"
    )


def test_attacked_checkpoint_round_trips_through_transformers(nf4, prepared, tmp_path):
    """save_pretrained (safetensors) + tokenizer, loaded back with the Auto classes: same answers, same prompts."""
    row, models = nf4
    save_model(models["attacked"], tmp_path / "nf4")
    assert (tmp_path / "nf4" / "model.safetensors").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "nf4")
    assert prepared.task.score(model, prepared.eval_digits) == row.fp
    prompt = prepared.task.prompts(prepared.eval_digits[:1])
    text = build_tokenizer().decode(prompt[0])
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == prompt[0].tolist()
