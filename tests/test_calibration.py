"""Calibration for calibrated hardening: `qcbguard calibrate` (qcbguard/calibration.py) on a real transformers Llama,
the Hessian file it writes, and `qcbguard-gguf quantize --hessians` reading it."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from gguf_tools.cli import main as gguf_main
from gguf_tools.quantize import CALIBRATION_KEY
from gguf_tools.reader import GgufFile
from qcbguard.calibration import HessianFile, collect_hessians, gguf_tensor_names, sampled_windows
from qcbguard.cli import main as qcbguard_main
from qcbguard_kernels import QcbguardError
from qcbguard_kernels.hardening import DeploymentSeed
from tests.gguf_models import LlamaShape, write_llama

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


#: the tiny decoder both test models share: 2 layers, hidden 32, 4 heads over 2 key-value heads, 64 tokens
_TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(intermediate_size=64, **_TINY)).eval()


def _tiny_mixtral() -> torch.nn.Module:
    """_tiny_llama's shape with four experts of width 48, two per token."""
    config = transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **_TINY)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).eval()


def test_collected_hessians_are_the_inputs_second_moments():
    """H of q_proj is X^T X of what q_proj reads (the first layer norm's output), summed over every batch; q, k
    and v read the same input, so their Hessians are equal bit for bit."""
    model = _tiny_llama()
    batches = [torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (1, 5))]
    seen = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    hessians = collect_hessians(model, batches)
    hook.remove()
    x = torch.cat([s.reshape(-1, 32) for s in seen]).double()
    assert x.shape[0] == 23
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(hessians[q], x.T @ x, rtol=1e-10, atol=1e-12)
    assert torch.equal(hessians[q], hessians["model.layers.0.self_attn.k_proj.weight"])
    assert hessians["model.layers.1.mlp.down_proj.weight"].shape == (64, 64)
    assert "lm_head.weight" in hessians  # every linear unless weight_names narrows it
    assert set(collect_hessians(model, batches[:1], [q])) == {q}


def test_expert_hessians_are_each_experts_routed_inputs_second_moments():
    """A mixture of experts (transformers' fused Mixtral experts): one H per expert for gate_up_proj, over the
    hidden states the router sent to it, and one for down_proj, over act(gate) * up of those tokens; checked
    against a token-by-token loop over what the experts module was given."""
    from qcbguard.calibration import fused_experts

    model = _tiny_mixtral()
    experts = model.model.layers[1].mlp.experts
    assert fused_experts(experts) and not fused_experts(model.model.layers[1].mlp)
    seen = []
    spy = experts.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    batches = [torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (1, 5))]
    hessians = collect_hessians(model, batches)
    spy.remove()
    gate_up = torch.zeros(4, 32, 32, dtype=torch.float64)
    down = torch.zeros(4, 48, 48, dtype=torch.float64)
    routed = 0
    for args, kwargs in seen:
        call = inspect.signature(experts.forward).bind(*args, **kwargs).arguments
        for x, chosen in zip(call["hidden_states"].reshape(-1, 32), call["top_k_index"].reshape(-1, 2), strict=True):
            for e in chosen.tolist():
                routed += 1
                gate_up[e] += torch.outer(x.double(), x.double())
                g, u = (experts.gate_up_proj[e] @ x).chunk(2)
                z = (experts.act_fn(g) * u).double()
                down[e] += torch.outer(z, z)
    assert routed == 23 * 2  # every token to two experts
    name = "model.layers.1.mlp.experts"
    assert hessians[f"{name}.gate_up_proj"].shape == (4, 32, 32)
    assert torch.allclose(hessians[f"{name}.gate_up_proj"], gate_up, rtol=1e-9, atol=1e-12)
    assert torch.allclose(hessians[f"{name}.down_proj"], down, rtol=1e-5, atol=1e-9)
    assert set(collect_hessians(model, batches[:1], [f"{name}.gate_up_proj", f"{name}.down_proj"])) == {
        f"{name}.gate_up_proj",
        f"{name}.down_proj",
    }


def test_gguf_names_follow_llama_cpp():
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert gguf_tensor_names("llama", 2, names) == {
        names[0]: ("blk.0.attn_q.weight",),
        names[1]: ("blk.1.ffn_down.weight",),
    }
    # fused experts (Mixtral, which llama.cpp converts as a Llama): gate_up_proj is llama.cpp's gate and up tensors
    experts = ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
    assert gguf_tensor_names("mixtral", 2, experts) == {
        experts[0]: ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"),
        experts[1]: ("blk.1.ffn_down_exps.weight",),
    }
    with pytest.raises(QcbguardError, match=r"no llama\.cpp architecture"):
        gguf_tensor_names("not-a-model", 2, names)
    with pytest.raises(QcbguardError, match=r"no llama\.cpp tensor name"):
        gguf_tensor_names("llama", 2, ["model.layers.0.mystery.weight"])


def test_the_hessian_file_stores_each_distinct_matrix_once(tmp_path):
    a = torch.eye(8, dtype=torch.float64) * 2
    b = torch.ones(16, 16, dtype=torch.float64) + torch.eye(16)
    path = tmp_path / "h.safetensors"
    HessianFile.write(path, {"q": a, "k": a.clone(), "down": b}, tokens=10)
    f = HessianFile(path)
    assert f.names == {"q", "k", "down"}
    assert torch.equal(f.get("k"), a) and torch.equal(f.get("down"), b)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as raw:
        assert sorted(raw.keys()) == ["down", "q"]  # k is an alias of q
    assert (f.source("k"), f.source("q"), f.source("down")) == ("q", "q", "down")
    assert f.shared("k") and f.shared("q") and not f.shared("down")  # one feedback plan serves q and k
    # the fingerprint follows the Hessians, not the file's bytes (safetensors orders its metadata anew each write)
    HessianFile.write(tmp_path / "again.safetensors", {"q": a, "k": a.clone(), "down": b}, tokens=10)
    HessianFile.write(tmp_path / "other.safetensors", {"q": a, "k": a.clone(), "down": b * 2}, tokens=10)
    assert f.fingerprint == HessianFile(tmp_path / "again.safetensors").fingerprint
    assert f.fingerprint != HessianFile(tmp_path / "other.safetensors").fingerprint
    f.check({"q": (4, 8), "k": (2, 8), "down": (8, 16), "other": (4, 4)})  # tensors without a Hessian are fine
    with pytest.raises(QcbguardError, match="does not quantize"):
        f.check({"q": (4, 8), "k": (2, 8)})
    with pytest.raises(QcbguardError, match=r"\(4, 9\) \(9 inputs\), needs \(9, 9\)"):
        f.check({"q": (4, 9), "k": (2, 8), "down": (8, 16)})
    with pytest.raises(QcbguardError, match=r"needs \(3, 16, 16\)"):  # a 3-D weight takes one per expert
        f.check({"q": (4, 8), "k": (2, 8), "down": (3, 8, 16)})
    HessianFile.write(path, {"q": torch.full((4, 4), float("inf"))}, tokens=1)
    with pytest.raises(QcbguardError, match="non-finite"):
        HessianFile(path).get("q")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(QcbguardError, match="not a readable"):
        HessianFile(tmp_path / "bad.safetensors")


def _calibrate_argv(model: torch.nn.Module, tmp_path: Path, out: Path) -> list[str]:
    """`qcbguard calibrate` arguments for `model` saved with the harness's tokenizer, over 300 tokens of digits."""
    from benchmarks.qcb.task import build_tokenizer

    tokenizer = build_tokenizer()
    model.resize_token_embeddings(max(len(tokenizer), 64))
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join("0123456789"[i % 10] for i in range(300)))
    return ["calibrate", str(tmp_path / "ckpt"), "--text", str(text), "--out", str(out), "--context", "64"]


@pytest.mark.slow
def test_calibrate_command_writes_llama_cpp_named_hessians(tmp_path):
    """`qcbguard calibrate DIR --text F --out H --gguf-names` on a saved transformers checkpoint with a tokenizer."""
    out = tmp_path / "hessians.safetensors"
    assert qcbguard_main([*_calibrate_argv(_tiny_llama(), tmp_path, out), "--gguf-names"]) == 0
    f = HessianFile(out)
    assert f.names == {f"blk.{i}.{t}.weight" for i in range(2) for t in _LAYER_TENSORS}
    assert f.shape("blk.1.ffn_down.weight") == (64, 64) and f.shape("blk.0.attn_v.weight") == (32, 32)
    assert float(torch.diagonal(f.get("blk.0.attn_q.weight")).min()) > 0
    (tmp_path / "empty.txt").write_text("")
    assert (
        qcbguard_main(["calibrate", str(tmp_path / "ckpt"), "--text", str(tmp_path / "empty.txt"), "--out", str(out)])
        == 2
    )


@pytest.mark.slow
def test_calibrate_command_writes_expert_hessians_under_llama_cpp_names(tmp_path, capsys):
    """`qcbguard calibrate --gguf-names` on a saved Mixtral: one stacked Hessian per expert tensor, gate_up_proj's
    under llama.cpp's ffn_gate_exps and ffn_up_exps (one stored, one alias), down_proj's under ffn_down_exps."""
    out = tmp_path / "hessians.safetensors"
    assert qcbguard_main([*_calibrate_argv(_tiny_mixtral(), tmp_path, out), "--gguf-names"]) == 0
    assert "2 mixture-of-experts layers: one Hessian per expert" in capsys.readouterr().out
    f = HessianFile(out)
    experts = {f"blk.{i}.ffn_{t}_exps.weight" for i in range(2) for t in ("gate", "up", "down")}
    assert experts <= f.names and not any("ffn_gate_inp" in n for n in f.names)  # the router is never quantized
    assert f.shape("blk.1.ffn_gate_exps.weight") == (4, 32, 32) and f.shape("blk.1.ffn_down_exps.weight") == (4, 48, 48)
    assert f.source("blk.0.ffn_up_exps.weight") == f.source("blk.0.ffn_gate_exps.weight")  # the same inputs
    assert f.slices("blk.0.ffn_down_exps.weight") == 4
    routed = torch.stack([torch.diagonal(f.get("blk.0.ffn_gate_exps.weight", e)).sum() for e in range(4)])
    assert (routed >= 0).all() and routed.sum() > 0


def test_generated_calibration_text_is_sampled_windows_from_bos():
    """The model's own text: windows start at BOS, hold at most `context` sampled tokens, end early at EOS, add up to
    the requested count, and the same seed gives the same windows (another seed, others)."""
    model = _tiny_llama()
    windows = sampled_windows(model, bos=1, eos=None, tokens=50, context=16, seed=7)
    assert [w.shape[1] - 1 for w in windows] == [16, 16, 16, 2]
    assert all(int(w[0, 0]) == 1 and w.shape[0] == 1 for w in windows)
    again = sampled_windows(model, bos=1, eos=None, tokens=50, context=16, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(windows, again, strict=True))
    other = sampled_windows(model, bos=1, eos=None, tokens=50, context=16, seed=8)
    assert not all(torch.equal(a, b) for a, b in zip(windows, other, strict=True))
    # a token that certainly comes (the only one with any probability) ends every window after one token
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[5, 0] = 1e4  # with a positive input feature; logits of every other token are 0
        model.model.norm.weight.fill_(0.0)
        model.model.norm.weight[0] = 1.0
    stopped = sampled_windows(model, bos=1, eos=5, tokens=200, context=16, seed=7)
    assert all(w.shape[1] <= 17 for w in stopped) and sum(w.shape[1] - 1 for w in stopped) >= 200
    with pytest.raises(QcbguardError, match="no BOS"):
        sampled_windows(model, bos=None, eos=None, tokens=5, context=4, seed=0)


@pytest.mark.slow
def test_calibrate_command_generates_its_own_text(tmp_path):
    """`qcbguard calibrate DIR --generate N --generate-seed S`: Hessians from N tokens the model writes; the same seed
    writes the same file, the file says where its tokens came from; --text and --generate exclude each other."""
    from safetensors import safe_open

    from benchmarks.qcb.task import build_tokenizer

    tokenizer = build_tokenizer()
    model = _tiny_llama()
    model.resize_token_embeddings(max(len(tokenizer), 64))
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    outs = [tmp_path / f"h{i}.safetensors" for i in range(3)]
    for out, seed in zip(outs, ("3", "3", "4"), strict=True):
        argv = ["calibrate", str(tmp_path / "ckpt"), "--generate", "40", "--context", "16", "--out", str(out)]
        assert qcbguard_main([*argv, "--generate-seed", seed]) == 0
    f = HessianFile(outs[0])
    assert f.names == {f"model.layers.{i}.{t}.weight" for i in range(2) for t in _HF_LAYER_TENSORS}
    assert f.fingerprint == HessianFile(outs[1]).fingerprint != HessianFile(outs[2]).fingerprint
    with safe_open(str(outs[0]), framework="pt") as raw:
        meta = raw.metadata()
    assert meta["source"] == "generated (seed 3)" and int(meta["tokens"]) >= 40
    text = tmp_path / "t.txt"
    text.write_text("0 1 2 3")
    with pytest.raises(SystemExit):  # argparse: not both
        qcbguard_main(["calibrate", str(tmp_path / "ckpt"), "--generate", "8", "--text", str(text), "--out", "x"])
    refused = ["calibrate", str(tmp_path / "ckpt"), "--generate", "8", "--max-tokens", "4", "--out", str(outs[2])]
    assert qcbguard_main(refused) == 2


_HF_LAYER_TENSORS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip
_LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("calibrated_gguf")
    write_llama(d / "llama-f16.gguf", LlamaShape(n_layer=2, n_vocab=300))
    write_llama(d / "moe-f16.gguf", LlamaShape(n_ff=256, n_layer=1, n_vocab=300, n_expert=4))
    DeploymentSeed(bytes(range(32))).write(d / "seed.hex")
    return d


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, 8, generator=g, dtype=torch.float64) @ torch.randn(8, n, generator=g, dtype=torch.float64)
    return x.T @ x + 0.1 * torch.eye(n, dtype=torch.float64)


def _tensors(path: Path) -> dict[str, bytes]:
    with GgufFile(path) as f:
        return {t.name: bytes(f.tensor_bytes(t)) for t in f.tensors}


def test_gguf_quantize_calibrates_the_tensors_a_hessian_file_names(gguf_model, tmp_path):
    """Tensors with a Hessian get other (calibrated) codes than plain hardening under the same seed; every other
    tensor keeps plain hardening's bytes; the report says which were calibrated."""
    src, seed = gguf_model / "llama-f16.gguf", gguf_model / "seed.hex"
    with GgufFile(src) as f:
        inputs = {t.name: t.ne[0] for t in f.tensors}
    calibrated = ["blk.0.attn_q.weight", "blk.1.ffn_down.weight"]
    hessians = tmp_path / "h.safetensors"
    HessianFile.write(hessians, {n: _spd(inputs[n], i) for i, n in enumerate(calibrated)}, tokens=1)
    plain, fed, report = tmp_path / "plain.gguf", tmp_path / "fed.gguf", tmp_path / "report.json"
    assert gguf_main(["quantize", str(src), str(plain), "Q4_K_M", "--seed-file", str(seed), "-q"]) == 0
    argv = ["quantize", str(src), str(fed), "Q4_K_M", "--seed-file", str(seed), "-q", "--hessians", str(hessians)]
    assert gguf_main([*argv, "--report", str(report)]) == 0
    a, b = _tensors(plain), _tensors(fed)
    assert [n for n in a if a[n] != b[n]] == calibrated
    with GgufFile(fed) as f, GgufFile(plain) as g:
        assert f.value(CALIBRATION_KEY) == HessianFile(hessians).fingerprint
        assert g.value(CALIBRATION_KEY, None) is None
    entries = {t["name"]: t for t in json.loads(report.read_text())["tensors"]}
    assert sorted(n for n, t in entries.items() if t["calibrated"]) == calibrated
    assert entries["blk.0.attn_q.weight"]["codes_changed"] > 0


def test_gguf_quantize_refuses_a_hessian_file_that_does_not_fit(gguf_model, tmp_path, capsys):
    src, seed = gguf_model / "llama-f16.gguf", gguf_model / "seed.hex"
    out = tmp_path / "out.gguf"
    cases = {
        "does not quantize": {"blk.9.attn_q.weight": torch.eye(4)},
        "inputs": {"blk.0.attn_q.weight": torch.eye(5)},
    }
    for message, content in cases.items():
        hessians = tmp_path / "h.safetensors"
        HessianFile.write(hessians, content, tokens=1)
        argv = ["quantize", str(src), str(out), "Q4_0", "--seed-file", str(seed), "-q", "--hessians", str(hessians)]
        assert gguf_main(argv) == 2
        assert message in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.glob(".out.gguf.*"))
    assert gguf_main([*argv[:3], "Q4_0", "--no-harden", "-q", "--hessians", str(hessians)]) == 2
    assert "--no-harden" in capsys.readouterr().err


def test_gguf_quantize_calibrates_each_expert_with_its_own_hessian(gguf_model, tmp_path, capsys):
    """A mixture of experts: a stacked Hessian (experts, inputs, inputs) for a 3-D ffn_*_exps tensor hardens row
    block e (expert e) along Hessian e, bit for bit what harden_calibrated gives that expert's rows at their global
    row offset; a Hessian of a tensor kept in full precision is unused; a stack of the wrong length is refused
    before anything is written."""
    from gguf_tools.constants import GGML_TYPES_BY_NAME
    from gguf_tools.tensors import read_rows, registry_format
    from qcbguard_kernels.hardening import harden_calibrated

    src, seed = gguf_model / "moe-f16.gguf", gguf_model / "seed.hex"
    names = ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_down_exps.weight")
    with GgufFile(src) as f:
        shapes = {n: f.by_name[n].ne for n in names}  # ggml order: (inputs, rows per expert, experts)
    stacks = {
        n: torch.stack([_spd(ne[0], 10 * i + e) for e in range(ne[2])]) for i, (n, ne) in enumerate(shapes.items())
    }
    hessians = tmp_path / "h.safetensors"
    HessianFile.write(hessians, stacks, tokens=1)
    plain, fed = tmp_path / "plain.gguf", tmp_path / "fed.gguf"
    assert gguf_main(["quantize", str(src), str(plain), "Q4_0", "--seed-file", str(seed), "-q"]) == 0
    argv = ["quantize", str(src), str(fed), "Q4_0", "--seed-file", str(seed), "-q", "--hessians", str(hessians)]
    assert gguf_main(argv) == 0
    a, b = _tensors(plain), _tensors(fed)
    assert sorted(n for n in a if a[n] != b[n]) == sorted(names)
    fmt = registry_format(GGML_TYPES_BY_NAME["Q4_0"])
    deployment = DeploymentSeed.from_file(seed)
    with GgufFile(src) as f:
        for name, ne in shapes.items():
            rows, row_bytes = ne[1], ne[0] // 32 * 18
            for e in range(ne[2]):
                x = read_rows(f, f.by_name[name], e * rows, (e + 1) * rows)
                h = HessianFile(hessians).get(name, e)  # as stored: float32
                packed, _ = harden_calibrated(x, fmt, name, deployment, h, row_offset=e * rows)
                expert_bytes = b[name][e * rows * row_bytes : (e + 1) * rows * row_bytes]
                assert packed.tensors["blocks"].numpy().tobytes() == expert_bytes, (name, e)
    # a Hessian for a tensor the run keeps as it is (the router, as calibrate writes for Linear routers) goes unused
    HessianFile.write(hessians, {**stacks, "blk.0.ffn_gate_inp.weight": torch.eye(256)}, tokens=1)
    assert gguf_main(argv) == 0 and _tensors(fed) == b
    HessianFile.write(hessians, {names[0]: stacks[names[0]][:3]}, tokens=1)
    assert gguf_main(argv) == 2
    assert "needs (4, 256, 256)" in capsys.readouterr().err
