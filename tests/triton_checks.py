"""What the Triton exactness tests share: device choice, inputs and byte comparisons.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py sets it before anything
imports triton); with one, the same tests run the compiled kernels on CUDA and compare with the reference on the CPU.
"""

from __future__ import annotations

import torch

from qcbguard_kernels.formats.base import QuantizedTensor
from tests.inputs import integer_tie_rows, standard_cases

__all__ = ["DEVICE", "DTYPES", "ON_GPU", "awkward_input", "byte_view", "same_packed"]

ON_GPU = torch.cuda.is_available()


DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def awkward_input(
    rows: int, cols: int, block: int, dtype: torch.dtype, seed: int, qmax: int | None = None
) -> torch.Tensor:
    """Every standard case (zeros, -0.0, constant, subnormal, tiny, huge, fp16-max ...) stacked along rows, plus
    exact integer ties when qmax is given; cases that do not survive the conversion to dtype (inf) are left out."""
    cases = standard_cases(rows, cols, block, seed)
    if qmax is not None:
        cases["ties"] = integer_tie_rows(rows, cols, block, qmax, seed)
    kept = [x.to(dtype) for x in cases.values() if bool(torch.isfinite(x.to(dtype)).all())]
    return torch.cat(kept)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """Any tensor as its raw bytes (float8 and other 1-byte floats compare bit for bit, -0.0 included)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same_packed(ours: QuantizedTensor, ref: QuantizedTensor, what: str) -> None:
    """Assert both packed tensors hold the same named tensors, shapes, dtypes and bytes; report the first difference."""
    assert ours.format == ref.format and ours.shape == ref.shape, what
    names = sorted(ref.tensors)
    assert sorted(ours.tensors) == names, f"{what}: tensors {sorted(ours.tensors)} vs {names}"
    for name, theirs in ref.tensors.items():
        mine = ours.tensors[name]
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, (
            f"{what} {name}: {mine.dtype} {tuple(mine.shape)} vs reference {theirs.dtype} {tuple(theirs.shape)}"
        )
        a, b = byte_view(mine), byte_view(theirs)
        if not torch.equal(a, b):
            rows_a, rows_b = (
                a.reshape(max(mine.shape[0], 1) if mine.dim() else 1, -1),
                b.reshape(max(theirs.shape[0], 1) if theirs.dim() else 1, -1),
            )
            bad = (rows_a != rows_b).any(-1)
            first = int(bad.nonzero()[0, 0])
            raise AssertionError(
                f"{what} {name}: {int(bad.sum())} of {bad.numel()} rows differ; first differing row {first}: "
                f"ours {rows_a[first][:32].tolist()} reference {rows_b[first][:32].tolist()}"
            )
