"""Native CPU twins of plain-torch references, bit-identical to them: the GGUF k-quant scale searches
(kquant_search.c), the GGUF legacy blocks' encoding (legacy.c), the rounding cells of integer grids (grid_cells.c)
and of the e4m3 grid (fp8_cells.c), the detector's counting passes (histogram.c) and the hardening's Philox stream
(philox.c).

The scale searches are sequential per sub-block (16-21 candidates, each a C-order sum over 16 or 32 weights): in
plain torch they cost one tensor op per element and candidate, which made them most of the GGUF tool's CPU time.
Philox in torch emulates 32-bit multiplies in int64 tensors, a dozen passes over memory per round. The extension is
built by `pip install` when a C compiler is there (setup.py marks it optional); without it, or with
QCBGUARD_NATIVE=0, the torch references run instead and give the same bytes, only slower. `status()` says which.

Each call cuts its work into one range per torch.get_num_threads() thread and hands the ranges to the extension as
one list of jobs, which it runs in an OpenMP region on torch's own thread pool (module.c says why).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..formats.base import CodeValueRule

try:
    from . import _native as _ext
except ImportError:  # not built (no compiler at install time): the torch references serve
    _ext = None

__all__ = [
    "TALLY_FIELDS",
    "cell_tally",
    "enabled",
    "feedback_block",
    "fp8_cells",
    "fp8_quantize",
    "grid_cells",
    "kquant_sym_quantize",
    "legacy_encode",
    "legacy_quantize",
    "philox_uniform_grid",
    "q3_search",
    "qkx2_search",
    "qx_search",
    "status",
    "stochastic_codes",
    "widen",
]

_ENV = "QCBGUARD_NATIVE"
_MIN_PER_THREAD = 512  # sub-blocks: below this a thread costs more than it saves
_MIN_DRAWS_PER_THREAD = 1 << 18  # Philox draws or elements, likewise
_MIN_FEEDBACK_ROWS_PER_THREAD = 64  # rows of a feedback block (128 columns): ~8 k multiply-adds per row
_MIN_TALLY_PER_THREAD = 1 << 14  # weights the detector counts: ~15 ns each, so a thread pays off from ~0.2 ms


def enabled(on: torch.Tensor | None = None) -> bool:
    """True when the extension is built and QCBGUARD_NATIVE is not 0 (and `on`, when given, is a CPU tensor: the
    twins read host memory; a CUDA tensor keeps the torch reference path)."""
    if on is not None and on.device.type != "cpu":
        return False
    return _ext is not None and os.environ.get(_ENV, "1").strip() != "0"


def status() -> str:
    """One line for reports: which CPU implementation of the twins runs."""
    if _ext is None:
        return "torch reference (native extension not built; reinstall with a C compiler for speed)"
    return "native" if enabled() else f"torch reference ({_ENV}=0)"


def _parallel(
    function: Callable[[list[tuple[object, ...]]], None],
    count: int,
    job: Callable[[int, int], tuple[object, ...]],
    min_per_thread: int = _MIN_PER_THREAD,
) -> None:
    """function([job(start, stop), ...]) over [0, count) cut into contiguous ranges, one per thread (torch's thread
    count), each at least min_per_thread long: the extension runs the jobs in parallel, one per thread."""
    threads = max(1, min(torch.get_num_threads(), count // max(1, min_per_thread)))
    bounds = [count * k // threads for k in range(threads + 1)]
    function([job(a, b) for a, b in itertools.pairwise(bounds)])


def _at(t: torch.Tensor, index: int) -> int:
    """Address of t[index] (along t's first dimension) in a contiguous tensor: where a thread's range starts."""
    return t.data_ptr() + index * t.stride(0) * t.element_size()


def _contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).contiguous()


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.device.type != "cpu":
        raise ValueError(f"sub-blocks must be a 2-D CPU tensor (count, n), got {tuple(x.shape)} on {x.device}")
    return _contiguous(x, torch.float32)


def qkx2_search(
    x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool, rms_weights: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants over sub-blocks x (count, n), weights |x| or sqrt(sum x^2 / n) + |x| (rms_weights).

    Returns (scale (count,), the_min (count,), codes (count, n) int32), as gguf_kquant_affine.make_qkx2_quants.
    """
    x = _blocks(x)
    count, n = x.shape
    scale, the_min = torch.empty(count, dtype=torch.float32), torch.empty(count, dtype=torch.float32)
    codes = torch.empty((count, n), dtype=torch.int32)

    def job(a: int, b: int) -> tuple[object, ...]:
        return (
            _at(x, a),
            b - a,
            n,
            nmax,
            rmin,
            rdelta,
            nstep,
            use_mad,
            rms_weights,
            _at(scale, a),
            _at(the_min, a),
            _at(codes, a),
        )

    _parallel(_ext.qkx2, count, job)
    return scale, the_min, codes


def _symmetric(kernel: Callable[..., None], x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = _blocks(x)
    count, n = x.shape
    scale = torch.empty(count, dtype=torch.float32)
    codes = torch.empty((count, n), dtype=torch.int32)

    def job(a: int, b: int) -> tuple[object, ...]:
        return (_at(x, a), b - a, n, nmax, _at(scale, a), _at(codes, a))

    _parallel(kernel, count, job)
    return scale, codes


def qx_search(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, rmse_type 1) over sub-blocks x (count, n): (scale (count,), codes (count, n) int32)."""
    return _symmetric(_ext.qx, x, nmax)


def q3_search(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(n, nmax, do_rmse) over sub-blocks x (count, n): (scale (count,), codes (count, n) int32)."""
    return _symmetric(_ext.q3, x, nmax)


def philox_uniform_grid(
    key: int, row_start: int, rows: int, col_start: int, cols: int, stream: int = 0
) -> torch.Tensor:
    """rng.uniform_grid natively: float32 (rows, cols), word col % 4 of Philox(key, (col // 4, row, stream, 0))."""
    out = torch.empty((rows, cols), dtype=torch.float32)

    def job(a: int, b: int) -> tuple[object, ...]:
        return (key, row_start + a, b - a, col_start, cols, stream, _at(out, a))

    _parallel(_ext.philox, rows, job, _MIN_DRAWS_PER_THREAD // max(1, cols))
    return out


def grid_cells(
    u: torch.Tensor, nearest: torch.Tensor, qmin: int, qmax: int, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """formats.cells.integer_grid_cells' arithmetic in one pass: (lower, upper, position) shaped like u."""
    u, nearest = _contiguous(u, torch.float32), _contiguous(nearest, torch.int32)
    if u.shape != nearest.shape or u.device.type != "cpu" or nearest.device.type != "cpu":
        raise ValueError("grid_cells needs CPU tensors u and nearest of one shape")
    lower, upper = torch.empty_like(nearest), torch.empty_like(nearest)
    position = torch.empty_like(u)
    count = u.numel()

    def job(a: int, b: int) -> tuple[object, ...]:
        return (
            _at(u.view(-1), a),
            _at(nearest.view(-1), a),
            b - a,
            qmin,
            qmax,
            offset,
            _at(lower.view(-1), a),
            _at(upper.view(-1), a),
            _at(position.view(-1), a),
        )

    _parallel(_ext.grid_cells, count, job, _MIN_DRAWS_PER_THREAD)
    return lower, upper, position


def legacy_encode(
    blocks: torch.Tensor, bits: int, affine: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """GgufLegacy's encoding of blocks (count, 32): (d (count,), m (count,) or None, u (count, 32), nearest int32)."""
    blocks = _blocks(blocks)
    count = blocks.shape[0]
    if blocks.shape[1] != 32:
        raise ValueError(f"legacy blocks hold 32 weights, got {blocks.shape[1]}")
    d, m = torch.empty(count, dtype=torch.float32), torch.empty(count if affine else 0, dtype=torch.float32)
    u = torch.empty_like(blocks)
    nearest = torch.empty(blocks.shape, dtype=torch.int32)

    def job(a: int, b: int) -> tuple[object, ...]:
        return (
            _at(blocks, a),
            b - a,
            bits,
            affine,
            _at(d, a),
            _at(m, a) if affine else 0,
            _at(u, a),
            _at(nearest, a),
        )

    _parallel(_ext.legacy, count, job, _MIN_DRAWS_PER_THREAD // 32)
    return d, (m if affine else None), u, nearest


#: fp8_cells' scale rules (native.h): r = x, x / divisor[row], x * multiplier; fp8_quantize's "row_scale" computes
#: each row's per-channel scale, writes it to factor[row] and divides by it
_FP8_RULES = {"as_is": 0, "divide_row": 1, "multiply": 2, "row_scale": 3}


#: the weight dtypes the fused quantize passes read as they are (widen.c), by their C code; others become float32
_WEIGHT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _weights(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x contiguous in a dtype the fused passes read (float32, bfloat16, float16: no float32 copy of a 16-bit
    checkpoint, whose fresh pages cost more than widening each row in cache), and that dtype's C code."""
    x = x.contiguous() if x.dtype in _WEIGHT_DTYPES else _contiguous(x, torch.float32)
    return x, _WEIGHT_DTYPES[x.dtype]


def widen(x: torch.Tensor) -> torch.Tensor:
    """The float32 rows the fused passes read from a 2-D CPU tensor x (float32 as is; bfloat16 and float16 widened
    row by row, exactly as torch's .float())."""
    x, dtype = _weights(x)
    if x.dim() != 2 or x.device.type != "cpu":
        raise ValueError(f"widen needs a 2-D CPU tensor, got {tuple(x.shape)} on {x.device}")
    rows, cols = x.shape
    out = torch.empty((rows, cols), dtype=torch.float32)
    _parallel(_ext.widen, rows, lambda a, b: (_at(x, a), dtype, b - a, cols, _at(out, a)))
    return out


def _fp8_rows(x: torch.Tensor, rule: str, factor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (contiguous) as rows (a 2-D view) and the factors of its scale rule, checked against each other."""
    if x.device.type != "cpu":
        raise ValueError("the fp8 twins need a CPU tensor")
    rows_of = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    per_row = rule in ("divide_row", "row_scale")
    expected = rows_of.shape[0] if per_row else {"as_is": 0, "multiply": 1}[rule]
    if rule == "row_scale" and (factor is None or factor.dtype != torch.float32 or not factor.is_contiguous()):
        raise ValueError("fp8 rule 'row_scale' writes its scales to `factor`: a contiguous float32 tensor")
    f = torch.ones(1, dtype=torch.float32) if factor is None else _flat(factor, torch.float32)
    if f.numel() != max(expected, 1) or (per_row and x.dim() != 2):
        raise ValueError(f"fp8 rule {rule!r} on shape {tuple(x.shape)} needs {expected} factors, got {f.numel()}")
    return rows_of, f


def _factor_at(f: torch.Tensor, rule: str, row: int) -> int:
    return _at(f, row if rule in ("divide_row", "row_scale") else 0)


def fp8_cells(
    x: torch.Tensor, rule: str = "as_is", factor: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """formats.fp8.fp8_cells' arithmetic in one pass over r, where r is x ("as_is"), x / factor[row] ("divide_row",
    x 2-D, one factor per row) or x * factor ("multiply", one factor; the caller keeps x * factor free of NaN): the
    clamp to +-448 that precedes the cast changes no cell. Returns (lower, upper, position, nearest, negative) shaped
    like x."""
    rows_of, f = _fp8_rows(_contiguous(x, torch.float32), rule, factor)
    rows, cols = rows_of.shape
    lower, upper, nearest = (torch.empty(x.shape, dtype=torch.int32) for _ in range(3))
    position = torch.empty(x.shape, dtype=torch.float32)
    negative = torch.empty(x.shape, dtype=torch.bool)

    def job(a: int, b: int) -> tuple[object, ...]:
        outputs = (lower, upper, position, nearest, negative)
        return (
            _at(rows_of, a), b - a, cols, _factor_at(f, rule, a), _FP8_RULES[rule],
            *(_at(t.view(-1), a * cols) for t in outputs),
        )  # fmt: skip

    _parallel(_ext.fp8_cells, rows, job, _MIN_DRAWS_PER_THREAD // max(1, cols))
    return lower, upper, position, nearest, negative


def fp8_quantize(
    x: torch.Tensor, rule: str, factor: torch.Tensor, key: int | None, row_start: int = 0, col_start: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The e4m3 bytes (uint8, x's 2-D shape) of x under a scale rule as fp8_cells takes it: round-to-nearest, and with
    a key the hardened bytes (stochastic_codes at global (row_start, col_start)) and how many codes differ, in one
    pass that never materialises the cells. Rule "row_scale" (x finite): each row divided by vLLM's per-channel
    scale, which the pass computes from the row and writes to `factor` (float32, one per row, contiguous).
    float32, bfloat16 and float16 weights are read as they are."""
    x, dtype = _weights(x)
    rows_of, f = _fp8_rows(x, rule, factor)
    rows, cols = rows_of.shape

    def job(a: int, b: int, *outputs: int) -> tuple[object, ...]:
        return (
            _at(rows_of, a), dtype, b - a, cols, _factor_at(f, rule, a), _FP8_RULES[rule], key is not None, key or 0,
            row_start + a, col_start, *outputs,
        )  # fmt: skip

    return _fused_rows(_ext.fp8_quantize, rows, cols, cols, key, job)


def legacy_quantize(
    x: torch.Tensor, bits: int, affine: bool, key: int | None, row_start: int = 0, col_start: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """GgufLegacy's packed blocks (uint8 (rows, blocks * block bytes)) of x (rows of whole 32-weight blocks):
    round-to-nearest, and with a key the hardened blocks (stochastic_codes at global (row_start, col_start)) and how
    many codes differ, in one pass per row (encode, cells, draw, pack) that never materialises the cells. float32,
    bfloat16 and float16 weights are read as they are."""
    block_bytes = _ext.legacy_block_bytes(bits, affine)
    return _block_rows(_ext.legacy_quantize, x, (32, block_bytes), (bits, affine), key, row_start, col_start)


def kquant_sym_quantize(
    x: torch.Tensor, bits: int, key: int | None, row_start: int = 0, col_start: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """GgufKQuantSymmetric's packed super-blocks (uint8 (rows, blocks * block bytes)) of x (rows of whole 256-weight
    super-blocks; Q3_K: bits 3, Q6_K: bits 6): round-to-nearest, and with a key the hardened blocks (stochastic_codes
    at global (row_start, col_start)) and how many codes differ, in one pass per row (search, scales, codes, cells,
    draw, pack) that never materialises the cells. float32, bfloat16 and float16 weights are read as they are."""
    block_bytes = _ext.kquant_sym_block_bytes(bits)
    return _block_rows(_ext.kquant_sym_quantize, x, (256, block_bytes), (bits,), key, row_start, col_start)


def _block_rows(
    function: Callable[[list[tuple[object, ...]]], None],
    x: torch.Tensor,
    block: tuple[int, int],
    type_args: tuple[object, ...],
    key: int | None,
    row_start: int,
    col_start: int,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """A GGUF type's fused pass (legacy_quantize, kquant_sym_quantize) over the rows of x, whose length is a whole
    number of blocks; `block` = (weights, bytes) per block, `type_args` the type's arguments after (x, dtype, rows,
    cols). See _fused_rows for the outputs."""
    x, dtype = _weights(x)
    weights, block_bytes = block
    if x.device.type != "cpu" or x.dim() != 2 or x.shape[1] % weights:
        raise ValueError(f"{function.__name__} needs CPU rows of whole {weights}-weight blocks, got {tuple(x.shape)}")
    rows, cols = x.shape

    def job(a: int, b: int, *outputs: int) -> tuple[object, ...]:
        harden = key is not None
        return (_at(x, a), dtype, b - a, cols, *type_args, harden, key or 0, row_start + a, col_start, *outputs)

    return _fused_rows(function, rows, cols, cols // weights * block_bytes, key, job)


def _fused_rows(
    function: Callable[[list[tuple[object, ...]]], None],
    rows: int,
    cols: int,
    row_bytes: int,
    key: int | None,
    job: Callable[..., tuple[object, ...]],
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Run a fused quantize pass over row ranges, one per thread, each job(first row, end row, nearest, hardened,
    changed addresses): (round-to-nearest bytes (rows, row_bytes), hardened bytes or None when key is None, codes
    changed). Without a key the hardened address is the nearest one (never written)."""
    nearest = torch.empty((rows, row_bytes), dtype=torch.uint8)
    hardened = None if key is None else torch.empty((rows, row_bytes), dtype=torch.uint8)
    changed = torch.zeros(rows, dtype=torch.int64)  # one slot per range's first row: threads never share one

    def outputs_job(a: int, b: int) -> tuple[object, ...]:
        return job(a, b, _at(nearest, a), _at(nearest if hardened is None else hardened, a), _at(changed, a))

    _parallel(function, rows, outputs_job, _MIN_DRAWS_PER_THREAD // max(1, cols))
    return nearest, hardened, int(changed.sum())


def _flat(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _contiguous(t.reshape(-1), dtype)


#: cell_tally's counts, in the order of the C enum (native.h)
TALLY_FIELDS = ("on_grid", "interior_on_grid", "near_code", "steerable", "live", "source", "decoy_on_code", "zeros")
_CELL_DTYPES = (torch.float32, torch.int32, torch.int32, torch.int32)  # position, lower, upper, nearest


def cell_tally(
    values: torch.Tensor,
    cells: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    code_values: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | CodeValueRule,
    end_codes: tuple[int, int],
    lattice: tuple[int, float],
    decoys: tuple[tuple[int, ...], float, float],
    cdf_points: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """detection's counting pass (cell_statistic._tally_reference) in one native pass, split over threads.

    `cells` = (position, lower, upper, nearest), `code_values` = (lo, hi, near, above) (near and above may be None)
    or the format's CodeValueRule (the pass computes all four, in-cell decoys included), `end_codes` = (bottom, top),
    `lattice` = (mantissa bits, smallest normal) of the checkpoint's dtype, `decoys` = (shifts, on_low, on_high).
    Returns (live weights' boundary counts, in-cell decoys' counts, TALLY_FIELDS counts)."""
    v = _flat(values, torch.float32)
    position, lower, upper, nearest = (_flat(t, d) for t, d in zip(cells, _CELL_DTYPES, strict=True))
    arrays, rule = _code_values(code_values, v.numel())
    shifts, on_low, on_high = decoys
    ks = torch.tensor(shifts, dtype=torch.int32)
    parts: list[tuple[torch.Tensor, ...]] = []

    def job(a: int, b: int) -> tuple[object, ...]:
        out = torch.zeros(2, cdf_points + 1, dtype=torch.int64), torch.zeros(len(TALLY_FIELDS), dtype=torch.int64)
        parts.append(out)
        return (
            *(_at(t, a) for t in (v, position, lower, upper, nearest)),
            *(0 if t is None else _at(t, a) for t in arrays),
            *rule(a),
            b - a,
            *end_codes,
            *lattice,
            ks.data_ptr(),
            len(shifts),
            on_low,
            on_high,
            cdf_points,
            out[0][0].data_ptr(),
            out[0][1].data_ptr(),
            out[1].data_ptr(),
        )

    _parallel(_ext.cell_tally, v.numel(), job, _MIN_TALLY_PER_THREAD)  # at least one range: parts is never empty
    counts = sum(c for c, _ in parts)
    tally = sum(t for _, t in parts)
    return counts[0], counts[1], dict(zip(TALLY_FIELDS, tally.tolist(), strict=True))


def _rule_arrays(
    rule: CodeValueRule, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A CodeValueRule's arrays as the C passes read them (table, scale, shift float32; negative bool; contiguous),
    checked to cover `count` weights: a scale (and shift) per group, a sign per weight."""
    table, scale = _flat(rule.table, torch.float32), _flat(rule.scale, torch.float32)
    shift = None if rule.shift is None else _flat(rule.shift, torch.float32)
    negative = None if rule.negative is None else _flat(rule.negative, torch.bool)
    groups = -(-count // max(rule.group, 1))
    if rule.group < 1 or table.numel() < 1 or scale.numel() < groups or (shift is not None and shift.numel() < groups):
        raise ValueError(
            f"a code-value rule needs a table, a group of at least 1 and a scale (and shift) per group of {count}"
        )
    if negative is not None and negative.numel() != count:
        raise ValueError(f"a code-value rule's signs cover {negative.numel()} weights, not {count}")
    return table, scale, shift, negative


def _code_values(
    code_values: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | CodeValueRule,
    count: int,
) -> tuple[tuple[torch.Tensor | None, ...], Callable[[int], tuple[int, ...]]]:
    """cell_tally's code-value arguments: the four arrays (None where absent) and, for a thread's range starting at
    element a, the rule's (table, first_code, size, negative, scale, shift, group, first, above) (zeros: no rule)."""
    if isinstance(code_values, tuple):
        arrays = tuple(None if t is None else _flat(t, torch.float32) for t in code_values)
        return arrays, lambda a: (0, 0, 0, 0, 0, 0, 0, 0, False)
    r = code_values
    table, scale, shift, negative = _rule_arrays(r, count)

    def fields(a: int) -> tuple[int, ...]:
        sign = 0 if negative is None else _at(negative, a)
        at_shift = 0 if shift is None else shift.data_ptr()
        return (table.data_ptr(), r.first_code, table.numel(), sign, scale.data_ptr(), at_shift, r.group, a, True)

    return (None, None, None, None), fields


def stochastic_codes(
    key: int, row_start: int, col_start: int, position: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor
) -> torch.Tensor:
    """harden.stochastic_codes for cells (rows, cols) at global (row_start, col_start): upper where the element's
    uniform (philox_uniform_grid, stream 0) is below its position, else lower; int32 (rows, cols)."""
    p = _contiguous(position, torch.float32)
    lo, up = _contiguous(lower, torch.int32), _contiguous(upper, torch.int32)
    rows, cols = p.shape
    codes = torch.empty((rows, cols), dtype=torch.int32)

    def job(a: int, b: int) -> tuple[object, ...]:
        return (key, row_start + a, b - a, col_start, cols, _at(p, a), _at(lo, a), _at(up, a), _at(codes, a))

    _parallel(_ext.stochastic_codes, rows, job, _MIN_DRAWS_PER_THREAD // max(1, cols))
    return codes


def feedback_block(
    rule: CodeValueRule,
    order: torch.Tensor,
    start: int,
    end: int,
    factor: torch.Tensor,
    work: torch.Tensor,
    uniforms: torch.Tensor,
    nearest: torch.Tensor,
    index: torch.Tensor,
    errors: torch.Tensor,
) -> None:
    """hardening.feedback.feedback_codes' column steps for columns [start, end) in place, bit for bit: the draws of
    those columns into `index`, their scaled errors into `errors` (end - start, rows), and the updates of the block's
    later columns in `work`. Arrays as the reference holds them, transposed to (cols, rows) in rounding order: work
    float64, uniforms float32, nearest and index int32 (table indices); order int64 (cols,), factor float64
    (cols, cols)."""
    cols, rows = work.shape
    table, scale, shift, negative = _rule_arrays(rule, rows * cols)

    def laid_out(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        return t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"

    columns = (cols, rows)
    if not (
        laid_out(work, columns, torch.float64) and laid_out(uniforms, columns, torch.float32)
        and laid_out(nearest, columns, torch.int32) and laid_out(index, columns, torch.int32)
        and laid_out(errors, (end - start, rows), torch.float64) and laid_out(factor, (cols, cols), torch.float64)
        and laid_out(order, (cols,), torch.int64)
    ):  # fmt: skip
        raise ValueError("feedback_block needs the reference's transposed CPU arrays")

    def job(a: int, b: int) -> tuple[object, ...]:
        def row(t: torch.Tensor) -> int:  # the job's first row in a (columns, rows) array
            return t.data_ptr() + a * t.element_size()

        return (
            table.data_ptr(), table.numel(), 0 if negative is None else negative.data_ptr(), scale.data_ptr(),
            0 if shift is None else shift.data_ptr(), rule.group, order.data_ptr(), cols, a, b - a, rows, start, end,
            factor.data_ptr(), row(work), row(uniforms), row(nearest), row(index), row(errors),
        )  # fmt: skip

    _parallel(_ext.feedback, rows, job, _MIN_FEEDBACK_ROWS_PER_THREAD)
