"""GGUF legacy formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) against ggml's C quantizer, byte for byte.

Oracle: ggml_quantize_chunk from libggml-python's libggml-base (quantize_row_<type>_ref, no importance matrix), and
ggml's dequantize_row_<type> for the values.
"""

from __future__ import annotations

import pytest
import torch

from qcbguard_kernels import get_format
from tests.gguf_checks import SEED, block_mismatch
from tests.inputs import integer_tie_rows, standard_cases
from tests.oracles.ggml import ggml_dequantize, ggml_quantize

TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
SHAPES = [(1, 32), (3, 96), (7, 224), (5, 2560)]


def _tie_cases(fmt, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """Blocks whose scale is a power of two so that grid coordinates land exactly on k + 0.5."""
    if fmt.name == "q8_0":
        return {"ties": integer_tie_rows(rows, cols, 32, 127, SEED)}
    half = 1 << (fmt.bits - 1)
    g = torch.Generator().manual_seed(SEED)
    k = torch.randint(0, (1 << fmt.bits) - 1, (rows, cols), generator=g).float()
    if fmt.affine:  # min = 0 and max = qmax at scale 1/8: d = 1/8 exactly
        x = (k + 0.5) / 8
        b = x.view(rows, -1, 32)
        b[..., 0] = 0.0
        b[..., 1] = fmt.qmax / 8
        return {"ties": x}
    x = (k - half + 0.5) / 8  # max = -half/8 gives d = 1/8
    x.view(rows, -1, 32)[..., 0] = -half / 8
    return {"ties": x}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("type_name", TYPES)
def test_matches_ggml(type_name, shape):
    fmt = get_format(type_name)
    rows, cols = shape
    cases = standard_cases(rows, cols, 32, SEED) | _tie_cases(fmt, rows, cols)
    for case, x in cases.items():
        ours = fmt.quantize(x, case).tensors["blocks"]
        theirs = ggml_quantize(type_name, x)
        assert torch.equal(ours, theirs), block_mismatch(ours, theirs, fmt.type_size, f"{type_name} {case}")
        q = fmt.quantize(x, case)
        ref = ggml_dequantize(type_name, theirs, cols)
        assert torch.equal(fmt.dequantize(q).nan_to_num(), ref.nan_to_num()), f"{type_name} {case} dequantized"


def test_bf16_and_fp16_inputs_quantize_as_their_float32_values():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(SEED))
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        for type_name in TYPES:
            ours = get_format(type_name).quantize(low).tensors["blocks"]
            assert torch.equal(ours, ggml_quantize(type_name, low.float())), (type_name, dtype)
