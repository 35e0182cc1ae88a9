"""Q3_K and Q6_K against ggml's own C quantizer (libggml-base through ctypes), byte for byte.

Oracle: ggml_quantize_chunk with no importance matrix, i.e. quantize_row_q3_K_ref / quantize_row_q6_K_ref, and
ggml's dequantize_row_* for the values. Every run draws a fresh seed; it is in every assert message.
"""

from __future__ import annotations

import pytest
import torch

from qcbguard_kernels import NonFiniteInputError, UnsupportedInputError, get_format
from qcbguard_kernels.formats.gguf_common import QK_K
from qcbguard_kernels.formats.gguf_kquant_symmetric import pack_q3_k_scales, unpack_q3_k_scales
from tests.inputs import fresh_seed, integer_tie_rows, standard_cases

ggml = pytest.importorskip("tests.oracles.ggml")

FORMATS = ["q3_k", "q6_k"]
SHAPES = [(1, 256), (3, 512), (7, 768), (2, 2560)]
SUB = 16  # sub-block length of both types
SEED = fresh_seed()
FP32_MAX = torch.finfo(torch.float32).max


def _grid_tie_rows(fmt, rows: int, cols: int, iterations: int = 3) -> torch.Tensor:
    """Weights exactly halfway between two codes of the FINAL grid, where nearest_int's half-to-even rule decides.

    Sub-block 0 of every super-block is widened so that it holds the largest scale: d then does not move when other
    sub-blocks change. Every other weight of the other sub-blocks is moved to (l + 1/2) * sub_d (exact in float32:
    sub_d = fp16(d) * sc has at most 19 significant bits) and the tensor re-encoded, a few times, until most
    sub-block scales have settled on the moved weights.
    """
    h = fmt.spec.offset
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(SEED)) * 0.02
    x.view(rows, -1, QK_K)[:, :, :SUB] *= 4
    pos = torch.arange(cols)
    movable = (pos % QK_K >= SUB) & (pos % 2 == 1)
    for _ in range(iterations):
        enc = fmt.encode(x)
        sub_d = enc.scales["sub_d"].repeat_interleave(SUB, -1).view(rows, cols)
        midpoint = ((enc.cells.lower - h).float() + 0.5) * sub_d
        x = torch.where(movable & enc.cells.steerable, midpoint, x)
    return x


def _extreme_rows(rows: int, super_blocks: int, seed: int) -> torch.Tensor:
    """Sub-blocks whose magnitudes span 1e-45..1e38 inside one super-block, with signed zeros, exact halves and
    near-FLT_MAX sub-blocks: fp16 d overflows to inf or underflows to +-0, sub-block scales quantize to 0 (the
    search's codes are kept), x * x overflows (NaN scales) and fp16(d) * sc is NaN (code h is written)."""
    g = torch.Generator().manual_seed(seed)
    n_sub = super_blocks * QK_K // SUB
    exponent = torch.randint(-45, 39, (rows, n_sub, 1), generator=g).float()
    x = (torch.randn(rows, n_sub, SUB, generator=g) * 10.0**exponent).clamp(-FP32_MAX, FP32_MAX)
    mark = torch.rand(x.shape, generator=g)
    x = torch.where(mark < 0.1, torch.zeros_like(x), x)
    x = torch.where((mark >= 0.1) & (mark < 0.15), torch.full_like(x, -0.0), x)
    halves = torch.randint(-8, 8, x.shape, generator=g).float() * 0.5
    x = torch.where(torch.rand(rows, n_sub, 1, generator=g) < 0.2, halves, x)
    huge = torch.randn(x.shape, generator=g).sign() * FP32_MAX * torch.rand(x.shape, generator=g)
    x = torch.where(torch.rand(rows, n_sub, 1, generator=g) < 0.05, huge, x)
    return x.reshape(rows, super_blocks * QK_K)


def _cases(fmt, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """standard_cases and exact-tie rows with whole super-blocks and with whole sub-blocks as the special blocks,
    plus exact ties on the final grid and extreme magnitudes."""
    cases: dict[str, torch.Tensor] = {}
    for block in (QK_K, SUB):
        for key, x in standard_cases(rows, cols, block, SEED).items():
            cases[f"{key}/block{block}"] = x
        # absmax = nmax * 2**-3: the search's first iscale puts every other weight on a tie of nearest_int
        cases[f"ties/block{block}"] = integer_tie_rows(rows, cols, block, fmt.spec.offset, SEED)
    cases["grid_ties"] = _grid_tie_rows(fmt, rows, cols)
    cases["extreme"] = _extreme_rows(rows, cols // QK_K, SEED)
    cases["normal/fp16"] = cases[f"normal/block{QK_K}"].half()
    cases["normal/bf16"] = cases[f"normal/block{QK_K}"].bfloat16()
    return cases


def _block_mismatch(ours: torch.Tensor, theirs: torch.Tensor, type_size: int, what: str) -> str:
    """How many blocks differ, and the worst one (most differing bytes) in full."""
    a = ours.reshape(ours.shape[0], -1, type_size)
    b = theirs.reshape(theirs.shape[0], -1, type_size)
    per_block = (a != b).sum(-1)
    n_bad = int((per_block > 0).sum())
    row, blk = divmod(int(per_block.argmax()), a.shape[1])
    where = (a[row, blk] != b[row, blk]).nonzero().flatten().tolist()
    return (
        f"{what} (seed {SEED}): {n_bad} of {per_block.numel()} blocks differ; worst row {row} block {blk}, "
        f"bytes {where}:\n ours   {a[row, blk].tolist()}\n theirs {b[row, blk].tolist()}"
    )


def _same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical float32 values, except that any NaN equals any NaN."""
    a, b = a.float().contiguous(), b.float().contiguous()
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    return torch.equal(a.view(torch.int32)[~nan], b.view(torch.int32)[~nan])


def _value_mismatch(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> str:
    a, b = ours.reshape(-1).float(), theirs.reshape(-1).float()
    diff = ((a.view(torch.int32) != b.view(torch.int32)) & ~(torch.isnan(a) & torch.isnan(b))).nonzero().flatten()
    first = diff[:5].tolist()
    return (
        f"{what} (seed {SEED}): {diff.numel()} of {a.numel()} values differ; first at {first}: "
        f"ours {a[first].tolist()} theirs {b[first].tolist()}"
    )


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", FORMATS)
def test_bytes_and_values_match_ggml(name, shape):
    fmt = get_format(name)
    rows, cols = shape
    for case, x in _cases(fmt, rows, cols).items():
        q = fmt.quantize(x, case)
        ours = q.tensors["blocks"]
        theirs = ggml.ggml_quantize(name, x.float())
        assert torch.equal(ours, theirs), _block_mismatch(ours, theirs, fmt.type_size, f"{name} {case} {shape}")
        deq = fmt.dequantize(q)
        ref = ggml.ggml_dequantize(name, theirs, cols)
        assert _same_floats(deq, ref), _value_mismatch(deq, ref, f"{name} {case} {shape} dequantized")


@pytest.mark.parametrize("name", FORMATS)
def test_extreme_magnitudes_reach_the_degenerate_paths(name):
    """The extreme case really exercises C's corner paths, and stays byte-exact there."""
    fmt = get_format(name)
    h = fmt.spec.offset
    x = _extreme_rows(8, 4, SEED)
    enc = fmt.encode(x)
    sub_d, d = enc.scales["sub_d"], enc.scales["d"].float()
    msg = f"{name} (seed {SEED})"
    skipped = (sub_d == 0).repeat_interleave(SUB, -1).view(x.shape)
    kept_search_codes = skipped & (enc.cells.nearest != 0) & (enc.cells.nearest != h)
    assert int(kept_search_codes.sum()) > 0, f"{msg}: no skipped sub-block kept the search's codes"
    assert bool(sub_d.isnan().any()), f"{msg}: no NaN sub-block scale"
    assert bool(d.isinf().any()), f"{msg}: no fp16 d overflowed"
    ours = fmt.quantize(x).tensors["blocks"]
    theirs = ggml.ggml_quantize(name, x)
    assert torch.equal(ours, theirs), _block_mismatch(ours, theirs, fmt.type_size, f"{msg} extreme")


@pytest.mark.parametrize("name", FORMATS)
def test_final_grid_ties_go_to_even(name):
    """The grid_ties case really is full of exact ties, rounded both ways, and still byte-exact."""
    fmt = get_format(name)
    h = fmt.spec.offset
    x = _grid_tie_rows(fmt, 5, 2560)
    cells = fmt.encode(x).cells
    ties = cells.position == 0.5
    msg = f"{name} (seed {SEED})"
    assert int(ties.sum()) > 200, f"{msg}: only {int(ties.sum())} exact ties"
    went_up = cells.nearest[ties] == cells.upper[ties]
    assert bool(went_up.any()) and not bool(went_up.all()), msg
    assert bool(((cells.nearest[ties] - h) % 2 == 0).all()), f"{msg}: a tie did not round to the even l"
    ours = fmt.quantize(x).tensors["blocks"]
    theirs = ggml.ggml_quantize(name, x)
    assert torch.equal(ours, theirs), _block_mismatch(ours, theirs, fmt.type_size, f"{msg} grid ties")


@pytest.mark.parametrize("name", FORMATS)
def test_many_blocks_match_ggml(name):
    """Thousands of super-blocks: rare one-ulp differences in the scale searches show up here."""
    fmt = get_format(name)
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(96, 2560, generator=g) * 0.02
    x[48:] = torch.distributions.StudentT(torch.tensor(3.0)).sample((48, 2560)) * 0.01
    ours = fmt.quantize(x).tensors["blocks"]
    theirs = ggml.ggml_quantize(name, x)
    assert torch.equal(ours, theirs), _block_mismatch(ours, theirs, fmt.type_size, f"{name} many blocks")


@pytest.mark.parametrize("name", FORMATS)
def test_nd_tensor_is_quantized_row_by_row(name):
    fmt = get_format(name)
    x = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(SEED)) * 0.05
    q = fmt.quantize(x)
    theirs = ggml.ggml_quantize(name, x.reshape(-1, 512))
    assert torch.equal(q.tensors["blocks"], theirs), _block_mismatch(q.tensors["blocks"], theirs, fmt.type_size, name)
    assert fmt.dequantize(q).shape == x.shape
    flat = x.reshape(-1)[:768]  # a 1-D tensor is one row
    q1 = fmt.quantize(flat)
    assert torch.equal(q1.tensors["blocks"], ggml.ggml_quantize(name, flat[None])), name
    assert fmt.dequantize(q1).shape == flat.shape


@pytest.mark.parametrize("shape", [(3, 768), (2, 2560)], ids=str)
@pytest.mark.parametrize("name", FORMATS)
def test_rounding_cells(name, shape):
    """Cell invariants; code_values on nearest is the dequantized tensor; any codes pack and dequantize as predicted."""
    fmt = get_format(name)
    qmax = fmt.spec.qmax
    for case, x in _cases(fmt, *shape).items():
        enc = fmt.encode(x, case)
        cells = enc.cells
        msg = f"{name} {case} {shape} (seed {SEED})"
        for t in (cells.lower, cells.upper, cells.nearest):
            assert t.dtype == torch.int32 and t.shape == x.shape, msg
            assert int(t.min()) >= 0 and int(t.max()) <= qmax, msg
        assert bool(((cells.nearest == cells.lower) | (cells.nearest == cells.upper)).all()), msg
        gap = cells.upper - cells.lower
        assert bool(((gap == 0) | (gap == 1)).all()), msg
        assert bool(((cells.position >= 0) & (cells.position <= 1)).all()), msg
        assert bool((cells.position[~cells.steerable] == 0).all()), msg

        deq = fmt.dequantize(fmt.quantize(x, case))
        nearest_values = fmt.code_values(enc, cells.nearest)
        assert _same_floats(nearest_values, deq), _value_mismatch(nearest_values, deq, f"{msg} code_values")

        lo = fmt.code_values(enc, cells.lower)
        hi = fmt.code_values(enc, cells.upper)
        low_end, high_end = torch.minimum(lo, hi), torch.maximum(lo, hi)  # values descend in L where sub_d < 0
        xf = x.float()
        steer = cells.steerable
        # x / sub_d is rounded once before C rounds it, and each grid value sub_d * l once: allow a few ulps of the
        # magnitudes involved, nothing more.
        slack = 2.0**-21 * torch.maximum(high_end.abs().nan_to_num(0.0), xf.abs())
        inside = (low_end - slack <= xf) & (xf <= high_end + slack)
        outside = (steer & ~inside).nonzero()
        assert outside.numel() == 0, (
            f"{msg}: {outside.shape[0]} weights outside their cell, first {outside[:3].tolist()}"
        )
        if bool(steer.any()):
            assert bool((high_end[steer] > low_end[steer]).all()), f"{msg}: a steerable cell has no width"
            sub_d = enc.scales["sub_d"].repeat_interleave(SUB, -1).view(x.shape)
            ascending = (hi > lo) == (sub_d > 0)
            assert bool(ascending[steer].all()), f"{msg}: upper is not the next grid point in L"

        for codes in (cells.upper, cells.lower):
            packed = fmt.pack(enc, codes)
            expect = fmt.code_values(enc, codes)
            got = fmt.dequantize(packed)
            assert _same_floats(got, expect), _value_mismatch(got, expect, f"{msg} packed non-nearest codes")


@pytest.mark.parametrize("name", FORMATS)
def test_any_codes_round_trip_through_ggml_dequantize(name):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(4, 768, generator=g) * 0.03
    enc = fmt.encode(x)
    for what, codes in (
        ("upper", enc.cells.upper),
        ("random", torch.randint(0, fmt.spec.qmax + 1, x.shape, generator=g, dtype=torch.int32)),
    ):
        packed = fmt.pack(enc, codes).tensors["blocks"]
        theirs = ggml.ggml_dequantize(name, packed, 768)
        expect = fmt.code_values(enc, codes)
        assert _same_floats(theirs, expect), _value_mismatch(expect, theirs, f"{name} {what} codes via ggml")


@pytest.mark.parametrize("ne0", [128, 300, 2560 + 16, 1])
@pytest.mark.parametrize("name", FORMATS)
def test_row_length_must_be_a_multiple_of_256(name, ne0):
    fmt = get_format(name)
    with pytest.raises(UnsupportedInputError, match=f"ne0={ne0}"):
        fmt.encode(torch.zeros(2, ne0), "blk.0.attn_v.weight")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", FORMATS)
def test_non_finite_input_is_refused(name, bad):
    fmt = get_format(name)
    x = torch.randn(3, 512)
    x[2, 300] = bad
    with pytest.raises(NonFiniteInputError, match=r"'output\.weight'.*\(2, 300\)"):
        fmt.quantize(x, "output.weight")


@pytest.mark.parametrize("name", FORMATS)
def test_bad_codes_and_inputs_are_refused(name):
    fmt = get_format(name)
    enc = fmt.encode(torch.randn(1, 256))
    with pytest.raises(UnsupportedInputError):
        fmt.pack(enc, torch.full((1, 256), fmt.spec.qmax + 1, dtype=torch.int32))
    with pytest.raises(UnsupportedInputError):
        fmt.pack(enc, torch.full((1, 256), -1, dtype=torch.int32))
    with pytest.raises(UnsupportedInputError):
        fmt.pack(enc, torch.zeros(1, 512, dtype=torch.int32))
    with pytest.raises(UnsupportedInputError):
        fmt.encode(torch.zeros(1, 256, dtype=torch.float64))
    with pytest.raises(UnsupportedInputError):
        fmt.encode(torch.tensor(1.0))


@pytest.mark.parametrize(("name", "ggml_type", "bits"), [("q3_k", 11, 3), ("q6_k", 14, 6)])
def test_registry_entries(name, ggml_type, bits):
    fmt = get_format(name)
    assert fmt.family == "gguf-kquant"
    assert fmt.ggml_type == ggml_type == ggml.GGML_TYPES[name]
    assert fmt.bits == bits
    assert fmt.block_size == QK_K
    assert fmt.type_size == ggml.ggml_row_size(name, QK_K)
    assert type(fmt) is type(get_format("q6_k"))  # one parameterized class for the family


def test_q3_k_scale_packing_round_trips():
    """Every 6-bit value in every one of the 16 sub-block slots, through the 12-byte layout."""
    values = torch.arange(64, dtype=torch.int32).view(-1, 1)
    stored = (values + 5 * torch.arange(16, dtype=torch.int32)) % 64  # different values in different slots
    packed = pack_q3_k_scales(stored)
    assert packed.shape == (64, 12) and packed.dtype == torch.uint8
    assert torch.equal(unpack_q3_k_scales(packed), stored)
