"""The fused Triton kernels against the plain-torch references, byte for byte, hardening off and on.

Runs under TRITON_INTERPRET=1 on a CPU (CI) and on CUDA when a GPU is present: the same awkward inputs (zeros, -0.0,
constant and subnormal blocks, float32 extremes, exact ties), in float32, bfloat16 and float16, with shapes that are
not powers of two. Packed codes and scales compare exactly (rtol = atol = 0); a hardened comparison uses a fixed
deployment seed and nonzero shard offsets, so the Philox counters are checked too.
"""

from __future__ import annotations

import pytest
import torch

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
    "bnb_int8": ([(1, 40), (3, 17)], 1, None),
    "int8_per_channel": ([(3, 96)], 32, 127),
    "torchao_int8": ([(1, 33)], 1, None),
    "torchao_int4": ([(3, 256)], 128, 15),
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
