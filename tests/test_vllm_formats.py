"""vLLM 0.33 online formats (fp8, mxfp8, mxfp4, int8_per_channel) and torchao 0.18 weight-only configs, byte for byte.

Oracles, named again in every test:
- torch's float8_e4m3fn cast: the e4m3 element rounding. The references round on their own e4m3 grid (midpoint
  comparisons, ties to the even code), so the cast is an independent check of every fp8 byte.
- torchao.prototype.mx_formats (to_mx with RCEIL for mxfp8 and EVEN for mxfp4, f32_to_f4_unpacked): MX scales and
  elements, through tests/oracles/torchao_mx.py.
- torchao's own quantizer on CPU: quantize_(nn.Linear, Int8WeightOnlyConfig()), quantize_(nn.Linear,
  PrototypeInt4WeightOnlyConfig(...)) (the int4 path torchao 0.18 runs on a CPU) and its tinygemm primitives.
- vLLM itself cannot run here (its CUDA kernels and Triton code need a GPU, and it must not become a dependency): the
  scale rules of fp8_* and int8_per_channel are restated below from vLLM 0.33.0's source (named in each oracle), and the
  element rounding is checked against torch's cast / torch's own dtype arithmetic.

Every test draws a fresh seed (tests.inputs.fresh_seed) and prints it on failure with the number of differing blocks and
the worst one.
"""

from __future__ import annotations

import pytest
import torch

from qcbguard_kernels import UnsupportedInputError, get_format
from qcbguard_kernels.formats.fp8 import e4m3_floor_code, e4m3_magnitudes, e4m3_round_magnitude
from qcbguard_kernels.formats.int_weight_only import INT4_GROUP_SIZES, TinygemmGroupInt4
from qcbguard_kernels.formats.mx import e2m1_round_magnitude, e8m0_to_float
from tests.inputs import fresh_seed, integer_tie_rows, standard_cases
from tests.oracles.torchao_mx import e2m1_rne_codes, to_mx_bytes
from tests.oracles.vllm_rules import vllm_fp8_cast_input, vllm_int8_rows

quantize_api = pytest.importorskip("torchao.quantization")
primitives = pytest.importorskip("torchao.quantization.quant_primitives")
int4_proto = pytest.importorskip("torchao.prototype.quantization.int4.inference_workflow")
torchao_utils = pytest.importorskip("torchao.quantization.utils")

SEED = fresh_seed()
SHAPES = [(7, 96), (130, 160), (257, 384), (1, 32), (3, 256)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_FORMATS = ["fp8_per_tensor", "fp8_per_channel", "fp8_per_block"]
ALL_FORMATS = [*FP8_FORMATS, "mxfp8", "mxfp4", "int8_per_channel", "torchao_int8", "torchao_int4"]
_QUIRK = 0.25 * (1 + 2.0**-23)  # the one float32 value vLLM's e2m1 conversion rounds down instead of to nearest


# ---- inputs ----


def _gen(salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + salt)


def _random_signs(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)


def _grid_tie_rows(rows: int, cols: int, grid: torch.Tensor, power: int, salt: int) -> torch.Tensor:
    """Every 32-group starts with the grid's top value * 2**power; the rest are exact midpoints of adjacent grid values
    (subnormal ones included) times 2**power with random signs, and some -0.0: each block's scale is then a power of
    two for every rule here, so all those elements are exact ties."""
    g = _gen(salt)
    mids = (grid[:-1] + grid[1:]) / 2
    x = mids[torch.randint(0, mids.numel(), (rows, cols), generator=g)] * _random_signs((rows, cols), g)
    x = x * 2.0**power
    x.view(rows, -1, 32)[..., 0] = grid[-1] * 2.0**power
    x.view(rows, -1, 32)[..., 5] = -0.0
    return x


def _at_max_rows(rows: int, cols: int, salt: int) -> torch.Tensor:
    """Rows with a random amax over 60 binades, hit exactly by +-amax several times: values at and (after rounding of
    amax * (1/scale)) beyond 448 * scale, plus values just below amax and fp8 subnormal results."""
    g = _gen(salt)
    amax = torch.exp2(torch.rand(rows, 1, generator=g) * 60 - 40) * (1 + torch.rand(rows, 1, generator=g))
    x = (torch.rand(rows, cols, generator=g) * 2 - 1) * amax
    x[:, ::7] = amax
    x[:, 3::11] = -amax
    x[:, 5::13] = amax * (1 - 2.0**-20)
    x[:, 1::17] = amax * 2.0**-17 * torch.rand(rows, 1, generator=g)  # deep in the e4m3 subnormals
    return x


def _int_tie_cases(rows: int, cols: int) -> dict[str, torch.Tensor]:
    """Exact ties between adjacent integer codes for each integer rule (scales are powers of two)."""
    vllm_ties = integer_tie_rows(rows, cols, 32, 127, SEED)  # amax 127/8: scale 1/8
    g = _gen(11)
    k = torch.randint(-128, 127, (rows, cols), generator=g).float()
    ao8 = (k + 0.5) / 8
    ao8[:, 0] = 127.5 / 8  # torchao: scale = 15.9375 / 127.5 = 1/8
    k4 = torch.randint(0, 15, (rows, cols), generator=g).float()
    ao4 = (k4 + 0.5) / 8
    ao4.view(rows, -1, 32)[..., 0] = 0.0  # group min 0, max 15/8: scale 1/8, zero 1, min_val 0
    ao4.view(rows, -1, 32)[..., 1] = 15 / 8
    return {"int8_ties": vllm_ties, "torchao_int8_ties": ao8, "torchao_int4_ties": ao4}


def _cases(rows: int, cols: int) -> dict[str, torch.Tensor]:
    """float32 cases: the standard contract set plus fp8 / e2m1 / integer ties, -0.0, fp8 subnormals and amax hits."""
    cases = standard_cases(rows, cols, 32, SEED)
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    cases["e4m3_ties"] = _grid_tie_rows(rows, cols, e4m3_magnitudes(), 0, 1)
    cases["e4m3_ties_scaled"] = _grid_tie_rows(rows, cols, e4m3_magnitudes(), -9, 2)
    cases["e2m1_ties"] = _grid_tie_rows(rows, cols, e2m1, 0, 3)
    cases["e2m1_ties_scaled"] = _grid_tie_rows(rows, cols, e2m1, -12, 4)
    cases["at_max"] = _at_max_rows(rows, cols, 5)
    cases.update(_int_tie_cases(rows, cols))
    return cases


def _typed_cases(rows: int, cols: int) -> list[tuple[str, torch.Tensor]]:
    """Every case in float32, bfloat16 and float16 (skipping conversions that overflow to infinity)."""
    out = []
    for case, x in _cases(rows, cols).items():
        for dtype in DTYPES:
            xd = x.to(dtype)
            if bool(torch.isfinite(xd).all()):
                out.append((f"{case}/{str(dtype).removeprefix('torch.')}", xd))
    return out


# ---- comparison ----


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns as int64 (NaN == NaN, -0.0 != 0.0): how packed bytes and stored scales are compared."""
    if t.dtype in (torch.float8_e4m3fn, torch.uint8, torch.int8, torch.bool):
        return t.contiguous().view(torch.uint8).to(torch.int64)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.contiguous().view(torch.int16).to(torch.int64)
    if t.dtype == torch.float32:
        return t.contiguous().view(torch.int32).to(torch.int64)
    return t.to(torch.int64)


def _check(ours: torch.Tensor, theirs: torch.Tensor, group: int, what: str) -> None:
    """Assert bit-exact equality; on failure name the seed, how many groups differ and show the worst one."""
    a, b = _bits(ours).reshape(-1, group), _bits(theirs).reshape(-1, group)
    assert a.shape == b.shape, f"{what}: shapes {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    differ = (a != b).any(dim=1).nonzero().flatten()
    if differ.numel():
        worst = int(differ[(a[differ] != b[differ]).sum(dim=1).argmax()])
        raise AssertionError(
            f"{what}: {differ.numel()} of {a.shape[0]} blocks differ (seed {SEED}); worst block {worst}:\n"
            f" ours   {a[worst].tolist()}\n theirs {b[worst].tolist()}"
        )


def _check_values(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Float values equal (NaN matches NaN, signed zeros compare equal)."""
    a, b = ours.reshape(-1, ours.shape[-1]).float(), theirs.reshape(-1, ours.shape[-1]).float()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    if not bool(same.all()):
        row = int((~same).sum(dim=1).argmax())
        raise AssertionError(
            f"{what}: {int((~same).any(dim=1).sum())} of {a.shape[0]} rows differ (seed {SEED}); worst row {row}:\n"
            f" ours   {a[row].tolist()}\n theirs {b[row].tolist()}"
        )


# ---- fp8 (oracle: torch's float8_e4m3fn cast of the values vLLM's rule feeds its kernel) ----


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", FP8_FORMATS)
def test_fp8_matches_torch_cast_of_vllm_rule(name, shape):
    """Oracle: torch's float8_e4m3fn cast of the float32 values vLLM 0.33's kernel casts (rule restated above); scales
    compared bit for bit. Checks ties, -0.0 (0x80), subnormal e4m3 results and values at/beyond 448 * scale."""
    fmt = get_format(name)
    for case, x in _typed_cases(*shape):
        q = fmt.quantize(x, case)
        r, scale = vllm_fp8_cast_input(name, x)
        _check(q.tensors["weight"], r.to(torch.float8_e4m3fn), shape[1], f"{name} {shape} {case} weight")
        _check(q.tensors["scale"], scale, scale.shape[-1], f"{name} {shape} {case} scale")
        expected = r.to(torch.float8_e4m3fn).float() * (scale if name != "fp8_per_block" else _expand(scale, shape))
        _check_values(fmt.dequantize(q), expected, f"{name} {case} dequantized")


def _expand(sf: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return sf.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]


def test_fp8_per_tensor_all_zero_tensor_writes_448_like_the_cuda_kernel():
    """Oracle: CUDA semantics spelled out (vLLM 0.33 static_scaled_fp8_quant): scale 0, 1/0 = inf, 0 * inf = NaN and
    fminf(NaN, 448) = 448, so every element, -0.0 included, is stored as +448 (0x7E); it still dequantizes to 0."""
    fmt = get_format("fp8_per_tensor")
    x = torch.zeros(3, 64)
    x[1] = -0.0
    q = fmt.quantize(x)
    assert bool((q.tensors["weight"].view(torch.uint8) == 0x7E).all())
    assert q.tensors["scale"].tolist() == [0.0]
    assert bool((fmt.dequantize(q) == 0).all())


def test_e4m3_rounding_matches_torch_cast_everywhere_it_matters():
    """Oracle: torch's float32 -> float8_e4m3fn cast (RNE; saturating in torch >= 2.12), on every midpoint, the floats
    one and two ulps either side of each midpoint and grid point, deep subnormals and a dense sweep up to 460."""
    grid = e4m3_magnitudes()
    mids = (grid[:-1] + grid[1:]) / 2
    pts = torch.cat([grid, mids])
    around = [pts]
    for steps in (1, 2):
        up = pts.clone()
        down = pts.clone()
        for _ in range(steps):
            up = torch.nextafter(up, torch.tensor(float("inf")))
            down = torch.nextafter(down, torch.tensor(0.0))
        around += [up, down]
    sweep = torch.arange(0, 0x43E60000, 4099, dtype=torch.int32).view(torch.float32)  # 0 .. 460
    v = torch.cat([*around, sweep, torch.tensor([2.0**-10, 2.0**-11, 1e-30, 0.0])]).clamp(max=460.0)
    ours = e4m3_round_magnitude(v)
    theirs = v.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    bad = (ours != theirs).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} values round differently, e.g. {v[bad[:5]].tolist()} (seed {SEED})"


def test_e4m3_floor_code_is_the_search_it_replaces():
    """e4m3_floor_code (from the float32 bits) against a binary search over the 127 magnitudes: every grid point, its
    float32 neighbours, the midpoints, random values over the whole range and beyond 448 (saturating)."""
    grid = e4m3_magnitudes()
    g = torch.Generator().manual_seed(SEED)
    v = torch.cat(
        [
            grid,
            torch.nextafter(grid, torch.tensor(0.0)),
            torch.nextafter(grid, torch.tensor(1e9)),
            (grid[1:] + grid[:-1]) / 2,
            torch.exp2(torch.rand(200_000, generator=g) * 44 - 32),
            torch.tensor([0.0, 2.0**-10, 2.0**-9, 2.0**-6, 448.0, 464.0, 480.0, 512.0, 1e30, float("inf")]),
        ]
    )
    search = (torch.searchsorted(grid, v, right=True) - 1).clamp(0, 126).to(torch.int32)
    assert torch.equal(e4m3_floor_code(v), search)


# ---- MX (oracle: torchao.prototype.mx_formats) ----


def _blocks_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], t.shape[-1] // 32, 32)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mxfp8_matches_torchao_rceil(shape):
    """Oracle: torchao to_mx(..., RCEIL). Its scale byte, clamp(ceil(log2(amax / 448)), -127, 127) + 127, is vLLM's
    (vLLM first clamps amax to 2**-126; both then give byte 0). Element bytes agree wherever the byte is >= 1. On byte-0
    blocks torchao does not scale (it uses 1.0 instead of 2**127) while vLLM divides by 2**-127: there the oracle is
    torch's float8_e4m3fn cast of x * 2**127 (exact in float32)."""
    fmt = get_format("mxfp8")
    for case, x in _typed_cases(*shape):
        q = fmt.quantize(x, case)
        t_scale, t_elem = to_mx_bytes(x, "e4m3")
        _check(q.tensors["scale"], t_scale, shape[1] // 32, f"mxfp8 {shape} {case} scale")
        theirs = _blocks_of(t_elem).clone()
        zero_scale = q.tensors["scale"] == 0
        if bool(zero_scale.any()):
            lifted = _blocks_of(x.float())[zero_scale] * 2.0**127
            theirs[zero_scale] = lifted.to(torch.float8_e4m3fn).view(torch.uint8)
        _check(_blocks_of(q.tensors["weight"]), theirs, 32, f"mxfp8 {shape} {case} elements")
        expected = _blocks_of(q.tensors["weight"].view(torch.float8_e4m3fn).float())
        expected = (expected * mx_fp_scale(q.tensors["scale"]).unsqueeze(-1)).reshape(x.shape)
        _check_values(fmt.dequantize(q), expected, f"mxfp8 {case} dequantized")


def mx_fp_scale(byte: torch.Tensor) -> torch.Tensor:
    """torchao's get_fp_scale (2**(byte - 127) as float32) for the dequantization check."""
    from torchao.prototype.mx_formats.mx_tensor import get_fp_scale

    return get_fp_scale(byte.view(torch.float8_e8m0fnu)).float()


def _vllm_fp4_scaled(x: torch.Tensor, byte: torch.Tensor) -> torch.Tensor:
    return (_blocks_of(x.float()) * (1.0 / e8m0_to_float(byte)).unsqueeze(-1)).reshape(x.shape)


def _rne_nibbles_with_kernel_quirk(scaled: torch.Tensor) -> torch.Tensor:
    """torchao's RNE e2m1 nibbles, except that vLLM's kernel sends exactly 0.25 * (1 + 2**-23) to zero."""
    nib = e2m1_rne_codes(scaled)
    quirk = scaled.abs() == _QUIRK
    return torch.where(quirk, nib & 0x08, nib)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mxfp4_matches_torchao_even(shape):
    """Oracle: torchao to_mx(..., EVEN) for the scale byte (the OCP rounded-floor rule vLLM's Triton kernel uses) and
    torchao's f32_to_f4_unpacked (round to nearest even, saturating) for the elements of x * 2**-(byte - 127).

    Where they differ, vLLM's rule is implemented: a block whose rounded amax overflows to infinity gets byte 254 in
    vLLM (log2(inf) clamped to 127) but 253 in torchao; byte-0 blocks are scaled by 2**127 in vLLM but by 2**126 in
    torchao (it floors the float scale at the smallest normal); and vLLM's bitwise conversion sends exactly
    0.25 * (1 + 2**-23) to 0 (its subnormal path drops the lowest mantissa bit), not to 0.5. torchao's own packed
    elements are compared too on the blocks where all of this is moot."""
    fmt = get_format("mxfp4")
    for case, x in _typed_cases(*shape):
        q = fmt.quantize(x, case)
        byte = q.tensors["scale"]
        t_scale, t_elem = to_mx_bytes(x, "e2m1")
        amax = _blocks_of(x.float()).abs().amax(dim=-1)
        overflow = ((amax.view(torch.int32).to(torch.int64) + 0x200000) >> 23) == 255
        _check(byte, torch.where(overflow, 254, t_scale), shape[1] // 32, f"mxfp4 {shape} {case} scale")
        nib = _rne_nibbles_with_kernel_quirk(_vllm_fp4_scaled(x, byte))
        packed = nib[..., 0::2] | (nib[..., 1::2] << 4)
        _check(q.tensors["weight"], packed, 16, f"mxfp4 {shape} {case} elements")
        agree = (byte >= 1) & ~overflow & ~(_blocks_of(_vllm_fp4_scaled(x, byte)).abs() == _QUIRK).any(dim=-1)
        ours_b = q.tensors["weight"].reshape(*byte.shape, 16)[agree]
        _check(ours_b, t_elem.reshape(*byte.shape, 16)[agree], 16, f"mxfp4 {shape} {case} vs to_mx elements")
        values = mx_kernels_f4_to_f32(nib) * mx_fp_scale(byte).repeat_interleave(32, dim=-1)
        _check_values(fmt.dequantize(q), values, f"mxfp4 {case} dequantized")


def mx_kernels_f4_to_f32(nibbles: torch.Tensor) -> torch.Tensor:
    """torchao's e2m1 nibble -> float32 decoder."""
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32

    return f4_unpacked_to_f32(nibbles)


def test_e2m1_kernel_rounding_is_rne_except_one_value():
    """Oracle: torchao's f32_to_f4_unpacked (RNE, saturating at 6) on every grid point and midpoint, two ulps around
    each, and a sweep of 2.1 million floats in [0, 8]: vLLM's bitwise conversion agrees everywhere except at exactly
    0.25 * (1 + 2**-23), which it rounds to 0 (its subnormal path drops the last mantissa bit)."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    pts = torch.cat([grid, (grid[:-1] + grid[1:]) / 2, torch.tensor([7.0, 8.0, 2.0**-126, 1e-40])])
    vals = [pts]
    up, down = pts.clone(), pts.clone()
    for _ in range(2):
        up = torch.nextafter(up, torch.tensor(float("inf")))
        down = torch.nextafter(down, torch.tensor(0.0))
        vals += [up, down]
    vals.append(torch.arange(0, 0x41000000, 521, dtype=torch.int32).view(torch.float32))
    v = torch.cat(vals)
    v = torch.cat([v, -v])
    ours = e2m1_round_magnitude(v) | (torch.signbit(v).to(torch.int32) << 3)
    theirs = e2m1_rne_codes(v).to(torch.int32)
    differ = ours != theirs
    assert v[differ].abs().unique().tolist() == [_QUIRK], f"unexpected e2m1 differences at {v[differ][:8].tolist()}"
    assert bool((ours[differ] & 7 == 0).all())


# ---- integer formats ----


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_per_channel_matches_vllm_rule_in_weight_dtype(shape):
    """Oracle: torch's own arithmetic in the weight dtype on vLLM 0.33's expression (restated in _vllm_int8_rows):
    for bf16 weights the quotient rounds to bf16 before the half-to-even rounding. Also a 3-D MoE stack, expert by
    expert."""
    fmt = get_format("int8_per_channel")
    for case, x in _typed_cases(*shape):
        q = fmt.quantize(x, case)
        codes, scales = vllm_int8_rows(x)
        _check(q.tensors["weight"], codes, shape[1], f"int8_per_channel {shape} {case} codes")
        _check(q.tensors["scale"], scales, 1, f"int8_per_channel {shape} {case} scale")
        _check_values(fmt.dequantize(q), codes.float() * scales.unsqueeze(1), f"int8_per_channel {case} dequantized")
    stack = torch.stack([_cases(*shape)["heavy_tailed"], _cases(*shape)["normal"]]).bfloat16()
    q = fmt.quantize(stack, "experts")
    for e in range(2):
        codes, scales = vllm_int8_rows(stack[e])
        _check(q.tensors["weight"][e], codes, shape[1], f"int8_per_channel expert {e}")
        _check(q.tensors["scale"][e], scales, 1, f"int8_per_channel expert {e} scale")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torchao_int8_matches_quantize_on_cpu(shape):
    """Oracle: torchao 0.18 quantize_(nn.Linear, Int8WeightOnlyConfig()) on CPU (Int8Tensor.from_hp:
    choose_qparams_affine SYMMETRIC with float32 eps, quantize_affine), in float32, bfloat16 and float16; dequantized by
    Int8Tensor itself."""
    fmt = get_format("torchao_int8")
    for case, x in _typed_cases(*shape):
        linear = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=x.dtype)
        linear.weight.data = x.clone()
        quantize_api.quantize_(linear, quantize_api.Int8WeightOnlyConfig())
        w = linear.weight
        q = fmt.quantize(x, case)
        _check(q.tensors["qdata"], w.qdata, shape[1], f"torchao_int8 {shape} {case} qdata")
        _check(q.tensors["scale"], w.scale, 1, f"torchao_int8 {shape} {case} scale")
        _check(q.tensors["zero_point"], w.zero_point, 1, f"torchao_int8 {shape} {case} zero_point")
        _check_values(fmt.dequantize(q), w.dequantize(torch.float32), f"torchao_int8 {case} dequantized")


def _tinygemm_oracle(x: torch.Tensor, group: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchao's tinygemm primitives as Int4OpaqueTensor.from_hp calls them: (int32 codes, scale, zero_point)."""
    block = [1, group]
    scale, zero = primitives._choose_qparams_affine_tinygemm(
        x, primitives.MappingType.ASYMMETRIC, block, torch.int32, 0, 15, eps, None, x.dtype
    )
    codes = primitives._quantize_affine_tinygemm(x, block, scale, zero, torch.int32, 0, 15)
    return codes, scale, zero


def _unpack_int4(qdata: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return torch.stack([qdata >> 4, qdata & 0x0F], dim=-1).reshape(shape).to(torch.int32)


INT4_CASES = [(g, shape) for g in INT4_GROUP_SIZES for shape in SHAPES if shape[1] % g == 0]


@pytest.mark.parametrize(("group", "shape"), INT4_CASES, ids=str)
def test_torchao_int4_matches_tinygemm_primitives(group, shape):
    """Oracle: torchao 0.18's _choose_qparams_affine_tinygemm / _quantize_affine_tinygemm (eps 1e-6, scale and zero in
    the weight dtype) and pack_tinygemm_scales_and_zeros; dequantized by _dequantize_affine_tinygemm. A NaN quotient
    (a group whose range overflows) casts to INT_MIN in torchao; its packers keep the low nibble, 0, and so do we."""
    fmt = get_format("torchao_int4") if group == 128 else TinygemmGroupInt4(f"torchao_int4_g{group}", group)
    for case, x in _typed_cases(*shape):
        q = fmt.quantize(x, case)
        codes, scale, zero = _tinygemm_oracle(x, group, 1e-6)
        _check(_unpack_int4(q.tensors["qdata"], x.shape), codes & 0xF, group, f"int4 g{group} {shape} {case} codes")
        sz = torchao_utils.pack_tinygemm_scales_and_zeros(
            scale.reshape(shape[0], -1), zero.reshape(shape[0], -1), x.dtype
        )
        _check(q.tensors["scale_and_zero"], sz, 2, f"int4 g{group} {shape} {case} scale_and_zero")
        theirs = primitives._dequantize_affine_tinygemm(
            codes, [1, group], scale, zero, torch.int32, 0, 15, output_dtype=torch.float32
        )
        _check_values(fmt.dequantize(q), theirs, f"int4 g{group} {case} dequantized")


@pytest.mark.parametrize("group", [32, 64, 128])
def test_torchao_int4_matches_cpu_quantize_(group):
    """Oracle: torchao 0.18 quantize_(nn.Linear, PrototypeInt4WeightOnlyConfig(group_size)) on CPU (Int4OpaqueTensor,
    the only int4 weight-only path torchao 0.18 runs on a CPU; it needs N % 16 == 0). scale_and_zero must be equal and
    aten._convert_weight_to_int4pack_for_cpu of our unpacked codes must give its qdata byte for byte."""
    fmt = get_format("torchao_int4") if group == 128 else TinygemmGroupInt4(f"torchao_int4_g{group}", group)
    for rows, cols in [(16, 256), (144, 384)]:
        for case, x in _typed_cases(rows, cols):
            linear = torch.nn.Linear(cols, rows, bias=False, dtype=x.dtype)
            linear.weight.data = x.clone()
            quantize_api.quantize_(linear, int4_proto.PrototypeInt4WeightOnlyConfig(group_size=group))
            w = linear.weight
            q = fmt.quantize(x, case)
            _check(q.tensors["scale_and_zero"], w.scale_and_zero, 2, f"int4 g{group} {case} scale_and_zero")
            ours = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_unpack_int4(q.tensors["qdata"], x.shape), 1)
            _check(ours, w.qdata, w.qdata.shape[-1], f"int4 g{group} ({rows}, {cols}) {case} qdata")


# ---- the contract on these inputs: cells, code values, packing ----


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_cells_code_values_and_packing(name):
    """Oracle: the Format contract itself. code_values(enc, nearest) == dequantize(quantize(x)); nearest is lower or
    upper; upper - lower in {0, 1}; position in [0, 1]; where lower != upper the weight lies between the values of
    lower and upper; packing the upper codes dequantizes to code_values(enc, upper)."""
    fmt = get_format(name)
    cols = 256
    for case, x in _typed_cases(5, cols):
        enc = fmt.encode(x, case)
        c = enc.cells
        q = fmt.pack(enc)
        _check_values(fmt.code_values(enc, c.nearest), fmt.dequantize(q), f"{name} {case} code_values(nearest)")
        width = c.upper - c.lower
        assert bool(((width == 0) | (width == 1)).all()), f"{name} {case}: wide cells"
        assert bool(((c.nearest == c.lower) | (c.nearest == c.upper)).all()), f"{name} {case}: nearest outside cell"
        assert bool(((c.position >= 0) & (c.position <= 1)).all()), f"{name} {case}: position outside [0, 1]"
        lo, hi = fmt.code_values(enc, c.lower), fmt.code_values(enc, c.upper)
        xf = x.float()
        # code values round once more than the weight's cell coordinate: allow a few float32 ulps at the cell ends
        slack = 2.0**-20 * torch.maximum(lo.abs(), hi.abs()) + 1e-44
        outside = (xf < torch.minimum(lo, hi) - slack) | (xf > torch.maximum(lo, hi) + slack)
        assert not bool(outside[width == 1].any()), f"{name} {case}: {int(outside[width == 1].sum())} weights outside"
        _check_values(fmt.dequantize(fmt.pack(enc, c.upper)), fmt.code_values(enc, c.upper), f"{name} {case} upper")


def test_int8_per_channel_rounds_the_bf16_quotient_first():
    """Oracle: hand-checked values. Row amax 0.25 gives the bf16 scale 0.0019683837890625; the float32 quotients
    -21.457, 6.5116, 23.442 and -12.527 round in bf16 to -21.5, 6.5, 23.5 and -12.5 and then half-to-even to -22, 6, 24
    and -12, where the float32 weights (same values) round to -21, 7, 23 and -13."""
    fmt = get_format("int8_per_channel")
    w = torch.tensor([[0.25, -0.042236328125, 0.0128173828125, 0.046142578125, -0.024658203125]])
    assert fmt.quantize(w.bfloat16()).tensors["weight"].tolist() == [[127, -22, 6, 24, -12]]
    assert fmt.quantize(w).tensors["weight"].tolist() == [[127, -21, 7, 23, -13]]


# ---- refusals ----


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("fp8_per_tensor", (2, 3, 32)),
        ("fp8_per_block", (64,)),
        ("mxfp8", (4, 48)),
        ("mxfp4", (4, 33)),
        ("torchao_int4", (4, 96)),
        ("torchao_int4", (2, 2, 128)),
        ("int8_per_channel", (64,)),
    ],
)
def test_unsupported_shapes_are_refused(name, shape):
    with pytest.raises(UnsupportedInputError, match=name):
        get_format(name).quantize(torch.randn(shape), "w")


def test_unknown_group_size_is_a_programming_error():
    with pytest.raises(ValueError, match="group_size"):
        TinygemmGroupInt4("x", group_size=48)
