"""What the GGUF oracle tests share: the run's seed, mismatch reports, k-quant case builders, and the checks every
k-quant family passes against ggml's C quantizer (KQuantOracleSuite).

Oracle: ggml_quantize_chunk with no importance matrix (quantize_row_<type>_ref) and ggml's dequantize_row_<type>.
Every run draws a fresh seed; it is in every assert message.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import ClassVar

import pytest
import torch

from qcbguard_kernels import NonFiniteInputError, UnsupportedInputError, get_format
from qcbguard_kernels.formats.base import Encoding
from qcbguard_kernels.formats.gguf_common import QK_K
from qcbguard_kernels.formats.kquant_common import KQuantFormat
from tests.inputs import fresh_seed, integer_tie_rows, standard_cases
from tests.oracles import ggml

__all__ = ["SEED", "KQuantOracleSuite", "block_mismatch", "grid_tie_rows", "same_floats", "value_mismatch"]

SEED = fresh_seed()
SHAPES = [(1, 256), (3, 512), (7, 768), (2, 2560)]


def block_mismatch(ours: torch.Tensor, theirs: torch.Tensor, type_size: int, what: str) -> str:
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


def same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical float32 values, except that any NaN equals any NaN."""
    a, b = a.float().contiguous(), b.float().contiguous()
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    return torch.equal(a.view(torch.int32)[~nan], b.view(torch.int32)[~nan])


def value_mismatch(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> str:
    """How many values differ in their bits (NaN against NaN does not count), and the first few."""
    a, b = ours.reshape(-1).float(), theirs.reshape(-1).float()
    diff = ((a.view(torch.int32) != b.view(torch.int32)) & ~(torch.isnan(a) & torch.isnan(b))).nonzero().flatten()
    first = diff[:5].tolist()
    return (
        f"{what} (seed {SEED}): {diff.numel()} of {a.numel()} values differ; first at {first}: "
        f"ours {a[first].tolist()} theirs {b[first].tolist()}"
    )


def grid_tie_rows(fmt: KQuantFormat, rows: int, cols: int, iterations: int = 3) -> torch.Tensor:
    """Weights exactly halfway between two codes of a k-quant's FINAL grid, where nearest_int's half-to-even rule
    decides.

    Sub-block 0 of every super-block is widened so that it holds the largest scale (and min): d (and dmin) then do
    not move when other sub-blocks change. Every other weight of the other sub-blocks is moved to
    (l + 1/2) * sub_d (- sub_dm for the affine types), l = lower - h: exact in float32, as sub_d and sub_dm have at
    most 19 significant bits. The tensor is re-encoded a few times, until most sub-block scales have settled on the
    moved weights.
    """
    n, h = fmt.spec.sub_block, fmt.spec.offset
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(SEED)) * 0.02
    x.view(rows, -1, QK_K)[:, :, :n] *= 4
    pos = torch.arange(cols)
    movable = (pos % QK_K >= n) & (pos % 2 == 1)
    for _ in range(iterations):
        enc = fmt.encode(x)
        sub_d = enc.scales["sub_d"].repeat_interleave(n, -1).view(rows, cols)
        midpoint = ((enc.cells.lower - h).float() + 0.5) * sub_d
        if "sub_dm" in enc.scales:
            midpoint = midpoint - enc.scales["sub_dm"].repeat_interleave(n, -1).view(rows, cols)
        x = torch.where(movable & enc.cells.steerable, midpoint, x)
    return x


class KQuantOracleSuite(ABC):
    """The tests every k-quant family passes against ggml, byte for byte.

    A test module subclasses it as Test<Family>, names its types in `types` (name -> (ggml_type, bits)) and supplies
    search_nmax and cell_bounds (and extra_cases, check_cell_order where it has more); every test below runs once per
    type.
    """

    types: ClassVar[dict[str, tuple[int, int]]]

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "name" in metafunc.fixturenames:
            metafunc.parametrize("name", list(self.types))

    # ---------------------------------------------------------------- what a family supplies

    @abstractmethod
    def search_nmax(self, fmt: KQuantFormat) -> int:
        """The nmax the type's sub-block search is called with."""

    def extra_cases(self, rows: int, cols: int) -> dict[str, torch.Tensor]:
        """Cases of the family beyond those of every k-quant."""
        return {}

    @abstractmethod
    def cell_bounds(
        self, lo: torch.Tensor, hi: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(low end, high end, slack) of every weight's cell, from the values of its lower and upper codes."""

    def check_cell_order(self, enc: Encoding, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, msg: str) -> None:
        """Assert which way the family's grid runs, where it has a rule for that."""
        return None

    # ---------------------------------------------------------------- cases

    def cases(self, fmt: KQuantFormat, rows: int, cols: int) -> dict[str, torch.Tensor]:
        """standard_cases and exact-tie rows with whole super-blocks and with whole sub-blocks as the special blocks,
        plus exact ties on the final grid and the family's extra cases."""
        cases: dict[str, torch.Tensor] = {}
        for block in (QK_K, fmt.spec.sub_block):
            for key, x in standard_cases(rows, cols, block, SEED).items():
                cases[f"{key}/block{block}"] = x
            # absmax = nmax * 2**-3: the search's first iscale puts every other weight on a tie of nearest_int
            cases[f"ties/block{block}"] = integer_tie_rows(rows, cols, block, self.search_nmax(fmt), SEED)
        cases["grid_ties"] = grid_tie_rows(fmt, rows, cols)
        cases |= self.extra_cases(rows, cols)
        cases["normal/fp16"] = cases[f"normal/block{QK_K}"].half()
        cases["normal/bf16"] = cases[f"normal/block{QK_K}"].bfloat16()
        return cases

    # ---------------------------------------------------------------- bytes and values

    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_bytes_and_values_match_ggml(self, name, shape):
        fmt = get_format(name)
        rows, cols = shape
        for case, x in self.cases(fmt, rows, cols).items():
            q = fmt.quantize(x, case)
            ours = q.tensors["blocks"]
            theirs = ggml.ggml_quantize(name, x.float())
            assert torch.equal(ours, theirs), block_mismatch(ours, theirs, fmt.type_size, f"{name} {case} {shape}")
            deq = fmt.dequantize(q)
            ref = ggml.ggml_dequantize(name, theirs, cols)
            assert same_floats(deq, ref), value_mismatch(deq, ref, f"{name} {case} {shape} dequantized")

    def test_final_grid_ties_go_to_even(self, name):
        """The grid_ties case really is full of exact ties, rounded both ways, and still byte-exact."""
        fmt = get_format(name)
        h = fmt.spec.offset
        x = grid_tie_rows(fmt, 5, 2560)
        cells = fmt.encode(x).cells
        ties = cells.position == 0.5
        msg = f"{name} (seed {SEED})"
        assert int(ties.sum()) > 200, f"{msg}: only {int(ties.sum())} exact ties"
        went_up = cells.nearest[ties] == cells.upper[ties]
        assert bool(went_up.any()) and not bool(went_up.all()), msg
        assert bool(((cells.nearest[ties] - h) % 2 == 0).all()), f"{msg}: a tie did not round to the even l"
        ours = fmt.quantize(x).tensors["blocks"]
        theirs = ggml.ggml_quantize(name, x)
        assert torch.equal(ours, theirs), block_mismatch(ours, theirs, fmt.type_size, f"{name} grid ties")

    def test_many_blocks_match_ggml(self, name):
        """Thousands of super-blocks: rare one-ulp differences in the scale searches show up here."""
        fmt = get_format(name)
        g = torch.Generator().manual_seed(SEED)
        x = torch.randn(96, 2560, generator=g) * 0.02
        x[48:] = torch.distributions.StudentT(torch.tensor(3.0)).sample((48, 2560)) * 0.01
        ours = fmt.quantize(x).tensors["blocks"]
        theirs = ggml.ggml_quantize(name, x)
        assert torch.equal(ours, theirs), block_mismatch(ours, theirs, fmt.type_size, f"{name} many blocks")

    def test_nd_tensor_is_quantized_row_by_row(self, name):
        fmt = get_format(name)
        x = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(SEED)) * 0.05
        q = fmt.quantize(x)
        ours = q.tensors["blocks"]
        theirs = ggml.ggml_quantize(name, x.reshape(-1, 512))
        assert torch.equal(ours, theirs), block_mismatch(ours, theirs, fmt.type_size, name)
        assert fmt.dequantize(q).shape == x.shape
        flat = x.reshape(-1)[:768]  # a 1-D tensor is one row
        q1 = fmt.quantize(flat)
        assert torch.equal(q1.tensors["blocks"], ggml.ggml_quantize(name, flat[None])), name
        assert fmt.dequantize(q1).shape == flat.shape

    # ---------------------------------------------------------------- rounding cells and any codes

    @pytest.mark.parametrize("shape", [(3, 768), (2, 2560)], ids=str)
    def test_rounding_cells(self, name, shape):
        """Cell invariants; code_values on nearest is the dequantized tensor; any codes pack and dequantize as
        predicted."""
        fmt = get_format(name)
        for case, x in self.cases(fmt, *shape).items():
            enc = fmt.encode(x, case)
            cells = enc.cells
            msg = f"{name} {case} {shape} (seed {SEED})"
            for t in (cells.lower, cells.upper, cells.nearest):
                assert t.dtype == torch.int32 and t.shape == x.shape, msg
                assert int(t.min()) >= 0 and int(t.max()) <= fmt.spec.qmax, msg
            assert bool(((cells.nearest == cells.lower) | (cells.nearest == cells.upper)).all()), msg
            gap = cells.upper - cells.lower
            assert bool(((gap == 0) | (gap == 1)).all()), msg
            assert bool(((cells.position >= 0) & (cells.position <= 1)).all()), msg
            assert bool((cells.position[~cells.steerable] == 0).all()), msg

            deq = fmt.dequantize(fmt.quantize(x, case))
            nearest_values = fmt.code_values(enc, cells.nearest)
            assert same_floats(nearest_values, deq), value_mismatch(nearest_values, deq, f"{msg} code_values")

            lo = fmt.code_values(enc, cells.lower)
            hi = fmt.code_values(enc, cells.upper)
            xf = x.float()
            steer = cells.steerable
            low_end, high_end, slack = self.cell_bounds(lo, hi, xf)
            inside = (low_end - slack <= xf) & (xf <= high_end + slack)
            outside = (steer & ~inside).nonzero()
            assert outside.numel() == 0, (
                f"{msg}: {outside.shape[0]} weights outside their cell, first {outside[:3].tolist()}"
            )
            if bool(steer.any()):
                assert bool((high_end[steer] > low_end[steer]).all()), f"{msg}: a steerable cell has no width"
            self.check_cell_order(enc, xf, lo, hi, msg)

            for codes in (cells.upper, cells.lower):
                packed = fmt.pack(enc, codes)
                expect = fmt.code_values(enc, codes)
                got = fmt.dequantize(packed)
                assert same_floats(got, expect), value_mismatch(got, expect, f"{msg} packed non-nearest codes")

    def test_any_codes_round_trip_through_ggml_dequantize(self, name):
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
            assert same_floats(theirs, expect), value_mismatch(expect, theirs, f"{name} {what} codes via ggml")

    # ---------------------------------------------------------------- refusals and registry

    @pytest.mark.parametrize("ne0", [128, 300, 2560 + 16, 2560 + 32, 1])
    def test_row_length_must_be_a_multiple_of_256(self, name, ne0):
        fmt = get_format(name)
        for tensor in ("blk.0.attn_q.weight", "blk.0.attn_v.weight"):
            with pytest.raises(UnsupportedInputError, match=f"ne0={ne0}"):
                fmt.encode(torch.zeros(2, ne0), tensor)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
    def test_non_finite_input_is_refused(self, name, bad):
        fmt = get_format(name)
        x = torch.randn(3, 512)
        x[2, 300] = bad
        for tensor in ("blk.3.ffn_down.weight", "output.weight"):
            with pytest.raises(NonFiniteInputError, match=rf"'{re.escape(tensor)}'.*\(2, 300\)"):
                fmt.quantize(x, tensor)

    def test_bad_codes_and_inputs_are_refused(self, name):
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

    def test_registry_entries(self, name):
        ggml_type, bits = self.types[name]
        fmt = get_format(name)
        assert fmt.family == "gguf-kquant"
        assert fmt.ggml_type == ggml_type == ggml.GGML_TYPES[name]
        assert fmt.bits == bits
        assert fmt.block_size == QK_K
        assert fmt.type_size == ggml.ggml_row_size(name, QK_K)
        assert all(type(get_format(other)) is type(fmt) for other in self.types)  # one parameterized class
