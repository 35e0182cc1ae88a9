"""The native twins (kernels/native/) against their plain-torch references, bit for bit.

- k-quant scale searches and the GGUF legacy encoding: the oracle suites (test_gguf_*_exact.py,
  test_gguf_kquant_*.py) hold the default path, the native one, equal to ggml; this file holds the torch references
  equal to it on the same awkward cases, so both stay proven.
- Rounding cells of integer grids and of the e4m3 grid: compared here on every kind of grid coordinate, and through
  every format that uses them on the default path (test_format_contract.py, the oracle suites).
- The detector's counting pass: compared here on positions at every bin edge, on codes and just off them, and
  through whole scores of every kind of format.
- The Philox stream: test_philox_triton.py holds the torch reference equal to tl.philox, test_hardening.py the
  default path equal to the reference word by word, and this file the two equal on whole windows of the grid.

Every run draws a fresh seed, and it is in every assert message.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from qcbguard_kernels import native
from qcbguard_kernels.formats.base import RoundingCells
from qcbguard_kernels.formats.cells import integer_grid_cells, integer_grid_cells_reference
from qcbguard_kernels.formats.fp8 import fp8_cells, fp8_cells_reference
from qcbguard_kernels.formats.kquant_common import KQuantFormat
from qcbguard_kernels.formats.registry import format_names, get_format
from qcbguard_kernels.hardening import DeploymentSeed
from qcbguard_kernels.hardening.rng import uniform_grid_reference
from tests.inputs import fresh_seed, integer_tie_rows, standard_cases
from tests.threads import torch_threads

SEED = fresh_seed()
KQUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


def _cases(fmt) -> dict[str, torch.Tensor]:
    cases = standard_cases(6, 768, 256, SEED)
    cases["ties"] = integer_tie_rows(4, 512, fmt.spec.sub_block, fmt.spec.qmax, SEED)
    return cases


def _same_bits(a: torch.Tensor, b: torch.Tensor, nan_sign: bool = True) -> bool:
    """Equal element for element, NaN equal to NaN, signs of zeros (and of NaNs unless nan_sign is False) equal
    (ints compared as they are)."""
    if a.is_floating_point():
        signs = a.signbit() == b.signbit()
        if not nan_sign:
            signs |= a.isnan() & b.isnan()
        return bool(((a == b) | (a.isnan() & b.isnan())).all()) and bool(signs.all())
    return torch.equal(a, b)


def test_extension_is_built():
    """The install builds the extension where a C compiler is present (it is, on CI): fail loudly, not slowly."""
    assert native.status() == "native", native.status()


@pytest.mark.parametrize("name", KQUANTS)
def test_search_matches_reference(name, monkeypatch):
    fmt = get_format(name)
    for case, x in _cases(fmt).items():
        every = x.reshape(-1, fmt.spec.sub_block)
        # The C code takes sub-blocks 16 at a time (SIMD lanes), then one at a time: cut both ways.
        for blocks in (every, every[3:], every[:5]):
            monkeypatch.setenv("QCBGUARD_NATIVE", "1")
            fast = fmt._sub_block_search(blocks)
            monkeypatch.setenv("QCBGUARD_NATIVE", "0")
            ref = fmt._sub_block_search(blocks)
            for k, (a, b) in enumerate(zip(fast, ref, strict=True)):
                assert _same_bits(a, b.contiguous()), f"{name} {case} {len(blocks)} blocks, output {k} (seed {SEED})"


@pytest.mark.parametrize("name", KQUANTS)
def test_encoding_matches_reference(name, monkeypatch):
    """Whole encodings, through stage 2 and 3: the packed bytes, every scale field and every rounding cell."""
    fmt = get_format(name)
    x = _cases(fmt)["heavy_tailed"]
    encodings = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("QCBGUARD_NATIVE", flag)
        enc = fmt.encode(x)
        encodings[flag] = (enc, fmt.pack(enc, enc.cells.nearest))
    (fast, fast_q), (ref, ref_q) = encodings["1"], encodings["0"]
    for key, t in fast_q.tensors.items():
        assert torch.equal(t, ref_q.tensors[key]), f"{name} packed {key} (seed {SEED})"
    for key, t in fast.scales.items():
        assert _same_bits(t, ref.scales[key]), f"{name} scale {key} (seed {SEED})"
    for field in ("lower", "upper", "position", "nearest"):
        assert _same_bits(getattr(fast.cells, field), getattr(ref.cells, field)), f"{name} cells.{field} (seed {SEED})"


def test_threads_split_without_changing_results(monkeypatch):
    """One thread and several give the same bits (each sub-block is computed by one thread, in order)."""
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(SEED)) * 0.02
    blocks = x.reshape(-1, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.qkx2_search(blocks, 15, -1.0, 0.1, 20, False, True)
        torch.set_num_threads(max(2, threads))
        many = native.qkx2_search(blocks, 15, -1.0, 0.1, 20, False, True)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many, strict=True)), f"seed {SEED}"


def test_tensors_off_the_cpu_keep_the_reference_path():
    """The twins read host memory: a tensor elsewhere (a GPU; "meta" stands in for one here) takes the torch path."""
    assert native.enabled(torch.zeros(1))
    assert not native.enabled(torch.zeros(1, device="meta"))


def test_rejects_what_it_cannot_address():
    with pytest.raises(ValueError, match="2-D CPU tensor"):
        native.qx_search(torch.zeros(16), 32)
    with pytest.raises(ValueError, match="outside"):
        native.qx_search(torch.zeros(2, 64), 32)


@pytest.mark.parametrize(
    ("row_start", "rows", "col_start", "cols"),
    [
        (0, 3, 0, 1),  # one column
        (5, 17, 3, 4097),  # offsets and lengths off the 4-column and 128-column batches
        (7, 2, 1, 62),  # a window inside one batch
        (0, 600, 0, 4096),  # enough rows to split over threads
        (2**32 - 4, 4, 2**32 - 130, 130),  # the last rows and columns a 32-bit counter reaches
    ],
)
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_philox_matches_reference(row_start, rows, col_start, cols, isa):
    """Every Philox batch: AVX-512 and AVX2 intrinsics on x86-64 and the portable C one (a batch the CPU lacks
    skips)."""
    key = DeploymentSeed.fresh().key_for("w")
    try:
        if native._ext.philox_isa(isa) != isa:
            pytest.skip(f"this CPU has no {isa}")
        for stream in (0, 3):
            fast = native.philox_uniform_grid(key, row_start, rows, col_start, cols, stream)
            ref = uniform_grid_reference(key, row_start, rows, col_start, cols, stream)
            assert torch.equal(fast, ref), (row_start, rows, col_start, cols, stream, isa)
    finally:
        native._ext.philox_isa("avx512")


@pytest.mark.parametrize("isa", ["f16c", "portable"])
@pytest.mark.parametrize("flush_denormal", [False, True], ids=["ieee", "daz"])
def test_widening_matches_torch(isa, flush_denormal):
    """The fused passes' 16-bit rows widened (F16C's vcvtph2ps and the portable C; bfloat16 by shifting) equal
    torch's .float() on every one of the 2^16 bit patterns of float16 and bfloat16, subnormals and signed zeros
    included, also with MXCSR's denormals-are-zero on (torch.set_flush_denormal); a NaN stays a NaN (its payload is
    never read: non-finite weights are refused before any pass). Rows of 4096 and 4095 columns (F16C's tail)."""
    patterns = torch.arange(2**16, dtype=torch.int32).to(torch.int16)
    try:
        if native._ext.widen_isa(isa) != isa:
            pytest.skip(f"this CPU has no {isa}")
        if flush_denormal and not torch.set_flush_denormal(True):
            pytest.skip("no denormals-are-zero on this CPU")
        for dtype in (torch.float16, torch.bfloat16):
            x = patterns.view(dtype)
            for shape in ((16, 4096), (3, 4095)):
                rows = x[: shape[0] * shape[1]].reshape(shape)
                got, want = native.widen(rows), rows.float()
                nan = want.isnan()
                assert torch.equal(got.isnan(), nan), (dtype, shape)
                assert torch.equal(got.view(torch.int32)[~nan], want.view(torch.int32)[~nan]), (dtype, shape)
    finally:
        torch.set_flush_denormal(False)
        native._ext.widen_isa("f16c")


@pytest.mark.parametrize(("qmin", "qmax", "offset"), [(-127, 127, 0), (0, 15, 0), (-32, 31, 32), (-4, 3, 4)])
def test_grid_cells_match_reference(qmin, qmax, offset):
    """Grid coordinates of every kind: inside and beyond the grid, on grid points, +-0.0, subnormal, huge, inf, NaN
    (where the cell collapses onto the written code), in a length that is no multiple of a SIMD width."""
    g = torch.Generator().manual_seed(SEED)
    n = 100_003
    u = torch.randn(n, generator=g) * (qmax - qmin) / 2
    u[::7] = torch.round(u[::7])  # on grid points
    u[1::11] = -0.0
    u[2::11] = 0.0
    u[3::13] = 1e-40
    u[4::13] = -3e38
    u[5::17] = float("inf")
    u[6::17] = float("-inf")
    u[7::19] = float("nan")
    u[8::19] = qmax + 0.5
    nearest = (torch.round(u.nan_to_num(0.0)).clamp(qmin, qmax) + offset).to(torch.int32)
    fast = integer_grid_cells(u, nearest, qmin, qmax, offset)
    ref = integer_grid_cells_reference(u, nearest, qmin, qmax, offset)
    for field in ("lower", "upper", "position", "nearest"):
        assert _same_bits(getattr(fast, field), getattr(ref, field)), f"{field} (seed {SEED})"


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_legacy_encoding_matches_reference(name):
    fmt = get_format(name)
    cases = standard_cases(6, 1024, 32, SEED)
    cases["ties"] = integer_tie_rows(4, 512, 32, fmt.qmax // 2 or 1, SEED)
    cases["many_rows"] = torch.randn(2048, 160, generator=torch.Generator().manual_seed(SEED))  # split over threads
    # extremes that tie: +-a, +0.0 / -0.0 and all-zero blocks of both signs (which element C picks reaches d and m)
    g = torch.Generator().manual_seed(SEED)
    palette = torch.tensor([-2.0, -1.0, -0.0, 0.0, 1.0, 2.0])
    cases["signed_ties"] = palette[torch.randint(0, 6, (64, 256), generator=g)]
    cases["signed_zeros"] = palette[torch.randint(2, 4, (8, 256), generator=g)]
    for case, x in cases.items():
        blocks = fmt.rows(x)
        fast = native.legacy_encode(blocks.reshape(-1, 32), fmt.bits, fmt.affine)
        ref = fmt._encode_reference(blocks)
        for field, a, b in zip(("d", "m", "u", "nearest"), fast, ref, strict=True):
            if b is None:
                assert a is None, f"{name} {case}: {field}"
                continue
            assert _same_bits(a, b.reshape(a.shape)), f"{name} {case}: {field} (seed {SEED})"


def test_fp8_cells_match_reference():
    """Values handed to the e4m3 cast: every magnitude code and every midpoint between two (the ties), just off them,
    the subnormal range, beyond 448, +-0.0, inf and NaN, both signs."""
    g = torch.Generator().manual_seed(SEED)
    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (grid[:-1] + grid[1:]) * 0.5
    special = torch.tensor([0.0, -0.0, 448.0, 449.0, 464.0, 1e6, float("inf"), float("nan"), 2.0**-10, 2.0**-6])
    pieces = [
        grid,
        mids,
        torch.nextafter(mids, torch.full_like(mids, 1e9)),
        torch.nextafter(mids, torch.zeros_like(mids)),
    ]
    pieces += [special, torch.randn(50_001, generator=g) * 100, torch.rand(10_000, generator=g) * 2.0**-6]
    r = torch.cat(pieces)
    r = torch.cat([r, -r])
    (fast, fast_neg), (ref, ref_neg) = fp8_cells(r), fp8_cells_reference(r)
    assert torch.equal(fast_neg, ref_neg), f"negative (seed {SEED})"
    for field in ("lower", "upper", "position", "nearest"):
        assert _same_bits(getattr(fast, field), getattr(ref, field)), f"{field} (seed {SEED})"


@pytest.mark.parametrize("name", ["fp8_per_channel", "fp8_per_tensor"])
def test_fp8_scaling_fused_into_cells_matches_reference(name, monkeypatch):
    """vLLM's per-channel and per-tensor scale rules fused into the e4m3 cells (no clamp there: beyond 448 a value
    saturates like the clamped one) against torch's scaling, clamp and cells: the standard awkward cases, rows of
    zeros (the per-channel scale floor), huge rows, a zero tensor and a subnormal-tiny one (per-tensor: an infinite
    inverse scale, 0 * inf = NaN -> 448 and x * inf = inf), over 1 and 2 threads."""
    fmt = get_format(name)
    cases = standard_cases(8, 1536, 256, SEED)
    big = torch.randn(600, 1024, generator=torch.Generator().manual_seed(SEED)) * 0.02  # two threads' worth of rows
    big[::7] = 0.0
    big[1::7] *= 1e30
    cases |= {
        "rows": big,
        "zeros": torch.zeros(4, 256),
        "tiny": torch.full((4, 256), 1e-37).index_fill_(1, torch.tensor([3]), 0.0),
    }
    for case, x in cases.items():
        monkeypatch.setenv("QCBGUARD_NATIVE", "0")
        ref = fmt.encode(x)
        monkeypatch.setenv("QCBGUARD_NATIVE", "1")
        for threads in (1, 2):
            with torch_threads(threads):
                fast = fmt.encode(x)
            assert torch.equal(fast.scales["negative"], ref.scales["negative"]), f"{case} negative (seed {SEED})"
            for field in ("lower", "upper", "position", "nearest"):
                got, want = getattr(fast.cells, field), getattr(ref.cells, field)
                assert _same_bits(got, want), f"{case} {field}, {threads} threads (seed {SEED})"


def _tally_inputs(dtype: torch.dtype, g: torch.Generator) -> tuple:
    """Cells whose positions sit on bin edges (k / 2048 from the boundary), on codes (0, 1), within 1e-5 of them and
    at random; ascending and descending cells, zero-width ones, clamped ones (lower == upper); values on the
    checkpoint's lattice, some equal to a code's value, zeros of both signs (some on a zero code), values below the
    dtype's smallest normal; `above` codes at zero distance from the nearest (no decoy) and far from it (decoys that
    wrap around the cell)."""
    edges = 0.5 + torch.arange(-1024, 1025, dtype=torch.float32) / 2048
    near_code = torch.tensor([0.0, 1.0, 1e-5, 1 - 1e-5, 9.99e-6, 0.99999, 1e-9, 0.5, 0.49999997, 0.50000006])
    p = torch.cat([edges, near_code, torch.rand(600_003, generator=g)])  # two threads' worth (2 * 2**18)
    n = p.numel()
    lower = torch.randint(0, 16, (n,), generator=g, dtype=torch.int32)
    upper = lower + (torch.rand(n, generator=g) < 0.9).int()
    nearest = torch.where(torch.rand(n, generator=g) < 0.5, lower, upper)
    step = torch.randn(n, generator=g) * 0.01 * (torch.rand(n, generator=g) < 0.95)  # both signs, some zero
    lo = torch.randn(n, generator=g) * 0.1
    hi = lo + step
    values = (lo + p * step).to(dtype).float()
    pick = torch.rand(n, generator=g)
    values = torch.where(pick < 0.05, lo, torch.where(pick < 0.1, hi, values))
    zeroed = torch.rand(n, generator=g) < 0.02  # pruned weights: zeros on a zero code (left out of the counts)
    lo, values = torch.where(zeroed, 0.0, lo), torch.where(zeroed, 0.0, values)
    values[:12] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 6e-8, 1e-6, -1e-6, 2.0**-126, 2.0**-14, 3.0, -448.0, 1e-40])
    # live weights whose first decoy lands exactly on the upper on-code bound: a float32 checkpoint's decoy shift is
    # (step / 64) / step = 1/64 exactly, and on_high - 1/64 + 1/64 == on_high in float32
    edge = slice(12, 20)
    p[edge] = torch.tensor(1.0 - 1e-5, dtype=torch.float32) - 1 / 64
    upper[edge] = lower[edge] + 1
    lo[edge], hi[edge], values[edge] = 0.25, 0.26, 0.255
    near = torch.where(nearest == lower, lo, hi)
    above = torch.where(torch.rand(n, generator=g) < 0.1, near, near + torch.randn(n, generator=g) * 0.01)
    cells = RoundingCells(lower=lower, upper=upper, position=p, nearest=nearest)
    return values, cells, lo, hi, near, above


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_detector_tally_matches_reference(dtype):
    """The detector's counting pass: every count and both histograms equal to the torch reference, with in-cell
    decoys and without (the re-fitted decoys' use: no near, no above), over 1 and 2 threads."""
    from qcbguard_kernels.detection import cell_statistic as cs

    g = torch.Generator().manual_seed(SEED)
    values, cells, lo, hi, near, above = _tally_inputs(dtype, g)
    for code_values in ((lo, hi, near, above), (lo, hi, None, None)):
        weights = cs._Weights(values, dtype, cells, code_values, (0, 16))
        ref = cs._tally_reference(weights)
        for threads in (1, 2):
            with torch_threads(threads):
                fast = cs._tally(weights)
            for field in native.TALLY_FIELDS:
                assert getattr(fast, field) == getattr(ref, field), f"{field}, {threads} threads (seed {SEED})"
            assert torch.equal(fast.live_counts, ref.live_counts), f"live counts (seed {SEED})"
            assert torch.equal(fast.decoy_counts, ref.decoy_counts), f"decoy counts (seed {SEED})"
        assert ref.source > 0 if code_values[3] is not None else ref.source == 0


def test_detector_tally_leaves_zeros_on_a_code_out():
    """Weights on a code are never live, zeros included: a zero on its cell's code is counted only as a zero (not on
    the grid, not near a code, no decoy source), in the native pass and the reference alike."""
    from qcbguard_kernels.detection import cell_statistic as cs

    g = torch.Generator().manual_seed(SEED)
    n = 4096
    lower = torch.randint(1, 15, (n,), generator=g, dtype=torch.int32)
    cells = RoundingCells(lower=lower, upper=lower + 1, position=torch.rand(n, generator=g), nearest=lower)
    zero = torch.arange(n) % 2 == 0
    lo = torch.where(zero, 0.0, torch.rand(n, generator=g) + 0.5)  # every weight sits on its lower code
    values, hi = lo.clone(), lo + 0.1
    weights = cs._Weights(values, torch.float32, cells, (lo, hi, lo, hi), (0, 16))
    for tally in (cs._tally_reference(weights), cs._tally(weights)):
        assert (tally.live, tally.zeros, tally.on_grid, tally.near_code) == (0, n // 2, n // 2, n // 2), tally
        assert tally.source == n // 2  # the nonzero ones, pinned on an interior code


@pytest.mark.parametrize("table_kind", ["gathered", "ramp", "e4m3"])
def test_detector_tally_evaluates_code_value_rules(table_kind):
    """The counting pass with a CodeValueRule equals the pass reading the rule's values as arrays, for each way it
    reads a table: gathered (any table), computed as an integer ramp (the legacy types) or as e4m3's magnitudes
    (fp8); with signs, a shift, groups that start mid-block and the clamped neighbour of the top code."""
    from qcbguard_kernels.detection import cell_statistic as cs
    from qcbguard_kernels.formats.base import CodeValueRule
    from qcbguard_kernels.formats.fp8 import e4m3_magnitudes

    g = torch.Generator().manual_seed(SEED)
    values, cells, *_ = _tally_inputs(torch.bfloat16, g)
    n, top = values.numel(), 16
    table = {
        "gathered": torch.sort(torch.randn(17, generator=g)).values,
        "ramp": torch.arange(-8, 9, dtype=torch.float32),
        "e4m3": e4m3_magnitudes(),
    }[table_kind]
    group = 37
    negative = torch.rand(n, generator=g) < 0.5
    scale = torch.rand(-(-n // group), generator=g) * 0.01
    shift = torch.randn(-(-n // group), generator=g) * 0.01
    # values near the rule's codes, so that some are on the grid and feed pinned decoys
    rule = CodeValueRule(table, 0, scale, group, negative=negative, shift=shift)
    at = torch.arange(n) // group
    sign = torch.where(negative, -1.0, 1.0)

    def value(codes: torch.Tensor) -> torch.Tensor:
        return table[codes.clamp(0, table.numel() - 1).long()] * sign * scale[at] + shift[at]

    lo, hi = value(cells.lower), value(cells.upper)
    near = torch.where(cells.nearest == cells.lower, lo, hi)
    above = value(torch.where(cells.nearest < top, cells.nearest + 1, cells.nearest - 1))
    values = torch.where(torch.rand(n, generator=g) < 0.1, near, values)
    arrays = cs._tally(cs._Weights(values, torch.bfloat16, cells, (lo, hi, near, above), (0, top)))
    ruled = cs._tally(cs._Weights(values, torch.bfloat16, cells, rule, (0, top)))
    for field in native.TALLY_FIELDS:
        assert getattr(ruled, field) == getattr(arrays, field), f"{field} (seed {SEED})"
    assert torch.equal(ruled.live_counts, arrays.live_counts) and torch.equal(ruled.decoy_counts, arrays.decoy_counts)
    assert arrays.source > arrays.live > 0 and arrays.on_grid > 0, f"seed {SEED}"


@pytest.mark.parametrize(
    "name", ["fp8_per_channel", "fp8_per_tensor", "nf4", "fp4", "bnb_int8", "mxfp4", "q8_0", "q4_1", "q4_k", "q6_k"]
)
def test_cell_score_matches_reference(name, monkeypatch):
    """Whole detector scores, native against torch, on the standard awkward cases stored as bfloat16 and float32:
    the in-cell decoy formats and the re-fitted ones (k-quants)."""
    from qcbguard_kernels.detection import cell_score

    fmt = get_format(name)
    for case, x in standard_cases(4, 512, 256, SEED).items():
        for dtype in (torch.bfloat16, torch.float32):
            w = x.to(dtype)
            if not bool(w.isfinite().all()):
                continue  # bf16 overflow of the largest floats: refused by encode, not a detector case
            monkeypatch.setenv("QCBGUARD_NATIVE", "1")
            fast = cell_score(w, fmt)
            monkeypatch.setenv("QCBGUARD_NATIVE", "0")
            assert cell_score(w, fmt) == fast, f"{case} {dtype} (seed {SEED})"


@pytest.mark.parametrize("name", ["fp8_per_channel", "fp8_per_tensor", "bnb_int8", "q4_0", "q4_k", "q6_k"])
def test_native_outputs_ignore_the_default_dtype(name):
    """vLLM loads a model under torch.set_default_dtype(bfloat16): every buffer the C code writes must carry its own
    dtype (a float32 buffer allocated as the default dtype is half the size the C code fills, a heap overrun), so the
    encoding, packed bytes and detector score under that default equal those under float32, dtype for dtype."""
    from qcbguard_kernels.detection import cell_score

    fmt = get_format(name)
    x = standard_cases(4, 512, 256, SEED)["heavy_tailed"]
    results = {}
    before = torch.get_default_dtype()
    for default in (torch.float32, torch.bfloat16):
        torch.set_default_dtype(default)
        try:
            enc = fmt.encode(x)
            results[default] = (enc, fmt.pack(enc, enc.cells.nearest), cell_score(x.to(torch.bfloat16), fmt))
        finally:
            torch.set_default_dtype(before)
    (enc32, q32, score32), (enc16, q16, score16) = results[torch.float32], results[torch.bfloat16]
    for field in ("lower", "upper", "position", "nearest"):
        a, b = getattr(enc16.cells, field), getattr(enc32.cells, field)
        assert a.dtype == b.dtype and _same_bits(a, b), f"{name} cells.{field} (seed {SEED})"
    for key, t in q32.tensors.items():
        assert q16.tensors[key].dtype == t.dtype and torch.equal(q16.tensors[key], t), f"{name} packed {key}"
    assert score16 == score32, f"{name} detector score (seed {SEED})"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_working_threads():
    """vLLM forks its workers: a child forked after the parent ran parallel jobs (OpenMP threads started) must run
    them too, not wait on threads it did not inherit. The child runs only the extension, writing into buffers
    allocated before the fork."""
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(SEED)) * 0.02
    blocks = x.reshape(-1, 32).contiguous()
    expected = native.qkx2_search(blocks, 15, -1.0, 0.1, 20, False, True)  # starts the threads here
    assert native._ext.threads() == "openmp"
    count = blocks.shape[0]
    scale, the_min, codes = torch.empty(count), torch.empty(count), torch.empty((count, 32), dtype=torch.int32)

    def job(a: int, b: int) -> tuple[object, ...]:
        return (
            blocks.data_ptr() + 128 * a, b - a, 32, 15, -1.0, 0.1, 20, False, True,
            scale.data_ptr() + 4 * a, the_min.data_ptr() + 4 * a, codes.data_ptr() + 128 * a,
        )  # fmt: skip

    pid = os.fork()
    if pid == 0:  # child: a hang or a wrong result must show in the exit status
        signal.alarm(60)
        native._parallel(native._ext.qkx2, count, job, 1)
        outputs = zip((scale, the_min, codes), expected, strict=True)
        same = all(a.numpy().tobytes() == b.numpy().tobytes() for a, b in outputs)
        os._exit(0 if same and native._ext.threads() == "threads" else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize(
    ("name", "shape", "row_offset", "col_offset"),
    [
        ("q8_0", (37, 2080), 0, 0),  # rows wider than one 1024-column window, and a partial window
        ("q4_k", (9, 1280), 5, 256),  # a shard placed off the origin
        ("q8_0", (3, 7, 160), 2**32 - 30, 2**32 - 170),  # leading dims, near the counter limit
        ("fp8_per_tensor", (5, 131), 0, 3),  # an odd width
        ("fp8_per_channel", (600, 512), 3, 1),  # enough rows to split over threads; a column offset off the 4-grid
    ],
)
def test_stochastic_codes_match_reference(name, shape, row_offset, col_offset, monkeypatch):
    from qcbguard_kernels.hardening.harden import stochastic_codes

    fmt = get_format(name)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(SEED)) * 0.02
    enc = fmt.encode(x)
    key = DeploymentSeed.fresh().key_for("w")
    monkeypatch.setenv("QCBGUARD_NATIVE", "1")
    fast = stochastic_codes(enc, key, row_offset, col_offset)
    monkeypatch.setenv("QCBGUARD_NATIVE", "0")
    ref = stochastic_codes(enc, key, row_offset, col_offset)
    assert fast.shape == ref.shape and torch.equal(fast, ref), f"{name} {shape} (seed {SEED})"
    assert not torch.equal(fast, enc.cells.nearest), "the draw moved no code: the test would not see a wrong stream"


@pytest.mark.parametrize("flag", ["1", "0"])
def test_stochastic_codes_tie_between_draw_and_position(flag, monkeypatch):
    """A uniform exactly equal to its position draws lower (u < position is strict): positions set to the very
    uniforms the elements draw, on both paths."""
    from qcbguard_kernels.formats.base import Encoding, RoundingCells
    from qcbguard_kernels.hardening.harden import stochastic_codes
    from qcbguard_kernels.hardening.rng import uniform_grid_reference

    key = DeploymentSeed.fresh().key_for("w")
    rows, cols = 16, 300
    position = uniform_grid_reference(key, 0, rows, 0, cols)
    position[:, ::2] = torch.rand(rows, (cols + 1) // 2, generator=torch.Generator().manual_seed(SEED))
    lower = torch.zeros(rows, cols, dtype=torch.int32)
    cells = RoundingCells(lower=lower, upper=lower + 1, position=position, nearest=lower)
    enc = Encoding("q8_0", torch.Size((rows, cols)), cells)
    monkeypatch.setenv("QCBGUARD_NATIVE", flag)
    codes = stochastic_codes(enc, key)
    assert not bool(codes[:, 1::2].any()), f"a draw equal to its position took the upper code (seed {SEED})"


def test_fused_legacy_pass_rounds_scales_to_half_like_torch():
    """The fused legacy pass writes fp16 scales itself: Q4_1 stores each block's minimum as is, so blocks whose
    minimum runs over every rounding case (half ties to even and just off them, normal and subnormal, the largest
    half, 65520 and beyond, 2**-25 and below, both signs) must pack to the bytes torch's float16 conversion gives."""
    g = torch.Generator().manual_seed(SEED)
    halves = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    ties = (halves[:-1] + halves[1:]) * 0.5  # exact in float32: the midpoints between adjacent halves
    pieces = [halves, ties, torch.nextafter(ties, torch.zeros_like(ties)), torch.nextafter(ties, ties * 2 + 1)]
    pieces += [torch.tensor([65504.0, 65519.0, 65520.0, 1e6, 2.0**-25, 2.0**-26, 3 * 2.0**-26, 1e-40, 0.0])]
    pieces += [torch.randn(4096, generator=g) * 10.0 ** torch.randint(-9, 5, (4096,), generator=g)]
    minimum = torch.cat(pieces)
    minimum = torch.cat([minimum, -minimum])
    # every block: its minimum, then weights above it (span 1: d stays finite)
    blocks = minimum[:, None] + torch.rand(minimum.numel(), 32, generator=g)
    blocks[:, 0] = minimum
    x = blocks[: blocks.shape[0] // 4 * 4].reshape(-1, 32 * 4)  # rows of four blocks
    fmt = get_format("q4_1")
    fused, _, _ = fmt.native_quantize(x, "w", None)
    assert torch.equal(fused.tensors["blocks"], fmt.pack(fmt.encode(x)).tensors["blocks"]), f"seed {SEED}"


@pytest.mark.parametrize("name", [n for n in format_names() if n != "fp8_per_block"])
def test_code_value_rules_are_code_values(name):
    """A format's CodeValueRule (what the native detector pass evaluates) gives code_values' bits for the lower,
    upper and nearest codes of the standard awkward cases (-0.0 included)."""
    fmt = get_format(name)
    for case, x in standard_cases(4, 512, 256, SEED).items():
        enc = fmt.encode(x)
        rule = fmt.code_value_rule(enc)
        flat = torch.arange(x.numel()) // rule.group
        for field in ("lower", "upper", "nearest"):
            codes = getattr(enc.cells, field).reshape(-1)
            value = rule.table[(codes - rule.first_code).long()]
            if rule.negative is not None:
                value = value * torch.where(rule.negative.reshape(-1), -1.0, 1.0)
            value = value * rule.scale.reshape(-1)[flat]
            if rule.shift is not None:
                value = value + rule.shift.reshape(-1)[flat]
            expected = fmt.code_values(enc, getattr(enc.cells, field)).reshape(-1)
            # the affine k-quants' rule adds -sub_dm where ggml subtracts sub_dm: the same bits but a NaN's sign
            # (their NaN scales come from non-finite blocks; the detector reads no rule for k-quants)
            nan_sign = not isinstance(fmt, KQuantFormat)
            assert _same_bits(value, expected, nan_sign), f"{name} {case} {field} (seed {SEED})"
    assert get_format("fp8_per_block").code_value_rule(get_format("fp8_per_block").encode(x)) is None


@pytest.mark.parametrize("name", [n for n in format_names() if n != "fp8_per_block"])
def test_feedback_block_matches_reference(name, monkeypatch):
    """Calibrated hardening's column steps (feedback.c) give the torch loop's codes bit for bit, for every format
    with a code-value rule, on the awkward cases (zero and -0.0 blocks, huge and tiny weights, ties), at a row offset,
    on one thread and on several (rows split across threads: each row is one thread's)."""
    from qcbguard_kernels.hardening.feedback import HessianAccumulator, feedback_codes, feedback_plan

    fmt = get_format(name)
    g = torch.Generator().manual_seed(SEED)
    acc = HessianAccumulator(512)
    acc.add(torch.randn(600, 16, generator=g) @ torch.randn(16, 512, generator=g) + torch.randn(600, 512, generator=g))
    plan = feedback_plan(acc.hessian)
    for case, x in standard_cases(70, 512, 256, SEED).items():
        enc = fmt.encode(x)
        rule = fmt.code_value_rule(enc)
        u = uniform_grid_reference(SEED, 3, x.shape[0], 0, x.shape[1])
        monkeypatch.setenv("QCBGUARD_NATIVE", "0")
        expected = feedback_codes(x, enc, rule, plan, u)
        monkeypatch.setenv("QCBGUARD_NATIVE", "1")
        for threads in (1, 2):
            with torch_threads(threads):
                codes = feedback_codes(x, enc, rule, plan, u)
            assert torch.equal(codes, expected), f"{name} {case} {threads} threads (seed {SEED})"


def test_feedback_block_refuses_arrays_it_cannot_address():
    from qcbguard_kernels.hardening.feedback import feedback_plan

    fmt = get_format("q4_0")
    x = torch.randn(4, 64)
    rule = fmt.code_value_rule(fmt.encode(x))
    plan = feedback_plan(torch.eye(64, dtype=torch.float64))
    factor = plan.factor.contiguous()
    work = torch.zeros(64, 4, dtype=torch.float64)
    u, nearest, index = torch.zeros(64, 4), torch.zeros(64, 4, dtype=torch.int32), torch.zeros(64, 4, dtype=torch.int32)
    errors = torch.zeros(64, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="transposed CPU arrays"):  # the uniforms in float64, not float32
        native.feedback_block(rule, plan.order, 0, 64, factor, work, u.double(), nearest, index, errors)
    with pytest.raises(ValueError, match="transposed CPU arrays"):  # errors for 32 columns, the block has 64
        native.feedback_block(rule, plan.order, 0, 64, factor, work, u, nearest, index, errors[:32])
    native.feedback_block(rule, plan.order, 0, 64, factor, work, u, nearest, index, errors)
