"""Compile every fused kernel for an H100 (sm_90) on a machine without a GPU, and read what the compiler emitted.

The interpreter proves the kernels' arithmetic, not that the GPU build keeps it: a kernel can run under
TRITON_INTERPRET=1 yet fail to compile, and a compiled kernel could contract a multiply-add into an FMA or take an
approximate division. Triton compiles ahead of time without a device (its bundled ptxas does the last step), so this
module runs each family's real launcher with CPU tensors, captures the launch instead of running it, compiles the
captured specialization for sm_90 and reports, from the PTX, the instructions that decide exactness and cost.

Runs in a process of its own (``python -m tests.triton_sm90 [FORMAT ...]``, prints one JSON line per kernel):
under pytest the session sets TRITON_INTERPRET=1, and interpreted functions cannot be compiled.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("tests.triton_sm90 compiles kernels: run it without TRITON_INTERPRET=1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from qcbguard_kernels import format_names, get_format
from qcbguard_kernels.triton import quantize_triton

HOPPER = GPUTarget("cuda", 90, 32)
_TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.float8_e4m3fn: "fp8e4nv",
}
_LAUNCH_OPTIONS = ("enable_fp_fusion", "enable_reflect_ftz", "num_warps", "num_stages")

# PTX instructions counted per kernel: FMA would break bit-exactness with the CPU references; approximate division
# and square root too; mul.hi.u32 is Philox's multiply (two per round, ten rounds per call).
PTX_COUNTS = {
    "fma_f32": r"\bfma\.rn(\.ftz)?\.f32\b",
    "div_approx_f32": r"\bdiv\.(approx|full)(\.ftz)?\.f32\b",
    "sqrt_approx_f32": r"\bsqrt\.approx(\.ftz)?\.f32\b",
    "mul_hi_u32": r"\bmul\.hi\.u32\b",
}


def _type_of(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return "i32"
        return "i64" if value < 2**63 else "u64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


@contextmanager
def captured_launches() -> Iterator[list[tuple[JITFunction, dict[str, object], dict[str, object]]]]:
    """Replace JITFunction.run: record (kernel, bound arguments, launch options) instead of launching."""
    launches: list[tuple[JITFunction, dict[str, object], dict[str, object]]] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
        bound = dict(zip(self.arg_names, args, strict=False)) | kwargs
        launches.append((self, bound, options))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def compile_for_hopper(kernel: JITFunction, bound: dict[str, object], options: dict[str, object]) -> str:
    """The PTX of one captured launch, compiled for sm_90 with the launch's own options."""
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            signature[param.name] = _type_of(value)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=HOPPER, options=options)
    return compiled.asm["ptx"]


def ptx_counts(ptx: str) -> dict[str, int]:
    return {name: len(re.findall(pattern, ptx)) for name, pattern in PTX_COUNTS.items()}


#: the launches compiled per format: (variant, hardened, column offset of the shard). A shard starting at column 1
#: cannot draw one Philox call per four columns, so it shows what every element drawing its own call costs.
VARIANTS = (("plain", False, 0), ("hardened", True, 0), ("hardened_per_element", True, 1))


def kernels_of(fmt_name: str, shape: tuple[int, int] = (8, 512)) -> Iterator[dict[str, object]]:
    """Compile fmt's kernel in every VARIANT for a bfloat16 weight; one report per launch."""
    fmt = get_format(fmt_name)
    x = torch.randn(shape).to(torch.bfloat16)
    for variant, hardened, col_offset in VARIANTS:
        with captured_launches() as launches:
            quantize_triton(fmt, x, 0x9E3779B97F4A7C15 if hardened else None, 0, col_offset)
        for kernel, bound, options in launches:
            ptx = compile_for_hopper(kernel, bound, options)
            yield {"format": fmt_name, "kernel": kernel.__name__, "variant": variant, **ptx_counts(ptx)}


def main(argv: list[str]) -> int:
    for name in argv or format_names():
        for report in kernels_of(name):
            print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
