"""bitsandbytes formats against bitsandbytes 0.50 itself on CPU, byte for byte.

Oracles: bitsandbytes.functional.quantize_4bit (nf4, fp4; compress_statistics for nf4_dq, which runs bnb's C++
blockwise quantizer) and bitsandbytes.functional.int8_vectorwise_quant (LLM.int8 weights).
"""

from __future__ import annotations

import pytest
import torch

from qcbguard_kernels import get_format
from qcbguard_kernels.formats.bnb import NF4_CODE, dynamic_map
from tests.inputs import fresh_seed, integer_tie_rows, standard_cases

bnb_functional = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(7, 96), (3, 1025), (130, 160), (1, 17)]
SEED = fresh_seed()


def _cases(shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    rows, cols = shape
    block = 32 if cols % 32 == 0 else 1
    cases = standard_cases(rows, cols - cols % block, block, SEED)
    cases["ties"] = integer_tie_rows(rows, cols - cols % block, block, 127, SEED)
    if cols % block:  # awkward lengths: pad the block-structured cases with fresh normals
        extra = torch.randn(rows, cols % block, generator=torch.Generator().manual_seed(SEED)) * 0.02
        cases = {k: torch.cat([v, extra], dim=1) for k, v in cases.items()}
    for dtype in (torch.float16, torch.bfloat16):
        cases[f"normal_{dtype}"] = cases["normal"].to(dtype)
    return cases


def _mismatch(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> str:
    diff = (ours.reshape(-1) != theirs.reshape(-1)).nonzero().flatten()
    return f"{what}: {diff.numel()} of {ours.numel()} differ (seed {SEED}); first at {diff[:5].tolist()}"


def _bnb_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """bnb's dequantize_4bit. Its AVX-512 CPU kernel indexes absmax per row, which is wrong when a row does not end on
    a block boundary (bnb 0.50.2); there we use bnb's portable reference kernel, which follows the flat block layout
    the quantizer (and CUDA) uses."""
    if state.shape[-1] % state.blocksize == 0:
        return bnb_functional.dequantize_4bit(packed, state).float()
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, state.code, state.blocksize, state.shape, torch.float32)


def _nibble_tie_rows(code: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Blocks of 64 whose absmax is exactly 1 and whose other values are midpoints between adjacent codes."""
    grid = torch.unique(code)
    mids = (grid[:-1] + grid[1:]) / 2
    g = torch.Generator().manual_seed(SEED)
    x = mids[torch.randint(0, mids.numel(), (rows * cols,), generator=g)]
    x[::64] = 1.0
    return x.view(rows, cols)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt_name", ["nf4", "fp4", "nf4_dq"])
def test_4bit_matches_bitsandbytes(fmt_name, shape):
    fmt = get_format(fmt_name)
    quant_type = fmt_name.split("_")[0]
    cases = _cases(shape)
    cases["midpoint_ties"] = _nibble_tie_rows(fmt.code, *shape)
    for case, x in cases.items():
        packed, state = bnb_functional.quantize_4bit(
            x, blocksize=64, quant_type=quant_type, compress_statistics=fmt.double_quant
        )
        q = fmt.quantize(x, case)
        assert torch.equal(q.tensors["weight"], packed), _mismatch(q.tensors["weight"], packed, f"{case} codes")
        assert torch.equal(q.tensors["absmax"], state.absmax), _mismatch(q.tensors["absmax"], state.absmax, case)
        if fmt.double_quant:
            assert torch.equal(q.tensors["offset"], state.offset), case
            assert torch.equal(q.tensors["nested_absmax"], state.state2.absmax), case
        theirs = _bnb_dequantize_4bit(packed, state)
        # largest_finite overflows the double-quantization mean to inf in bnb and here alike: NaN must match NaN.
        ours = fmt.dequantize(q)
        assert torch.equal(ours.nan_to_num(), theirs.nan_to_num()), _mismatch(ours, theirs, f"{case} dequantized")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_rowwise_matches_bitsandbytes(shape):
    fmt = get_format("bnb_int8")
    for case, x in _cases(shape).items():
        codes, row_stats, _ = bnb_functional.int8_vectorwise_quant(x.clone())
        q = fmt.quantize(x, case)
        assert torch.equal(q.tensors["int8"], codes), _mismatch(q.tensors["int8"], codes, case)
        assert torch.equal(q.tensors["row_stats"], row_stats), case


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(dynamic_map(), bnb_functional.create_dynamic_map().float())


def test_double_quant_lut_matches_cpp_quantizer():
    """Every one of the 65536 LUT bins and the clamped ends, through bnb's C++ quantize_blockwise."""
    edges = torch.linspace(-1, 1, 65536 * 3 + 1, dtype=torch.float32)
    values = torch.cat([edges, dynamic_map(), (dynamic_map()[1:] + dynamic_map()[:-1]) / 2])
    values[::256] = 1.0  # absmax 1 in every block of 256: the normalized value is the value itself
    from qcbguard_kernels.formats.bnb import quantize_dynamic_blockwise

    ours, ours_absmax = quantize_dynamic_blockwise(values)
    theirs, state = bnb_functional.quantize_blockwise(values, blocksize=256)
    assert torch.equal(ours, theirs), _mismatch(ours, theirs, "dynamic blockwise codes")
    assert torch.equal(ours_absmax, state.absmax)


def test_nf4_code_table_is_bitsandbytes():
    assert torch.equal(NF4_CODE, bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(get_format("fp4").code, bnb_functional.get_4bit_type("fp4", device="cpu"))
