"""The fused kernels as an H100 runs them: compiled for sm_90 on this CPU machine, their PTX read back.

The interpreter tests prove each kernel's arithmetic; these prove the GPU build keeps it and is built as intended:
- every kernel compiles for sm_90 (a kernel can run in the interpreter and still fail to compile);
- no multiply-add is contracted into an FMA and no division or square root is approximate (the CPU references round
  each operation once, and the exactness rules for the GGUF formats demand it);
- the hardening draw costs Philox work only when hardening, and a 4-aligned shard draws at least twice fewer Philox
  calls than one call per element (one call serves four adjacent columns; how many of the four one GPU thread holds
  depends on the kernel's layout).

CI compiles every kernel and every constexpr branch of it once (CI_FORMATS, about 3 minutes on 2 cores with a cold
Triton cache); the affine k-quants (Q2_K, Q4_K, Q5_K: 2 to 7 minutes per launch for ptxas) and fp8_per_block's
128 x 128 tile (40 s per launch) are left to the full run, `python -m tests.triton_sm90` (every format, ~13 minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
#: one format per kernel branch: absmax-int rules 0-3, the codebook kernel, fp8/MX granularities, legacy GGUF
#: (symmetric 4-bit, affine 5-bit, 8-bit), symmetric k-quants (Q3_K's descent, Q6_K's candidate search)
CI_FORMATS = (
    "bnb_int8",
    "int8_per_channel",
    "torchao_int8",
    "torchao_int4",
    "nf4",
    "fp8_per_tensor",
    "fp8_per_channel",
    "mxfp8",
    "mxfp4",
    "q4_0",
    "q5_1",
    "q8_0",
    "q3_k",
    "q6_k",
)


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, str], dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.triton_sm90", *CI_FORMATS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines()]
    return {(r["format"], r["variant"]): r for r in reports}


@pytest.mark.slow
@pytest.mark.parametrize("name", CI_FORMATS)
def test_kernel_compiles_for_hopper_exactly(compiled, name):
    variants = {v: compiled.get((name, v)) for v in ("plain", "hardened", "hardened_per_element")}
    assert all(variants.values()), f"{name}: not compiled for sm_90: {sorted(k for k, r in variants.items() if not r)}"
    for variant, report in variants.items():
        inexact = {k: report[k] for k in ("fma_f32", "div_approx_f32", "sqrt_approx_f32") if report[k]}
        assert not inexact, f"{name} {variant}: inexact instructions in the sm_90 PTX: {inexact}"
    assert variants["plain"]["mul_hi_u32"] == 0, f"{name}: round-to-nearest draws randomness"
    grouped, per_element = variants["hardened"]["mul_hi_u32"], variants["hardened_per_element"]["mul_hi_u32"]
    # at most half, give or take one multiply the compiler shares between calls (the counts are static, per thread)
    assert 0 < grouped <= per_element // 2 + 1, (
        f"{name}: Philox multiplies {grouped} grouped vs {per_element} per element"
    )
