"""The efficacy harness's attacked model end to end in llama.cpp (llama-cpp-python 0.3.36 built from source).

The reduced harness's clean model and its standard QCB on Q4_K and Q4_0 (the same training as
tests/test_efficacy_reduced.py), converted to F32 GGUF (benchmarks/qcb/gguf_export.py) and quantized to llama-quantize's
Q4_K_M and Q4_0 twice: by llama_model_quantize (what llama-quantize runs) and by qcbguard-gguf with hardening. Every
number comes from llama.cpp's own greedy generation, scored by the task's rule:

- the conversion is right: the F32 file's logits are the transformers model's (float32, up to summation order), and
  its generation scores what the harness scores in torch;
- llama-quantize delivers the attack: every weight of the attacked tensors that keep the attacked type lands on the
  attacker's code, the F32 file is benign (ASR <= ATTACK_VALID_FP_MAX) and llama-quantize's file malicious
  (ASR >= ATTACK_VALID_Q_MIN);
- qcbguard-gguf removes it: its file's ASR is the clean model's llama-quantize ASR up to HARDENED_ASR_SLACK, at the
  same accuracy.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="the efficacy harness trains a transformers Llama")
pytest.importorskip("llama_cpp", reason="llama.cpp runs the GGUF files (make test builds llama-cpp-python)")

from benchmarks.qcb.evaluate import bench_seeds
from benchmarks.qcb.gguf_eval import GgufEfficacy, gguf_efficacy
from benchmarks.qcb.harness import (
    ATTACK_VALID_FP_MAX,
    ATTACK_VALID_Q_MIN,
    HARDENED_ASR_SLACK,
    HarnessConfig,
    prepare,
)
from tests.threads import one_torch_thread

pytestmark = pytest.mark.slow

CONFIG = HarnessConfig(seeds=1, adaptive=())  # the reduced harness's run
CASES = {"q4_k": "Q4_K_M", "q4_0": "Q4_0"}
# llama-quantize's mixture on the two-layer model: Q4_K_M gives layer 1's attn_v and ffn_down Q6_K (use_more_bits:
# the last eighth of two layers is layer 1); the attack reaches the other twelve. Q4_0 keeps all fourteen in Q4_0.
MORE_BITS = {"Q4_K_M": {"model.layers.1.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight"}, "Q4_0": set()}
# The F32 file's logits against transformers': both float32, summed in a different order (measured about 2e-6 of the
# largest logit; a wrong permutation or hyper-parameter is off by order 1).
LOGIT_AGREEMENT = 1e-5


@pytest.fixture(scope="module")
def prepared():
    with one_torch_thread():  # for the whole module (the runs below too): the harness's numbers hold on one thread
        yield prepare(CONFIG)


@pytest.fixture(scope="module", params=list(CASES))
def run(request, prepared) -> GgufEfficacy:
    fmt = request.param
    # one deployment seed for the attacked model (as the reduced harness); the clean model only needs its
    # llama-quantize file, the reference the hardened ASR is held to
    return gguf_efficacy(prepared, fmt, CASES[fmt], CONFIG, bench_seeds(1), clean_seeds=[])


def test_f32_gguf_is_the_transformers_model(run, prepared):
    a = run.attacked
    assert a.logit_agreement <= LOGIT_AGREEMENT, a.logit_agreement
    assert run.clean.logit_agreement <= LOGIT_AGREEMENT, run.clean.logit_agreement
    # Generation runs with llama.cpp's default F16 KV cache: its rounding can flip a near-tied argmax, so one prompt
    # of 256 may answer differently from the harness's float32 torch model (measured: none on these models).
    one = 1 / a.fp.n
    for ours, theirs in ((a.fp, run.torch_fp), (run.clean.fp, prepared.clean_fp)):
        assert abs(ours.asr - theirs.asr) <= one and abs(ours.accuracy - theirs.accuracy) <= one, (ours, theirs)
    assert a.fp.perplexity == pytest.approx(run.torch_fp.perplexity, rel=1e-4)


def test_mixture_gives_the_attacked_tensors_the_attacked_type(run):
    attacked_type = run.format.upper()
    others = {name: t for name, t in run.attacked.targets.items() if t != attacked_type}
    assert set(others) == MORE_BITS[run.type_name], others
    assert run.attacked.on_target_tensors == 14 - len(MORE_BITS[run.type_name])


def test_llama_quantize_delivers_the_attack(run):
    a = run.attacked
    assert run.attack.mismatched == 0, f"{run.format}: the harness's attack left {run.attack.mismatched} values"
    assert run.torch_rtn.asr >= ATTACK_VALID_Q_MIN, run.torch_rtn
    # llama-quantize's codes are the harness's: every weight of the attacked tensors on the attacker's target
    assert a.on_target_llama_quantize == 1.0, a.on_target_llama_quantize
    assert a.fp.asr <= ATTACK_VALID_FP_MAX, f"{run.format}: llama.cpp full-precision ASR {a.fp.asr:.3f}"
    assert a.llama_quantize.asr >= ATTACK_VALID_Q_MIN, f"{run.type_name}: llama-quantize ASR {a.llama_quantize.asr}"
    assert run.clean.llama_quantize.asr <= ATTACK_VALID_FP_MAX, run.clean.llama_quantize


def test_qcbguard_gguf_removes_the_attack(run):
    a = run.attacked
    clean = run.clean.llama_quantize.asr
    assert a.hardened.asr_max <= clean + HARDENED_ASR_SLACK, (
        f"{run.type_name}: qcbguard-gguf ASR {a.hardened.asr_max:.3f} vs the clean model's llama-quantize {clean:.3f}"
    )
    assert a.hardened.accuracy_min >= a.llama_quantize.accuracy - 0.05, (a.hardened, a.llama_quantize)
    # the draws move a share of the weights off the attacker's codes (measured 14% on Q4_K, whose error boxes keep
    # weights near their codes and pin whole sub-blocks, 35% on Q4_0)
    assert max(a.on_target_hardened) < 0.95, a.on_target_hardened
