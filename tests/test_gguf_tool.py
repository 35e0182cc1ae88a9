"""The GGUF tool without llama.cpp: the reader against gguf-py, malformed files, the mixture rules, the CLI's refusals.

Byte parity with llama-quantize and generation in llama.cpp are in test_gguf_tool_llama.py.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gguf_tools.cli import main
from gguf_tools.constants import ValueType
from gguf_tools.mixtures import MIXTURES, ModelInfo, mixture, output_order, plan_types, use_more_bits
from gguf_tools.reader import GgufFile, GgufFormatError
from gguf_tools.writer import encode_kv
from tests.gguf_models import LlamaShape, write_llama, write_odd_shapes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gguf_models")
    write_llama(d / "llama-f16.gguf", LlamaShape(n_layer=4, n_vocab=300))
    write_odd_shapes(d / "odd.gguf")
    return d


def _run(*argv: str) -> int:
    return main(list(argv))


# -- reader ------------------------------------------------------------------------------------------------------


def test_released_pages_read_back_the_same(model_dir):
    """release() drops the map's pages from the process (memory follows the chunk); a later read of the same rows,
    or of a neighbouring tensor sharing a page, gets the same bytes back."""
    from gguf_tools.tensors import read_rows

    with GgufFile(model_dir / "llama-f16.gguf") as f:
        before = {t.name: bytes(f.tensor_bytes(t)) for t in f.tensors}
        for t in f.tensors:
            half = max(1, t.n_rows // 2)
            first = read_rows(f, t, 0, half)  # copies, then releases those rows' pages
            f.release(t)
            assert torch.equal(first.view(torch.uint8), read_rows(f, t, 0, half).view(torch.uint8)), t.name
        assert {t.name: bytes(f.tensor_bytes(t)) for t in f.tensors} == before


@pytest.mark.parametrize("name", ["llama-f16.gguf", "odd.gguf"])
def test_reader_agrees_with_gguf_py(model_dir, name):
    path = model_dir / name
    ref = gguf.GGUFReader(path)
    with GgufFile(path) as f:
        assert f.version == 3
        assert list(f.kv) == [field.name for field in ref.fields.values() if not field.name.startswith("GGUF.")]
        for key, field in ref.fields.items():
            if key.startswith("GGUF."):
                continue
            ours = f.value(key)
            theirs = field.contents()
            if isinstance(theirs, float) or (isinstance(theirs, list) and theirs and isinstance(theirs[0], float)):
                np.testing.assert_allclose(np.asarray(ours, dtype=np.float32), np.asarray(theirs, dtype=np.float32))
            else:
                assert ours == theirs, key
        assert [t.name for t in f.tensors] == [t.name for t in ref.tensors]
        for ours_t, ref_t in zip(f.tensors, ref.tensors, strict=True):
            assert list(ours_t.ne) == [int(d) for d in ref_t.shape]
            assert ours_t.type.id == int(ref_t.tensor_type)
            assert ours_t.data_start == ref_t.data_offset
            assert ours_t.nbytes == ref_t.n_bytes
            assert np.array_equal(f.tensor_bytes(ours_t).reshape(-1), np.asarray(ref_t.data).view(np.uint8).reshape(-1))


def _kv_header(n_tensors: int, pairs: list[bytes]) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(pairs)) + b"".join(pairs)


def test_reader_walks_a_262k_token_vocabulary_quickly(tmp_path):
    n = 262_144
    tokens = [f"tok{i}".encode() for i in range(n)]
    body = b"".join(struct.pack("<Q", len(t)) + t for t in tokens)
    array = (
        struct.pack("<Q", len(b"tokenizer.ggml.tokens"))
        + b"tokenizer.ggml.tokens"
        + struct.pack("<IIQ", ValueType.ARRAY, ValueType.STRING, n)
        + body
    )
    scores = (
        struct.pack("<Q", len(b"tokenizer.ggml.scores"))
        + b"tokenizer.ggml.scores"
        + struct.pack("<IIQ", ValueType.ARRAY, ValueType.FLOAT32, n)
        + np.zeros(n, np.float32).tobytes()
    )
    path = tmp_path / "vocab.gguf"
    path.write_bytes(_kv_header(0, [encode_kv("general.architecture", ValueType.STRING, "llama"), array, scores]))
    start = time.perf_counter()
    with GgufFile(path) as f:
        elapsed = time.perf_counter() - start
        assert f.kv["tokenizer.ggml.tokens"].count == n
        assert f.raw_kv("tokenizer.ggml.tokens") == array
    # gguf-py's GGUFReader takes about a minute on such a vocabulary; a plain walk of the lengths takes ~0.1 s
    assert elapsed < 3.0, elapsed


def _patched(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(src.read_bytes())
    raw[offset : offset + len(data)] = data
    dst.write_bytes(bytes(raw))
    return dst


def _first_tensor_info_offset(path: Path) -> int:
    """Byte offset of the first tensor info (its name length), found by walking the KV section with our reader."""
    with GgufFile(path) as f:
        return max(kv.end for kv in f.kv.values())


def _bad_files(model_dir: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    good = model_dir / "llama-f16.gguf"
    raw = good.read_bytes()
    info = _first_tensor_info_offset(good)
    name_len = struct.unpack_from("<Q", raw, info)[0]
    dims_at = info + 8 + name_len  # u32 n_dims, then ne
    n_dims = struct.unpack_from("<I", raw, dims_at)[0]
    type_at = dims_at + 4 + 8 * n_dims
    offset_at = type_at + 4
    cases = {
        "wrong magic": (_patched(good, tmp / "magic.gguf", 0, b"GGUX"), "not a GGUF file"),
        "version 1": (_patched(good, tmp / "v1.gguf", 4, struct.pack("<I", 1)), "version 1"),
        "too many tensors": (_patched(good, tmp / "nt.gguf", 8, struct.pack("<Q", 2**40)), "tensor count"),
        "too many kv": (_patched(good, tmp / "nkv.gguf", 16, struct.pack("<Q", 2**40)), "metadata count"),
        "zero dim": (_patched(good, tmp / "dim0.gguf", dims_at + 4, struct.pack("<Q", 0)), "impossible shape"),
        "too many dims": (_patched(good, tmp / "dims5.gguf", dims_at, struct.pack("<I", 5)), "n_dims 5"),
        "unknown type": (_patched(good, tmp / "type.gguf", type_at, struct.pack("<I", 77)), "unknown ggml type 77"),
        "offset past end": (
            _patched(good, tmp / "off.gguf", offset_at, struct.pack("<Q", len(raw) * 2)),
            "beyond the end",
        ),
        "misaligned offset": (_patched(good, tmp / "align.gguf", offset_at, struct.pack("<Q", 8)), "multiple of 32"),
        "huge string": (_patched(good, tmp / "str.gguf", 24, struct.pack("<Q", 2**50)), "truncated file"),
    }
    for cut in (10, 100, info + 3, len(raw) // 2, len(raw) - 1):
        p = tmp / f"trunc{cut}.gguf"
        p.write_bytes(raw[:cut])
        cases[f"truncated at {cut}"] = (p, "")
    return cases


def test_reader_refuses_malformed_files_with_one_clear_error(model_dir, tmp_path):
    for label, (path, expected) in _bad_files(model_dir, tmp_path).items():
        with pytest.raises(GgufFormatError) as err:
            GgufFile(path).close()
        assert expected in str(err.value), (label, str(err.value))


def test_cli_bad_input_exits_2_and_leaves_nothing(model_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cases = _bad_files(model_dir, tmp_path)
    for label, (path, _) in cases.items():
        target = out_dir / "model-q4.gguf"
        assert _run("quantize", str(path), str(target), "Q4_0", "--no-harden", "-q") == 2, label
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qcbguard-gguf: error:"), (label, err)
        assert list(out_dir.iterdir()) == [], label


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{good}", "{out}/x.gguf", "IQ2_XS"], "unknown output type"),
        (["{good}", "{out}/x.gguf", "Q2_K_S"], "importance matrix"),
        (["{good}", "{out}/missing/x.gguf", "Q8_0"], "does not exist"),
        (["{out}/absent.gguf", "{out}/x.gguf", "Q8_0"], "cannot open"),
        (["{good}", "{good}", "Q8_0"], "same file"),
        (["{good}", "{out}/x.gguf", "Q8_0", "--seed-file", "{out}/no-seed"], "seed file"),
        (["{good}", "{out}/x.gguf", "Q8_0", "--threads", "0"], "--threads"),
    ],
)
def test_cli_refusals(model_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "o"
    out.mkdir()
    good = model_dir / "llama-f16.gguf"
    before = good.read_bytes()
    args = [a.format(good=good, out=out) for a in argv]
    assert _run("quantize", *args, "-q") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert list(out.iterdir()) == []
    assert good.read_bytes() == before


def test_already_quantized_input_is_refused_unless_asked(model_dir, tmp_path, capsys):
    q8 = tmp_path / "q8.gguf"
    assert _run("quantize", str(model_dir / "llama-f16.gguf"), str(q8), "Q8_0", "--no-harden", "-q") == 0
    target = tmp_path / "q4.gguf"
    assert _run("quantize", str(q8), str(target), "Q4_0", "-q") == 2
    err = capsys.readouterr().err
    assert "already quantized (Q8_0)" in err and "--allow-requantize" in err and "weaker" in err
    assert not target.exists()
    assert _run("quantize", str(q8), str(target), "Q4_0", "-q", "--allow-requantize") == 0
    with GgufFile(target) as f:
        assert {t.type.name for t in f.tensors} >= {"Q4_0", "Q6_K"}


def test_a_failed_write_leaves_no_file(model_dir, tmp_path, monkeypatch, capsys):
    """A disk that fills up mid-write: one error line, exit 2, neither the target nor the temporary file remain."""
    from gguf_tools import writer

    calls = {"n": 0}
    real = writer.GgufWriter.write_rows

    def full_disk(self, data):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(writer.GgufWriter, "write_rows", full_disk)
    target = tmp_path / "x.gguf"
    assert _run("quantize", str(model_dir / "llama-f16.gguf"), str(target), "Q8_0", "--no-harden", "-q") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_non_finite_weights_are_refused(tmp_path, capsys):
    src = tmp_path / "nan.gguf"
    write_llama(src, LlamaShape(n_layer=2, n_vocab=280))
    with GgufFile(src) as f:
        info = f.by_name["blk.1.ffn_up.weight"]
        at = info.data_start + 2 * 37
    raw = bytearray(src.read_bytes())
    raw[at : at + 2] = np.array([np.inf], np.float16).tobytes()
    src.write_bytes(bytes(raw))
    target = tmp_path / "x.gguf"
    assert _run("quantize", str(src), str(target), "Q4_K_M", "-q") == 2
    err = capsys.readouterr().err
    assert "blk.1.ffn_up.weight" in err and "inf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.gguf"]


# -- mixtures ----------------------------------------------------------------------------------------------------


def test_use_more_bits_matches_the_c_rule():
    # i < n/8 || i >= 7*n/8 || (i - n/8) % 3 == 2, in C integer arithmetic (truncating division and remainder)
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(3) if use_more_bits(i, 3)] == [2]


def test_output_order_is_by_layer_then_name():
    names = ["blk.10.a.weight", "output.weight", "blk.2.b.weight", "blk.2.a.weight", "token_embd.weight"]
    assert output_order(names) == [
        "output.weight",
        "token_embd.weight",
        "blk.2.a.weight",
        "blk.2.b.weight",
        "blk.10.a.weight",
    ]


def _plan(mix: str, model: ModelInfo, names_ne: list[tuple[str, tuple[int, ...]]]) -> dict[str, str]:
    from gguf_tools.constants import ggml_type

    tensors = [(n, ne, ggml_type("F16")) for n, ne in names_ne]
    return {p.name: p.target.name for p in plan_types(tensors, mixture(mix), model)}


def test_mixture_rules_on_a_synthetic_model():
    model = ModelInfo(arch="llama", n_layer=8, n_head=32, n_head_kv=8)
    names = [("output.weight", (4096, 32000)), ("token_embd.weight", (4096, 32000))]
    for i in range(8):
        names += [(f"blk.{i}.attn_v.weight", (4096, 1024)), (f"blk.{i}.ffn_down.weight", (1088, 4096))]
        names += [(f"blk.{i}.attn_output.weight", (4096, 4096)), (f"blk.{i}.attn_norm.weight", (4096,))]
    q4km = _plan("Q4_K_M", model, names)
    assert q4km["output.weight"] == "Q6_K" and q4km["token_embd.weight"] == "Q4_K"
    more_bits = ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]  # layers 0, 3, 6, 7
    assert [q4km[f"blk.{i}.attn_v.weight"] for i in range(8)] == more_bits
    # ffn_down rows of 1088 are not a multiple of 256: Q6_K -> Q8_0, Q4_K -> Q5_0
    fallen = [{"Q6_K": "Q8_0", "Q4_K": "Q5_0"}[t] for t in more_bits]
    assert [q4km[f"blk.{i}.ffn_down.weight"] for i in range(8)] == fallen
    assert q4km["blk.0.attn_norm.weight"] == "F16"  # 1-D: kept as it is
    q2k = _plan("Q2_K", model, names)
    assert q2k["blk.0.attn_v.weight"] == "Q4_K"  # n_gqa = 4
    assert q2k["blk.0.attn_output.weight"] == "Q3_K"
    assert _plan("Q2_K", ModelInfo("llama", 8, 32, 32), names)["blk.0.attn_v.weight"] == "Q3_K"
    assert _plan("Q3_K_M", model, names)["blk.1.attn_v.weight"] == "Q5_K"
    assert _plan("Q3_K_M", model, names)["blk.2.attn_v.weight"] == "Q4_K"
    assert _plan("Q8_0", model, names)["output.weight"] == "Q8_0"
    assert _plan("Q4_0", model, names)["output.weight"] == "Q6_K"
    # tied embeddings: token_embd takes the output rule
    tied = [n for n in names if n[0] != "output.weight"]
    assert _plan("Q5_K_M", model, tied)["token_embd.weight"] == "Q6_K"
    # eight experts: attn_v to Q8_0
    moe = ModelInfo(arch="llama", n_layer=8, n_head=32, n_head_kv=8, n_expert=8)
    assert _plan("Q4_K_M", moe, names)["blk.3.attn_v.weight"] == "Q8_0"


def test_every_mixture_has_a_registry_format():
    from gguf_tools.constants import ggml_type
    from gguf_tools.tensors import registry_format

    for m in MIXTURES.values():
        assert registry_format(ggml_type(m.default)).type_size == ggml_type(m.default).type_size


# -- hardened output (our side only; llama.cpp's view is in test_gguf_tool_llama.py) -------------------------------


def test_hardened_output_records_the_seed_fingerprint_never_the_seed(model_dir, tmp_path):
    from qcbguard_kernels.hardening import DeploymentSeed

    seed_file = tmp_path / "seed"
    seed = DeploymentSeed.fresh()
    seed.write(seed_file)
    out = tmp_path / "h.gguf"
    report = tmp_path / "r.json"
    metrics = tmp_path / "m.prom"
    argv = ["quantize", str(model_dir / "odd.gguf"), str(out), "Q4_K_M", "--seed-file", str(seed_file), "-q"]
    assert _run(*argv, "--report", str(report), "--metrics-file", str(metrics)) == 0
    secret = seed_file.read_text().strip()
    for p in (out, report, metrics):
        assert secret.encode() not in p.read_bytes()
        assert bytes.fromhex(secret) not in p.read_bytes()
    with GgufFile(out) as f:
        assert f.value("qcbguard.seed_fingerprint") == seed.fingerprint
        assert f.value("qcbguard.algorithm").startswith("qcbguard-sr")
        assert list(f.kv)[-5:-3] == ["general.quantization_version", "general.file_type"]
    again = tmp_path / "h2.gguf"
    argv[2] = str(again)
    assert _run(*argv) == 0
    assert again.read_bytes() == out.read_bytes()  # same seed, same bytes
    import json

    rep = json.loads(report.read_text())
    assert rep["seed_fingerprint"] == seed.fingerprint and rep["hardened"]
    assert rep["cpu_kernels"] == "native"  # which implementation ran is on record (the test install builds it)
    by_name = {t["name"]: t for t in rep["tensors"]}
    assert by_name["blk.0.ffn_down.weight"]["type"] == "Q5_0"
    assert by_name["blk.0.ffn_down.weight"]["fallback_from"] == "Q4_K"
    assert by_name["blk.0.ffn_down.weight"]["codes_changed"] > 0
    assert by_name["blk.0.odd_rows.weight"]["type"] == "F16"
    text = metrics.read_text()
    assert "qcbguard_codes_changed_total" in text and f'seed_fingerprint="{seed.fingerprint}"' in text


def test_row_chunks_change_no_byte(model_dir, tmp_path, monkeypatch):
    from gguf_tools import quantize

    seed_file = tmp_path / "seed"
    from qcbguard_kernels.hardening import DeploymentSeed

    DeploymentSeed.fresh().write(seed_file)
    whole = tmp_path / "whole.gguf"
    argv = ["quantize", str(model_dir / "llama-f16.gguf"), str(whole), "Q5_K_M", "--seed-file", str(seed_file), "-q"]
    assert _run(*argv, "--report", str(tmp_path / "whole.json")) == 0
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", 256 * 100)  # 100 rows of 256 (80 of 320) at a time
    chunked = tmp_path / "chunked.gguf"
    argv[2] = str(chunked)
    assert _run(*argv, "--report", str(tmp_path / "chunked.json")) == 0
    assert chunked.read_bytes() == whole.read_bytes()
    # the detector screens each tensor once, on the same sample rows, whatever the chunk size
    fields = ("name", "detector_distance", "suspicious", "codes_changed", "elements")
    reports = [json.loads((tmp_path / f"{run}.json").read_text())["tensors"] for run in ("whole", "chunked")]
    whole_fields, chunked_fields = ([{k: t.get(k) for k in fields} for t in r] for r in reports)
    assert whole_fields == chunked_fields
    assert any(t["detector_distance"] is not None for t in whole_fields)


def test_detector_sample_flag_sets_what_the_detector_reads(model_dir, tmp_path):
    """--detector-sample reaches the GGUF screen: token_embd (300 x 256) is read whole by default and as one run of
    128 rows under a budget of 2**14 weights; the report says how many weights the detector read."""
    src = model_dir / "llama-f16.gguf"
    sampled = {}
    for budget in (None, 1 << 14):
        report, out = tmp_path / f"{budget}.json", tmp_path / f"{budget}.gguf"
        extra = [] if budget is None else ["--detector-sample", str(budget)]
        assert _run("quantize", str(src), str(out), "Q8_0", "-q", "--report", str(report), *extra) == 0
        tensors = {t["name"]: t for t in json.loads(report.read_text())["tensors"]}
        sampled[budget] = tensors["token_embd.weight"]["detector_sampled"]
    assert sampled == {None: 300 * 256, 1 << 14: 128 * 256}
    assert _run("quantize", str(src), str(tmp_path / "bad.gguf"), "Q8_0", "-q", "--detector-sample", "100") == 2
    assert not (tmp_path / "bad.gguf").exists()


def test_rows_stay_on_the_cpu_when_the_environment_asks_for_the_reference(monkeypatch):
    from gguf_tools.quantize import _device

    monkeypatch.setenv("QCBGUARD_BACKEND", "reference")
    assert _device("auto").type == "cpu"  # with a GPU present too: the reference path quantizes on the CPU
    assert _device("reference").type == "cpu"


def test_threads_option_sets_torch_threads(model_dir, tmp_path):
    before = torch.get_num_threads()
    try:
        out = tmp_path / "t.gguf"
        assert (
            _run("quantize", str(model_dir / "odd.gguf"), str(out), "Q8_0", "--no-harden", "--threads", "1", "-q") == 0
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_dequantize_writes_the_decoded_values_as_f16(model_dir, tmp_path):
    from gguf_tools.tensors import read_rows

    q = tmp_path / "q5_1.gguf"
    assert _run("quantize", str(model_dir / "llama-f16.gguf"), str(q), "Q5_1", "--no-harden", "-q") == 0
    f16 = tmp_path / "f16.gguf"
    assert _run("dequantize", str(q), str(f16)) == 0
    with GgufFile(q) as a, GgufFile(f16) as b:
        assert b.value("general.file_type") == 1
        for t in a.tensors:
            u = b.by_name[t.name]
            assert u.type.name == ("F16" if t.type.quantized else t.type.name)
            decoded = read_rows(a, t, 0, t.n_rows)
            assert torch.equal(
                read_rows(b, u, 0, u.n_rows).float(), decoded.half().float() if t.type.quantized else decoded.float()
            )


@pytest.mark.parametrize("harden", [True, False])
def test_fused_kernels_write_the_reference_bytes(tmp_path, monkeypatch, harden):
    """--backend triton (what auto takes on a GPU) writes the file --backend reference writes, hardened with the same
    seed or plain; run on a CPU under TRITON_INTERPRET=1, on a model small enough for the interpreter."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from qcbguard_kernels.hardening import DeploymentSeed

    src = write_llama(tmp_path / "tiny.gguf", LlamaShape(n_layer=1, n_vocab=64, n_embd=64, n_ff=96, n_head=4))
    seed_file = tmp_path / "seed"
    DeploymentSeed.fresh().write(seed_file)
    reports = {}
    for backend in ("reference", "triton"):
        out, report = tmp_path / f"{backend}.gguf", tmp_path / f"{backend}.json"
        argv = ["quantize", str(src), str(out), "Q4_0", "--backend", backend, "--report", str(report), "-q"]
        argv += ["--seed-file", str(seed_file)] if harden else ["--no-harden"]
        assert _run(*argv) == 0
        reports[backend] = json.loads(report.read_text())
    assert (tmp_path / "triton.gguf").read_bytes() == (tmp_path / "reference.gguf").read_bytes()
    if harden:
        changed = {b: [t.get("codes_changed") for t in r["tensors"]] for b, r in reports.items()}
        assert changed["triton"] == changed["reference"] and sum(c or 0 for c in changed["triton"]) > 0
