"""Q3_K and Q6_K against ggml's own C quantizer (libggml-base through ctypes), byte for byte.

Oracle: ggml_quantize_chunk with no importance matrix, i.e. quantize_row_q3_K_ref / quantize_row_q6_K_ref, and
ggml's dequantize_row_* for the values. The tests every k-quant family passes are in tests/gguf_checks.py; every run
draws a fresh seed, and it is in every assert message.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from qcbguard_kernels import get_format
from qcbguard_kernels.formats.gguf_common import QK_K
from qcbguard_kernels.formats.gguf_kquant_symmetric import pack_q3_k_scales, unpack_q3_k_scales
from tests.gguf_checks import SEED, KQuantOracleSuite, block_mismatch
from tests.oracles import ggml

SUB = 16  # sub-block length of both types
FP32_MAX = torch.finfo(torch.float32).max


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


class TestSymmetricKQuants(KQuantOracleSuite):
    types: ClassVar[dict[str, tuple[int, int]]] = {"q3_k": (11, 3), "q6_k": (14, 6)}

    def search_nmax(self, fmt):
        return fmt.spec.offset

    def extra_cases(self, rows, cols):
        return {"extreme": _extreme_rows(rows, cols // QK_K, SEED)}

    def cell_bounds(self, lo, hi, x):
        low_end, high_end = torch.minimum(lo, hi), torch.maximum(lo, hi)  # values descend in L where sub_d < 0
        # x / sub_d is rounded once before C rounds it, and each grid value sub_d * l once: allow a few ulps of the
        # magnitudes involved, nothing more.
        return low_end, high_end, 2.0**-21 * torch.maximum(high_end.abs().nan_to_num(0.0), x.abs())

    def check_cell_order(self, enc, x, lo, hi, msg):
        sub_d = enc.scales["sub_d"].repeat_interleave(SUB, -1).view(x.shape)
        ascending = (hi > lo) == (sub_d > 0)
        assert bool(ascending[enc.cells.steerable].all()), f"{msg}: upper is not the next grid point in L"


@pytest.mark.parametrize("name", list(TestSymmetricKQuants.types))
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
    assert torch.equal(ours, theirs), block_mismatch(ours, theirs, fmt.type_size, f"{name} extreme")


def test_q3_k_scale_packing_round_trips():
    """Every 6-bit value in every one of the 16 sub-block slots, through the 12-byte layout."""
    values = torch.arange(64, dtype=torch.int32).view(-1, 1)
    stored = (values + 5 * torch.arange(16, dtype=torch.int32)) % 64  # different values in different slots
    packed = pack_q3_k_scales(stored)
    assert packed.shape == (64, 12) and packed.dtype == torch.uint8
    assert torch.equal(unpack_q3_k_scales(packed), stored)
