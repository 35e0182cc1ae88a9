"""The dispatch: which backend runs, what it refuses, and that qcbguard_kernels works without Triton installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from qcbguard_kernels import NonFiniteInputError, UnsupportedInputError, format_names, get_format
from qcbguard_kernels.dispatch import harden_fused, pick_backend, quantize_packed, resolve_backend
from qcbguard_kernels.hardening import DeploymentSeed, HardeningConfig, SuspiciousTensorError, harden_tensor
from qcbguard_kernels.triton import TRITON_FAMILIES, supports
from tests.attacks import box_attack, clean_weights
from tests.inputs import fresh_seed, standard_cases

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _x(rows: int = 2, cols: int = 64) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02


def test_cpu_tensors_take_the_reference_by_default(monkeypatch):
    monkeypatch.delenv("QCBGUARD_BACKEND", raising=False)
    assert pick_backend(_x(), get_format("q4_k")) == "reference"
    assert pick_backend(_x(), get_format("q4_0")) == "native"  # a fused native pass: auto takes it on a CPU
    monkeypatch.setenv("QCBGUARD_BACKEND", "reference")
    assert pick_backend(_x(), get_format("q4_0")) == "reference"


def test_unknown_backends_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        pick_backend(_x(), get_format("q4_0"), "cuda")
    monkeypatch.setenv("QCBGUARD_BACKEND", "fast")
    with pytest.raises(ValueError, match="QCBGUARD_BACKEND"):
        pick_backend(_x(), get_format("q4_0"))


def test_auto_resolves_through_the_environment(monkeypatch):
    """The rule callers that place tensors before quantizing (the GGUF tool's GPU choice) share with pick_backend."""
    monkeypatch.delenv("QCBGUARD_BACKEND", raising=False)
    assert resolve_backend() == "auto" and resolve_backend("reference") == "reference"
    monkeypatch.setenv("QCBGUARD_BACKEND", "reference")
    assert resolve_backend() == "reference" and resolve_backend("triton") == "triton"


def test_every_format_has_a_kernel():
    assert set(TRITON_FAMILIES) == {"absmax-int", "codebook-4bit", "fp8-mx", "gguf-legacy", "gguf-kquant"}
    assert all(supports(get_format(name)) for name in format_names())


def test_forced_triton_refuses_what_it_cannot_run(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedInputError, match="TRITON_INTERPRET=1"):
            pick_backend(_x(), get_format("q8_0"), "triton")


def test_a_family_without_a_kernel_is_refused_when_forced():
    """A format of a family no kernel covers (a stand-in: every registered family has one today)."""
    pytest.importorskip("triton")
    q8 = get_format("q8_0")

    class Other(type(q8)):
        family = "other"

    other = Other("q8_0_other", ggml_type=8, bits=8, affine=False)
    assert not supports(other)
    with pytest.raises(UnsupportedInputError, match="no Triton kernel covers q8_0_other"):
        pick_backend(_x(), other, "triton")
    assert pick_backend(_x(), other) == "native"  # auto on a CPU: the legacy family's native pass, no kernel


def test_cuda_tensors_take_triton_by_default(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    monkeypatch.delenv("QCBGUARD_BACKEND", raising=False)
    assert pick_backend(_x().cuda(), get_format("q4_k")) == "triton"


def test_triton_path_validates_before_launching(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = _x()
    x[1, 3] = float("nan")
    with pytest.raises(NonFiniteInputError):
        quantize_packed(x, get_format("q8_0"), "w", backend="triton")
    with pytest.raises(UnsupportedInputError, match="not a multiple of 32"):
        quantize_packed(_x(2, 40), get_format("q8_0"), "w", backend="triton")
    with pytest.raises(ValueError, match="row_offset"):
        quantize_packed(_x(), get_format("q8_0"), "w", row_offset=-1)
    with pytest.raises(ValueError, match="row_offset"):  # the native pass (auto on a CPU) checks the same
        harden_fused(_x(), get_format("q8_0"), "w", DeploymentSeed(bytes(32)), col_offset=-1)


FUSED_CASES = [("fp8_per_channel", (5, 48)), ("torchao_int8", (3, 40)), ("mxfp4", (4, 64))]


@pytest.mark.parametrize(("fmt_name", "shape"), FUSED_CASES)
def test_harden_fused_is_harden_tensor(monkeypatch, fmt_name, shape):
    """The fused path (what the vLLM hook takes for weights on a GPU) gives harden_tensor's bytes and report, and
    round-to-nearest beside them; detect-only returns round-to-nearest; refuse stops on a flagged tensor."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fmt, seed = get_format(fmt_name), DeploymentSeed(bytes(range(32)))
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16()
    reference, ref_report = harden_tensor(x, fmt, "w", seed, row_offset=7, col_offset=64)
    nearest, fused, report = harden_fused(x, fmt, "w", seed, row_offset=7, col_offset=64, backend="triton")
    for key, t in reference.tensors.items():
        assert torch.equal(fused.tensors[key].view(torch.uint8), t.view(torch.uint8)), key
        assert torch.equal(nearest.tensors[key].view(torch.uint8), fmt.quantize(x).tensors[key].view(torch.uint8))
    same = ("codes_changed", "mean_change_steps", "max_change_steps", "detector_distance", "steerable", "suspicious")
    assert {k: getattr(report, k) for k in same} == {k: getattr(ref_report, k) for k in same}
    assert report.codes_changed > 0
    detect = HardeningConfig(mode="detect-only")
    nearest, kept, report = harden_fused(x, fmt, "w", seed, detect, backend="triton")
    assert kept is nearest and report.codes_changed == 0


@pytest.mark.parametrize(
    "fmt_name", ["fp8_per_channel", "fp8_per_tensor", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q3_k", "q6_k"]
)
def test_fused_native_pass_is_harden_tensor(monkeypatch, fmt_name):
    """On a CPU, auto takes the fused native pass for vLLM's per-channel and per-tensor fp8 (what the vLLM hook runs
    there) and GGUF's legacy types, Q3_K and Q6_K (the GGUF tool): harden_tensor's bytes and change counts,
    round-to-nearest beside them, at an offset, on awkward inputs, over one and two threads (600 rows), and a zero and
    a subnormal-tiny tensor (fp8 per-tensor: an infinite inverse scale; legacy: 1/d overflowing, scales flushed to
    half subnormals; k-quants: all-zero super-blocks)."""
    monkeypatch.delenv("QCBGUARD_BACKEND", raising=False)
    fmt, seed = get_format(fmt_name), DeploymentSeed(bytes(range(32)))
    g = torch.Generator().manual_seed(fresh_seed())
    cases = standard_cases(6, 512, 256, int(torch.randint(2**31 - 1, (1,), generator=g)))
    cases |= {"rows": torch.randn(600, 1024, generator=g) * 0.02, "zeros": torch.zeros(3, 256)}
    cases["tiny"] = torch.full((3, 256), 1e-37).index_fill_(1, torch.tensor([5]), 0.0)
    # rows whose largest magnitude is negative, an all -0.0 row and a mixed-zero row (the per-channel scale the
    # fused pass computes from each row's bits)
    signed = torch.randn(4, 256, generator=g).abs_() * 0.02
    signed[0, 9], signed[1] = -1.0, -0.0
    signed[2, ::2] = -0.0
    signed[2, 1::2] = 0.0
    cases["signed"] = signed
    changed = {}
    for case, x in cases.items():
        assert pick_backend(x, fmt) == "native", case
        reference, ref_report = harden_tensor(x, fmt, "w", seed, row_offset=7, col_offset=64)
        nearest, fused, report = harden_fused(x, fmt, "w", seed, row_offset=7, col_offset=64)
        for key, t in reference.tensors.items():
            assert torch.equal(fused.tensors[key].view(torch.uint8), t.view(torch.uint8)), f"{case} {key}"
            plain = fmt.quantize(x).tensors[key].view(torch.uint8)
            assert torch.equal(nearest.tensors[key].view(torch.uint8), plain), f"{case} {key}"
            again = quantize_packed(x, fmt, "w", seed, row_offset=7, col_offset=64).tensors[key]
            assert torch.equal(again.view(torch.uint8), t.view(torch.uint8)), f"{case} {key}"
        same = ("codes_changed", "mean_change_steps", "max_change_steps", "detector_distance", "suspicious")
        assert {k: getattr(report, k) for k in same} == {k: getattr(ref_report, k) for k in same}, case
        changed[case] = report.codes_changed
    assert changed["rows"] > 0 and changed["normal"] > 0
    nearest, kept, report = harden_fused(x, fmt, "w", seed, HardeningConfig(mode="detect-only"))
    assert kept is nearest and report.codes_changed == 0
    monkeypatch.setenv("QCBGUARD_NATIVE", "0")
    assert pick_backend(x, fmt) == "reference"


@pytest.mark.parametrize(
    ("fmt_name", "cols"), [("q4_0", 32 * 37), ("q5_1", 32 * 19), ("q8_0", 32 * 41), ("q6_k", 1280)]
)
def test_fused_native_pass_draws_at_any_column_offset(monkeypatch, fmt_name, cols):
    """The fused passes draw a row in windows (legacy: 8 blocks; grid_draw: 512 uniforms) at the row's global
    columns: offsets off Philox's 4-column groups and across window edges, up to the last 32-bit column, give
    harden_tensor's bytes and change counts."""
    monkeypatch.delenv("QCBGUARD_BACKEND", raising=False)
    fmt, seed = get_format(fmt_name), DeploymentSeed(bytes(range(32)))
    x = (torch.randn(9, cols, generator=torch.Generator().manual_seed(fresh_seed())) * 0.02).half()
    for offset in (1, 2, 3, 5, 33, 511, 513, 2**32 - cols - 7):
        reference, ref_report = harden_tensor(x, fmt, "w", seed, row_offset=3, col_offset=offset)
        _, fused, report = harden_fused(x, fmt, "w", seed, row_offset=3, col_offset=offset)
        for key, t in reference.tensors.items():
            assert torch.equal(fused.tensors[key].view(torch.uint8), t.view(torch.uint8)), (offset, key)
        assert report.codes_changed == ref_report.codes_changed, offset


def test_formats_without_a_fused_native_pass_keep_the_reference(monkeypatch):
    monkeypatch.delenv("QCBGUARD_BACKEND", raising=False)
    for name in ("fp8_per_block", "q4_k", "q5_k", "q2_k", "nf4", "int8_per_channel"):
        assert pick_backend(_x(4, 256), get_format(name)) == "reference", name
    assert pick_backend(_x(), get_format("fp8_per_channel"), "reference") == "reference"


@pytest.mark.parametrize("fmt_name", ["fp8_per_channel", "fp8_per_tensor", "q8_0", "q4_1", "q5_0", "q3_k", "q6_k"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_native_pass_reads_16_bit_weights(monkeypatch, fmt_name, dtype):
    """The fused passes widen bfloat16 and float16 rows themselves (no float32 copy): the bytes, scales and counts are
    harden_tensor's on the same 16-bit tensor, over the dtype's awkward values (float16 subnormals down to 2**-24,
    its largest finite 65504, signed zeros, a zero row) and 600 normal rows over two threads."""
    monkeypatch.delenv("QCBGUARD_BACKEND", raising=False)
    fmt, seed = get_format(fmt_name), DeploymentSeed(bytes(range(32)))
    g = torch.Generator().manual_seed(fresh_seed())
    tiny = torch.finfo(dtype).tiny
    awkward = torch.randn(8, 256, generator=g) * 0.02
    awkward[0] = torch.arange(256) * 2.0**-24 * (1 if dtype == torch.float16 else 2.0**-100)  # subnormals
    awkward[1, ::3], awkward[1, 1::3] = -0.0, 0.0
    awkward[2] = 0.0
    awkward[3, 5], awkward[4, 7] = torch.finfo(dtype).max, -torch.finfo(dtype).max
    awkward[5] *= tiny * 1e3
    for case, x in {
        "awkward": awkward.to(dtype),
        "rows": (torch.randn(600, 512, generator=g) * 0.02).to(dtype),
    }.items():
        assert torch.isfinite(x).all() and pick_backend(x, fmt) == "native", case
        reference, ref_report = harden_tensor(x, fmt, "w", seed, row_offset=3, col_offset=32)
        nearest, fused, report = harden_fused(x, fmt, "w", seed, row_offset=3, col_offset=32)
        plain = fmt.quantize(x)
        for key, t in reference.tensors.items():
            assert torch.equal(fused.tensors[key].view(torch.uint8), t.view(torch.uint8)), f"{case} {key}"
            assert torch.equal(nearest.tensors[key].view(torch.uint8), plain.tensors[key].view(torch.uint8)), case
        assert (report.codes_changed, report.detector_distance) == (
            ref_report.codes_changed,
            ref_report.detector_distance,
        )


def test_harden_fused_refuses_a_flagged_tensor_before_launching(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    attacked, _ = box_attack(clean_weights(3), "fp8_per_channel", margin=0.1, block=256, seed=3)
    refuse = HardeningConfig(on_suspicious="refuse")
    with pytest.raises(SuspiciousTensorError, match="looks tampered for fp8_per_channel"):
        harden_fused(attacked, get_format("fp8_per_channel"), "w", DeploymentSeed(bytes(32)), refuse, backend="triton")


def test_qcbguard_kernels_imports_and_quantizes_without_triton():
    """With `triton` unimportable, the package, the dispatch and the reference path all work; forcing Triton fails
    with a message that says why."""
    script = textwrap.dedent(
        """
        import sys
        class _NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ModuleNotFoundError("No module named 'triton'")
                return None
        sys.meta_path.insert(0, _NoTriton())
        import torch
        from qcbguard_kernels import get_format, UnsupportedInputError
        from qcbguard_kernels.dispatch import quantize_packed
        from qcbguard_kernels.hardening import DeploymentSeed
        x = torch.randn(2, 64)
        q = quantize_packed(x, get_format("q4_0"), "w", DeploymentSeed.fresh())
        assert q.tensors["blocks"].shape == (2, 36)
        try:
            quantize_packed(x, get_format("q4_0"), "w", backend="triton")
        except UnsupportedInputError as err:
            assert "not installed" in str(err)
        else:
            raise SystemExit("forced triton without triton did not refuse")
        assert "triton" not in sys.modules
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_a_failing_kernel_stops_with_the_way_around(monkeypatch):
    pytest.importorskip("triton")
    import qcbguard_kernels.dispatch as dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(dispatch, "quantize_triton", broken)
    with pytest.raises(dispatch.FusedKernelError, match=r"fused fp8-mx kernel failed .*illegal memory.*'reference'"):
        harden_fused(_x(4, 64), get_format("fp8_per_channel"), "w", DeploymentSeed(bytes(32)), backend="triton")
