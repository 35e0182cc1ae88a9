"""Our Philox stream is Triton's: tl.philox under TRITON_INTERPRET=1 draws the very same bits on CPU.

This is what lets a fused Triton kernel reproduce the plain-torch hardening byte for byte.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, triton, triton.language as tl
    from qcbguard_kernels.hardening.rng import philox4x32

    @triton.jit
    def draw(out_ptr, key, col_ptr, row_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        col = tl.load(col_ptr + i).to(tl.uint32)
        row = tl.load(row_ptr + i).to(tl.uint32)
        zero = col * 0
        a, b, c, d = tl.philox(key, col, row, zero, zero)
        for j, v in enumerate((a, b, c, d)):
            tl.store(out_ptr + j * N + i, v.to(tl.int64) & 0xFFFFFFFF)

    N = 128
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    col = torch.randint(0, 2**32, (N,), generator=g, dtype=torch.int64)
    row = torch.randint(0, 2**32, (N,), generator=g, dtype=torch.int64)
    key = int.from_bytes(os.urandom(8), "little")
    out = torch.zeros(4 * N, dtype=torch.int64)
    draw[(1,)](out, key, col, row, N=N)
    zero = torch.zeros(N, dtype=torch.int64)
    ours = torch.cat(philox4x32(key, col, row, zero, zero))
    assert torch.equal(out, ours), (key, (out != ours).sum())
    print("ok")
    """
)


def test_philox_is_bit_identical_with_triton():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
