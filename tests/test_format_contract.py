"""The contract every registered format keeps, whatever its family: rounding cells, packing, refusals, registry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qcbguard_kernels import NonFiniteInputError, UnsupportedInputError, format_names, get_format
from qcbguard_kernels.errors import check_finite
from qcbguard_kernels.formats import register_format
from tests.inputs import fresh_seed, standard_cases

SEED = fresh_seed()
ROWS, COLS = 3, 512  # fits every block structure: 32, 64, 128 groups, 256 super-blocks
CASES = ["normal", "heavy_tailed", "bf16_rounded", "zero_blocks", "negative_zero_blocks", "constant_blocks"]


def test_every_planned_format_is_registered():
    expected = {
        "bnb_int8", "nf4", "nf4_dq", "fp4",
        "fp8_per_tensor", "fp8_per_channel", "fp8_per_block", "mxfp8", "mxfp4",
        "int8_per_channel", "torchao_int8", "torchao_int4",
        "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
    }  # fmt: skip
    assert expected <= set(format_names())


@pytest.mark.parametrize("name", format_names())
def test_rounding_cells_bracket_the_weight(name):
    fmt = get_format(name)
    cases = standard_cases(ROWS, COLS, 256, SEED)
    for case in CASES:
        x = cases[case]
        enc = fmt.encode(x, case)
        c = enc.cells
        assert c.lower.shape == c.upper.shape == c.position.shape == c.nearest.shape == x.shape
        assert c.lower.dtype == c.upper.dtype == c.nearest.dtype == torch.int32
        width = c.upper - c.lower
        assert bool(((width == 0) | (width == 1)).all()), f"{name} {case}: cells wider than one code"
        assert bool(((c.nearest == c.lower) | (c.nearest == c.upper)).all()), f"{name} {case}: nearest outside cell"
        assert bool(((c.position >= 0) & (c.position <= 1)).all()), f"{name} {case}: position outside [0, 1]"
        assert bool((c.position[width == 0] == 0).all())
        if name == "nf4_dq":
            # Double quantization stores each absmax with bnb's 8-bit dynamic map (relative error of several percent
            # on small blocks), so its code values are not the grid the rounding was decided on. The decisions
            # themselves must be NF4's, exactly; NF4's cells are checked against values below.
            plain = get_format("nf4").encode(x, case).cells
            assert all(torch.equal(a, b) for a, b in zip(vars(c).values(), vars(plain).values(), strict=True)), case
            continue
        lo, hi = fmt.code_values(enc, c.lower), fmt.code_values(enc, c.upper)
        # Cells are computed with the float32 scale; code values use the stored one (fp16 in GGUF, e8m0 exact, ...):
        # allow a tenth of a step for the scale's storage rounding.
        rebuilt = lo + c.position * (hi - lo)
        step = (hi - lo).abs()
        tol = 0.1 * step + 2e-3 * x.abs() + 1e-30
        bad = ((rebuilt - x).abs() > tol) & (width == 1)
        assert not bool(bad.any()), f"{name} {case}: {int(bad.sum())} weights not where their cell says (seed {SEED})"


@pytest.mark.parametrize("name", format_names())
def test_packing_any_cell_code_round_trips(name):
    fmt = get_format(name)
    x = standard_cases(ROWS, COLS, 256, SEED)["heavy_tailed"]
    enc = fmt.encode(x, "w")
    nearest = fmt.pack(enc)
    again = fmt.quantize(x, "w")
    for key, t in nearest.tensors.items():
        assert torch.equal(t, again.tensors[key]), f"{name}: pack(encode(x)) != quantize(x) in {key}"
    assert torch.equal(fmt.dequantize(nearest), fmt.code_values(enc, enc.cells.nearest)), name
    flipped = fmt.pack(enc, enc.cells.upper)
    assert torch.equal(fmt.dequantize(flipped), fmt.code_values(enc, enc.cells.upper)), name
    if bool(enc.cells.steerable.any()):
        assert not torch.equal(fmt.dequantize(flipped), fmt.dequantize(nearest)), f"{name}: upper codes had no effect"


@pytest.mark.parametrize("name", format_names())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_refused_with_tensor_and_index(name, bad):
    x = torch.randn(ROWS, COLS) * 0.02
    x[2, 300] = bad
    x[2, 400] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight'.*\(2, 300\)"):
        get_format(name).quantize(x, "model.layers.0.mlp.up_proj.weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_value_anywhere_is_found(dtype, bad):
    """The finiteness check's fast path (one min/max pass) misses no lone NaN or infinity, wherever it sits in a
    tensor of odd size (vector bodies and tails alike), and still names the first bad index."""
    g = torch.Generator().manual_seed(fresh_seed())
    for numel in (1, 31, 100_003):
        for at in {0, numel // 2, numel - 1, int(torch.randint(numel, (1,), generator=g))}:
            x = (torch.randn(numel, generator=g) * 0.02).to(dtype)
            x[at] = bad
            with pytest.raises(NonFiniteInputError, match=rf"\({at},\)"):
                check_finite(x, "w")


@pytest.mark.parametrize("name", format_names())
@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.float8_e4m3fn])
def test_unsupported_dtype_is_refused(name, dtype):
    with pytest.raises(UnsupportedInputError, match="dtype"):
        get_format(name).quantize(torch.zeros(ROWS, COLS).to(dtype), "w")


def test_unknown_format_fails_closed_naming_the_supported_ones():
    with pytest.raises(UnsupportedInputError, match=r"unknown quantization format 'q4_k_m'.*nf4"):
        get_format("q4_k_m")


def test_a_format_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="already registered"):
        register_format(get_format("nf4"))


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_kernels_import_without_triton_vllm_gguf_or_prometheus(tmp_path):
    blocked = ["triton", "vllm", "gguf", "prometheus_client"]
    code = (
        "import sys\n"
        f"for m in {blocked!r}: sys.modules[m] = None  # any import of them now raises ImportError\n"
        "import qcbguard_kernels, qcbguard_kernels.formats\n"
        "print(len(qcbguard_kernels.format_names()))\n"
    )
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) >= 22


def test_pypi_kernels_and_ours_do_not_shadow_each_other(tmp_path):
    """Hugging Face's `kernels` (installed by the test extra) and our `qcbguard_kernels` import side by side."""
    code = (
        "import kernels, qcbguard_kernels\n"
        "assert hasattr(kernels, 'get_kernel'), kernels.__file__\n"
        "assert qcbguard_kernels.get_format('nf4').name == 'nf4'\n"
        "print(kernels.__file__)\n"
    )
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "site-packages" in done.stdout
