"""`qcbguard-gguf scan`: the detector over a GGUF file, on a simulated QCB (box-clamped Q4_0 weights) and clean ones."""

from __future__ import annotations

import json

import pytest
import torch

from gguf_tools.cli import main
from tests.attacks import box_attack, clean_weights
from tests.gguf_models import write_tensors
from tests.inputs import fresh_seed

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = fresh_seed()


@pytest.fixture(scope="module")
def attacked_file(tmp_path_factory):
    clean = clean_weights(SEED)
    attacked, _ = box_attack(clean_weights(SEED + 1), "q4_0", 0.05, 32, SEED)
    path = tmp_path_factory.mktemp("scan") / "attacked-f32.gguf"
    return write_tensors(
        path,
        {
            "blk.0.attn_q.weight": clean.numpy(),
            "blk.0.ffn_up.weight": attacked.numpy(),
            "blk.0.attn_norm.weight": torch.ones(1024).numpy(),
        },
    )


def test_scan_flags_the_box_attacked_tensor_only(attacked_file, tmp_path, capsys):
    report, metrics = tmp_path / "scan.json", tmp_path / "scan.prom"
    rc = main(["scan", str(attacked_file), "--report", str(report), "--metrics-file", str(metrics)])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "SUSPICIOUS" in out and "blk.0.ffn_up.weight" in out
    rep = json.loads(report.read_text())
    assert rep["verdict"]["flagged"] == ["blk.0.ffn_up.weight"], (rep["verdict"], SEED)
    assert rep["verdict"]["flagged_by_format"].get("q4_0", 0) == 1
    by_name = {t["name"]: t for t in rep["tensors"]}
    assert not by_name["blk.0.attn_q.weight"]["suspicious"]
    assert {f["format"] for f in by_name["blk.0.attn_q.weight"]["findings"]} >= {"q4_0", "q8_0", "q4_k", "q6_k"}
    assert rep["skipped"] == [
        {"name": "blk.0.attn_norm.weight", "type": "F32", "reason": "never quantized by llama-quantize"}
    ]
    text = metrics.read_text()
    assert (
        'qcbguard_tensors_flagged_total{format="q4_0",layer_type="ffn_up",mode="scan",model="attacked-f32"} 1.0' in text
    )


def test_scan_of_a_quantized_file_says_what_it_cannot_see(attacked_file, tmp_path, capsys):
    q8 = tmp_path / "q8.gguf"
    assert main(["quantize", str(attacked_file), str(q8), "Q8_0", "--no-harden", "-q"]) == 0
    report = tmp_path / "scan.json"
    assert main(["scan", str(q8), "--report", str(report)]) == 0
    assert "0 tensors scanned" in capsys.readouterr().out
    skipped = {s["name"]: s["reason"] for s in json.loads(report.read_text())["skipped"]}
    assert skipped["blk.0.ffn_up.weight"].startswith("already quantized")


def test_scan_refuses_a_malformed_file(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
    assert main(["scan", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("qcbguard-gguf: error:")


def test_quantize_refuses_a_flagged_tensor_when_told_to(attacked_file, tmp_path, capsys):
    target = tmp_path / "q4.gguf"
    assert main(["quantize", str(attacked_file), str(target), "Q4_0", "--on-suspicious", "refuse", "-q"]) == 2
    err = capsys.readouterr().err
    assert "blk.0.ffn_up.weight" in err and "tampered" in err
    assert list(tmp_path.iterdir()) == []


def test_scan_reads_a_sample_of_a_large_tensor_and_reports_its_full_shape(tmp_path):
    # 4096 x 512 weights, 2x the detector's sample: only sampled rows are read, the report names the whole tensor
    g = torch.Generator().manual_seed(SEED)
    big = torch.randn(4096, 512, generator=g) * 0.02
    path = write_tensors(tmp_path / "big-f32.gguf", {"token_embd.weight": big.numpy()})
    report = tmp_path / "scan.json"
    assert main(["scan", str(path), "--report", str(report)]) == 0
    (scan,) = json.loads(report.read_text())["tensors"]
    assert scan["name"] == "token_embd.weight" and scan["shape"] == [4096, 512]


def test_the_lattice_null_flag_reaches_quantize_and_scan(tmp_path, capsys):
    """A weight dequantized from Q4_1 (SmolLM2's shipped GGUF is one), quantized to Q5_1 under --on-suspicious refuse:
    the local decoys flag it and the run refuses; with --detector-lattice-null it is judged against its own lattice,
    passes and is written. `scan` flags it under Q5_1 (and the affine k-quants, whose scale search fits a Q4_1
    lattice at nearly one offset per run); `scan --lattice-null` under none."""
    from qcbguard_kernels import get_format

    q4_1 = get_format("q4_1")
    w = clean_weights(SEED)
    lattice = q4_1.dequantize(q4_1.quantize(w)).reshape(w.shape)
    source = write_tensors(tmp_path / "lattice-f32.gguf", {"blk.0.ffn_up.weight": lattice.numpy()})
    target = tmp_path / "q5_1.gguf"
    refuse = ["--on-suspicious", "refuse", "-q"]
    assert main(["quantize", str(source), str(target), "Q5_1", *refuse]) == 2
    assert not target.exists()
    assert main(["quantize", str(source), str(target), "Q5_1", *refuse, "--detector-lattice-null"]) == 0
    assert target.exists()
    flagged = {}
    for flags, status in (([], 1), (["--lattice-null"], 0)):
        report = tmp_path / f"scan{len(flags)}.json"
        assert main(["scan", str(source), "--report", str(report), *flags]) == status
        findings = json.loads(report.read_text())["tensors"][0]["findings"]
        flagged[bool(flags)] = {f["format"] for f in findings if f["suspicious"]}
    assert "q5_1" in flagged[False] and not flagged[True], flagged
    assert all(f["lattice_fraction"] > 0.9 for f in findings if f["format"] == "q5_1")
