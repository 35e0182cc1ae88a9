"""`qcbguard scan`: a clean checkpoint exits 0, a box-attacked one exits 1 naming the tensor, unreadable input exits 2
with one line on stderr."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

from qcbguard.cli import main
from qcbguard.tiny_model import build_tiny_llama
from tests.attacks import box_attack
from tests.inputs import fresh_seed

SEED = fresh_seed()
ATTACKED = "model.layers.1.mlp.up_proj.weight"
# a cheap target set for most tests; the default set runs once (slow)
FORMATS = ["nf4", "q4_0"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    sd = build_tiny_llama()
    clean = root / "clean.safetensors"
    save_file(sd, str(clean))
    attacked_sd = dict(sd)
    w = sd[ATTACKED].float()
    attacked_sd[ATTACKED], _ = box_attack(w, "nf4", 0.01, 64, SEED)
    attacked_sd[ATTACKED] = attacked_sd[ATTACKED].bfloat16()
    attacked = root / "attacked.safetensors"
    save_file(attacked_sd, str(attacked))
    shards = root / "sharded"
    shards.mkdir()
    names = sorted(attacked_sd)
    save_file({n: attacked_sd[n] for n in names[: len(names) // 2]}, str(shards / "model-00001-of-00002.safetensors"))
    save_file({n: attacked_sd[n] for n in names[len(names) // 2 :]}, str(shards / "model-00002-of-00002.safetensors"))
    return {"clean": clean, "attacked": attacked, "sharded": shards, "root": root}


def test_clean_checkpoint_exits_0(checkpoints, capsys):
    assert main(["scan", str(checkpoints["clean"]), "--formats", *FORMATS]) == 0
    assert capsys.readouterr().out.strip().startswith("clean: 0 of 16 tensors flagged")


def test_attacked_checkpoint_exits_1_and_names_the_tensor(checkpoints, capsys, tmp_path):
    report = tmp_path / "scan.json"
    assert main(["scan", str(checkpoints["attacked"]), "--formats", *FORMATS, "--report", str(report)]) == 1
    out = capsys.readouterr().out
    assert f"SUSPICIOUS {ATTACKED} [nf4]" in out
    data = json.loads(report.read_text())
    assert data["verdict"]["flagged"] == [ATTACKED]
    assert data["verdict"]["flagged_by_format"]["nf4"] == 1
    assert len(data["tensors"]) == 16  # 2-D tensors only: norms are never quantized


def test_a_checkpoint_dequantized_from_another_format_is_flagged_with_a_caution(tmp_path, capsys):
    """A known false positive, stated: the embedded model dequantized from Q4_0 and scanned under Q8_0 is flagged
    (the decoys do not model the Q4_0 lattice); the summary and the report name the tensors that repeat values."""
    from qcbguard_kernels import get_format

    q4_0 = get_format("q4_0")
    weights = {n: w.float() for n, w in build_tiny_llama().items() if w.dim() == 2}
    sd = {n: q4_0.dequantize(q4_0.quantize(w)).reshape(w.shape).bfloat16() for n, w in weights.items()}
    path, report = tmp_path / "dequantized.safetensors", tmp_path / "scan.json"
    save_file(sd, str(path))
    assert main(["scan", str(path), "--formats", "q8_0", "--report", str(report)]) == 1
    assert "repeat values within blocks, as checkpoints dequantized from another format do" in capsys.readouterr().out
    verdict = json.loads(report.read_text())["verdict"]
    assert verdict["flagged"] and verdict["cautioned"] == verdict["flagged"]


def test_a_checkpoint_dequantized_to_bf16_from_float32_passes_under_its_own_format(tmp_path, capsys):
    """The embedded model quantized to NF4 from float32, dequantized and stored in bf16: the block maxima's bf16
    rounding moves every re-encoded scale, so under NF4 its weights miss their codes by more than half an ulp, and
    the local decoys flagged it; it is a rescaled NF4 grid (the report says so) and passes."""
    from qcbguard_kernels import get_format

    nf4 = get_format("nf4")
    # the embedded weights are bf16 values: scaled by 1.001 they are float32 ones, as a float32 master copy holds
    weights = {n: w.float() * 1.001 for n, w in build_tiny_llama().items() if w.dim() == 2}
    sd = {n: nf4.dequantize(nf4.quantize(w)).reshape(w.shape).bfloat16() for n, w in weights.items()}
    path, report = tmp_path / "dequantized.safetensors", tmp_path / "scan.json"
    save_file(sd, str(path))
    assert main(["scan", str(path), "--formats", "nf4", "--report", str(report)]) == 0, capsys.readouterr().out
    findings = [f for t in json.loads(report.read_text())["tensors"] for f in t["findings"]]
    assert findings and all(f["grid_aligned"] and not f["suspicious"] for f in findings)
    assert any(f["near_code_fraction"] < 0.9 < f["rescaled_grid_fraction"] for f in findings)


def test_the_lattice_null_judges_a_dequantized_checkpoint_against_its_own_lattice(tmp_path, capsys):
    """The embedded model dequantized from NF4 and scanned under Q4_0: flagged by the local decoys, clean under
    `--lattice-null` (experimental), whose report says how much of each tensor its lattice null judged."""
    from qcbguard_kernels import get_format

    nf4 = get_format("nf4")
    weights = {n: w.float() for n, w in build_tiny_llama().items() if w.dim() == 2}
    sd = {n: nf4.dequantize(nf4.quantize(w)).reshape(w.shape).bfloat16() for n, w in weights.items()}
    path, report = tmp_path / "dequantized.safetensors", tmp_path / "scan.json"
    save_file(sd, str(path))
    assert main(["scan", str(path), "--formats", "q4_0"]) == 1
    assert main(["scan", str(path), "--formats", "q4_0", "--lattice-null", "--report", str(report)]) == 0, (
        capsys.readouterr().out
    )
    findings = [f for t in json.loads(report.read_text())["tensors"] for f in t["findings"]]
    assert findings and all(f["lattice_fraction"] > 0.5 and not f["suspicious"] for f in findings)


def test_sharded_directory_is_one_checkpoint(checkpoints, capsys):
    assert main(["scan", str(checkpoints["sharded"]), "--formats", "nf4", "--include", r"\.mlp\."]) == 1
    assert "1 of 6 tensors flagged" in capsys.readouterr().out


@pytest.mark.slow
def test_default_formats_clean_and_attacked(checkpoints, capsys):
    """Every default target format: no false positive on the clean bf16 model, the attack found."""
    assert main(["scan", str(checkpoints["clean"])]) == 0
    assert main(["scan", str(checkpoints["attacked"]), "--include", "up_proj"]) == 1
    assert f"SUSPICIOUS {ATTACKED} [nf4]" in capsys.readouterr().out


def _truncated(root):
    data = (root / "clean.safetensors").read_bytes()
    p = root / "truncated.safetensors"
    p.write_bytes(data[: len(data) // 2])
    return p


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing.safetensors", "does not exist"),
        (_truncated, "cannot read"),
        (
            lambda root: (root / "garbage.safetensors").write_bytes(b"\x00" * 64) and root / "garbage.safetensors",
            "cannot read",
        ),
        (lambda root: (root / "empty_dir").mkdir() or root / "empty_dir", "holds no .safetensors"),
        (lambda root: (root / "model.bin").write_bytes(b"pickle") and root / "model.bin", "expected a .safetensors"),
    ],
    ids=["missing", "truncated", "garbage", "empty-dir", "other-suffix"],
)
def test_unreadable_input_exits_2_with_one_line(checkpoints, capsys, make, message):
    path = make(checkpoints["root"])
    assert main(["scan", str(path), "--formats", "nf4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_unknown_format_is_refused(checkpoints, capsys):
    assert main(["scan", str(checkpoints["clean"]), "--formats", "nf5"]) == 2
    assert "unknown quantization format 'nf5'" in capsys.readouterr().err


def test_gguf_files_go_through_the_gguf_tools_scan(tmp_path, capsys):
    """`qcbguard scan model.gguf` is `qcbguard-gguf scan`: same verdict, same exit codes."""
    from tests.gguf_models import LlamaShape, write_llama

    path = write_llama(tmp_path / "tiny-f16.gguf", LlamaShape(n_layer=1))
    report = tmp_path / "scan.json"
    assert main(["scan", str(path), "--report", str(report)]) == 0
    assert json.loads(report.read_text())
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:1000])
    capsys.readouterr()
    assert main(["scan", str(truncated)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
