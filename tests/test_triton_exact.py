"""The fused Triton kernels against the plain-torch references, byte for byte, hardening off and on.

Runs under TRITON_INTERPRET=1 on a CPU (CI) and on CUDA when a GPU is present: the same awkward inputs (zeros, -0.0,
constant and subnormal blocks, float32 extremes, exact ties), in float32, bfloat16 and float16, with shapes that are
not powers of two. Packed codes and scales compare exactly (rtol = atol = 0); a hardened comparison uses a fixed
deployment seed and nonzero shard offsets, so the Philox counters are checked too.
"""

from __future__ import annotations

import pytest
import torch

from tests.inputs import standard_cases
from tests.triton_checks import DEVICE, DTYPES, awkward_input, same_packed

pytest.importorskip("triton")

from qcbguard_kernels import get_format
from qcbguard_kernels.dispatch import quantize_packed
from qcbguard_kernels.hardening import DeploymentSeed

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inside the interpreter: 0/0, x/0

SEED = 20261123
DEPLOYMENT = DeploymentSeed(bytes(range(7, 39)))

# format -> (rows, cols) shapes, the block length the cases are built on, and qmax for integer tie rows
CASES: dict[str, tuple[list[tuple[int, int]], int, int | None]] = {
    "bnb_int8": ([(2, 17)], 1, None),
    "int8_per_channel": ([(3, 96)], 32, 127),
    "torchao_int8": ([(1, 33)], 1, None),
    "torchao_int4": ([(1, 256)], 128, 15),
    "nf4": ([(3, 64), (17, 5)], 1, None),
    "fp4": ([(2, 96)], 32, None),
    "nf4_dq": ([(5, 70)], 70, None),
    "fp8_per_channel": ([(3, 40)], 40, None),
    "fp8_per_block": ([(11, 136)], 8, None),  # 132 x 136: four 128x128 blocks, three of them partial
    "mxfp8": ([(3, 64)], 32, None),
    "mxfp4": ([(3, 64)], 32, None),
    "q8_0": ([(3, 96)], 32, 127),
    "q4_0": ([(2, 64)], 32, None),
    "q4_1": ([(1, 96)], 32, None),
    "q5_0": ([(2, 32)], 32, None),
    "q5_1": ([(1, 64)], 32, None),
}


def _check(name: str, x: torch.Tensor, what: str) -> None:
    fmt = get_format(name)
    for seed, offsets in ((None, (0, 0)), (DEPLOYMENT, (5, 3 * 32))):
        kw = {"row_offset": offsets[0], "col_offset": offsets[1]}
        ref = quantize_packed(x, fmt, "layers.0.w", seed, backend="reference", **kw)
        ours = quantize_packed(x.to(DEVICE), fmt, "layers.0.w", seed, backend="triton", **kw)
        same_packed(ours, ref, f"{what} hardened={seed is not None}")


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name):
    shapes, block, qmax = CASES[name]
    for rows, cols in shapes:
        for dtype in DTYPES:
            x = awkward_input(rows, cols, block, dtype, SEED, qmax)
            _check(name, x, f"{name} {rows}x{cols} {dtype}")


def test_fp8_per_tensor_matches_reference_case_by_case():
    """One scale for the whole tensor: each awkward case is its own tensor (stacked, the largest would rule)."""
    for dtype in (torch.float32, torch.bfloat16):
        for case, x in standard_cases(2, 48, 16, SEED).items():
            if bool(torch.isfinite(x.to(dtype)).all()):
                _check("fp8_per_tensor", x.to(dtype), f"fp8_per_tensor {case} {dtype}")


def test_mxfp8_scale_exponent_next_to_powers_of_two():
    """float32 blocks whose amax / 448 lies a few ulp above a power of two: torch's float32 log2 rounds those to the
    integer, and the kernel's bit-level ceil(log2) must say the same (and differ where the rounding does not reach)."""
    k = torch.arange(-30, 10, dtype=torch.float64).repeat_interleave(8)
    j = torch.arange(8, dtype=torch.float64).repeat(40)
    amax = (448.0 * torch.pow(2.0, k) * (1 + j * 2.0**-23)).float()
    g = torch.Generator().manual_seed(SEED)
    x = (torch.rand(amax.numel(), 32, generator=g) * 2 - 1) * amax.unsqueeze(1)
    x[:, 5] = amax
    _check("mxfp8", x.reshape(20, 512), "mxfp8 near powers of two")


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q4_1", "q5_1"])
def test_gguf_legacy_ties_match_reference(name):
    """Blocks whose scale is 1/8 exactly, every other element on a k + 0.5 grid point: ggml's truncating casts decide
    each tie, and the kernel must decide it the same way (hardened: a tie sits at position 0.5)."""
    fmt = get_format(name)
    g = torch.Generator().manual_seed(SEED)
    k = torch.randint(0, fmt.qmax, (4, 64), generator=g).float()
    if fmt.affine:
        x = (k + 0.5) / 8
        x.view(4, -1, 32)[..., 0] = 0.0
        x.view(4, -1, 32)[..., 1] = fmt.qmax / 8
    else:
        half = 1 << (fmt.bits - 1)
        x = (k - half + 0.5) / 8
        x.view(4, -1, 32)[..., 3] = -half / 8
    _check(name, x, f"{name} ties")


@pytest.mark.parametrize("name", ["q3_k", "q6_k"])
def test_symmetric_k_quants_match_reference(name):
    """Q6_K's scale search (19 candidate scales, C-order sums), Q3_K's coordinate descent, the scale quantization and
    the bit planes, on every awkward case stacked into one 256-column tensor per dtype (the interpreter runs one
    super-block per program: kept small)."""
    # Q3_K's 80 sequential descent steps are slow in the interpreter: float32 only there (bf16/fp16 checked by hand)
    for dtype in (torch.float32,) if name == "q3_k" else (torch.float32, torch.bfloat16):
        _check(name, awkward_input(1, 256, 16, dtype, SEED), f"{name} {dtype}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["q2_k", "q4_k", "q5_k"])
def test_affine_k_quants_match_reference(name):
    """make_qkx2_quants (16 or 21 sequential candidates, four C-order sums each), the 4-/6-bit scale and min
    quantization and the bit planes. The interpreter needs about a second per super-block here, so the input is three
    super-blocks: normal weights, one mixing -0.0 and zero sub-blocks, one half subnormal and half float32 extremes."""
    cases = standard_cases(1, 256, 16, SEED)
    mixed = torch.cat([cases["subnormal"][:, :128], cases["largest_finite"][:, 128:]], dim=1)
    x = torch.cat([cases["normal"], cases["negative_zero_blocks"], mixed])
    _check(name, x, f"{name} float32")


@pytest.mark.parametrize("name", ["int8_per_channel", "torchao_int4", "nf4", "fp8_per_channel", "mxfp4", "q4_0"])
def test_shard_offsets_off_the_philox_groups(name):
    """Kernels draw one Philox call per four adjacent columns when a shard starts on a column divisible by 4, and fall
    back to one call per element otherwise: the same draws either way, so a shard placed at columns 4k + 1, 4k + 2 or
    4k + 3 must still match the reference of the same elements (the launch offsets above are all multiples of 4)."""
    shapes, block, qmax = CASES[name]
    rows, cols = shapes[0]
    x = awkward_input(rows, cols, block, torch.float32, SEED, qmax)
    fmt = get_format(name)
    for col_offset in (1, 6, 4 * 32 + 3):
        kw = {"row_offset": 3, "col_offset": col_offset}
        ref = quantize_packed(x, fmt, "layers.0.w", DEPLOYMENT, backend="reference", **kw)
        ours = quantize_packed(x.to(DEVICE), fmt, "layers.0.w", DEPLOYMENT, backend="triton", **kw)
        same_packed(ours, ref, f"{name} col_offset={col_offset}")
