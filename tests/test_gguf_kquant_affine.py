"""Q2_K, Q4_K and Q5_K against ggml's own C quantizer (libggml-base through ctypes), byte for byte.

Oracle: ggml_quantize_chunk with no importance matrix, i.e. quantize_row_q2_K_ref / q4_K_ref / q5_K_ref, and ggml's
dequantize_row_* for the values. The tests every k-quant family passes are in tests/gguf_checks.py; every run draws a
fresh seed, and it is in every assert message.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from qcbguard_kernels.formats.gguf_kquant_affine import pack_scale_min_k4, unpack_scale_min_k4
from tests.gguf_checks import KQuantOracleSuite


class TestAffineKQuants(KQuantOracleSuite):
    types: ClassVar[dict[str, tuple[int, int]]] = {"q2_k": (10, 2), "q4_k": (12, 4), "q5_k": (13, 5)}

    def search_nmax(self, fmt):
        return fmt.spec.nmax

    def cell_bounds(self, lo, hi, x):
        # The grid values d*q - dm are themselves rounded (two float32 roundings, and x + dm is rounded before the
        # division that places x on the grid): allow a few ulps of the magnitudes involved, nothing more.
        return lo, hi, 2.0**-21 * torch.maximum(torch.maximum(lo.abs(), hi.abs()), x.abs())


def test_scale_min_k4_packing_round_trips():
    """Every pair of 6-bit values in every sub-block slot, through get_scale_min_k4's layout."""
    values = torch.arange(64, dtype=torch.int32)
    ls = values.repeat_interleave(64).view(-1, 1).expand(-1, 8)
    lm = values.repeat(64).view(-1, 1).expand(-1, 8)
    ls = (ls + torch.arange(8, dtype=torch.int32)) % 64  # different values in different slots
    packed = pack_scale_min_k4(ls, lm)
    assert packed.shape == (4096, 12) and packed.dtype == torch.uint8
    sc, m = unpack_scale_min_k4(packed)
    assert torch.equal(sc, ls) and torch.equal(m, lm)
