"""Fused Triton quantize(+harden) kernels vs the standard quantizer and a device-to-device copy, on a GPU.

    python benchmarks/bench_triton_kernels.py [--shape gate_proj] [--formats nf4 q4_0 ...] [--whole-model]

For each format, on a Llama-3-8B-shaped bf16 weight (random normal), one run measures side by side:
  hardened  our fused kernel, hardening on (scales + Philox draw + packing in one pass)
  plain     the same kernel with hardening off (round-to-nearest)
  standard  the quantizer users run today: torch's e4m3 cast with vLLM's scale rule (fp8), bitsandbytes on CUDA
            (bnb formats, when installed), our plain-torch reference on the GPU otherwise (GGUF, MX, torchao rules;
            on the CPU where a reference cannot run on CUDA tensors, and said so in the table)
  copy      a device-to-device copy of the weight's bytes (the bandwidth ceiling)
and prints median time, GB/s (bytes read + written) and the ratios hardened/plain and hardened GB/s / copy GB/s.
`--whole-model` also hardens every linear weight of a 32-layer Llama-3-8B shape (224 matrices) per format: the
kernels alone, and once as the vLLM hook and the GGUF tool run it (dispatch.harden_fused: both launches, the codes
changed, and the detector on its CPU sample of at most 2**20 weights per tensor).
Refuses to run without CUDA: the interpreter on a CPU measures nothing useful.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from qcbguard_kernels import format_names, get_format
from qcbguard_kernels.dispatch import harden_fused
from qcbguard_kernels.hardening import DeploymentSeed
from qcbguard_kernels.triton import quantize_triton, supports

# Llama-3-8B linear weights [out, in]; 32 layers
LLAMA3_8B = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
LAYERS = 32


def _time(fn: Callable[[], object]) -> float:
    """Median seconds of fn on the GPU (triton.testing.do_bench: warm-up, L2 flush, CUDA events)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def _out_bytes(q: object) -> int:
    if hasattr(q, "nbytes") and callable(q.nbytes):
        return q.nbytes()
    tensors = q if isinstance(q, (tuple, list)) else (q,)
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
        elif isinstance(t, (tuple, list)):
            total += _out_bytes(t)
        elif hasattr(t, "absmax"):  # bitsandbytes QuantState
            total += t.absmax.numel() * t.absmax.element_size()
    return total


def _standard(name: str, x: torch.Tensor) -> tuple[str, Callable[[], object]]:
    """The quantizer users run today for this format, on the GPU."""
    if name.startswith("fp8_per"):
        granularity = name.removeprefix("fp8_per_")
        if granularity in ("tensor", "channel"):
            dim = None if granularity == "tensor" else 1

            def fp8() -> object:
                amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
                scale = amax.float() / 448.0
                return (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale

            return "torch e4m3 cast", fp8
    if name in ("nf4", "fp4", "nf4_dq", "bnb_int8"):
        try:
            import bitsandbytes.functional as bnb

            if name == "bnb_int8":
                return "bitsandbytes", lambda: bnb.int8_vectorwise_quant(x.half())
            return "bitsandbytes", lambda: bnb.quantize_4bit(
                x, blocksize=64, quant_type=name[:3], compress_statistics=name == "nf4_dq"
            )
        except Exception:  # no CUDA build of bitsandbytes: fall through to our reference
            pass
    fmt = get_format(name)
    try:
        fmt.quantize(x[:8], "w")
    except (RuntimeError, TypeError):  # a reference that builds CPU tensors inside: time it where it runs
        cpu = x.cpu()
        return "our torch reference, on the CPU", lambda: fmt.quantize(cpu, "w")
    return "our torch reference", lambda: fmt.quantize(x, "w")


def _row(name: str, x: torch.Tensor, seed: DeploymentSeed, copy_s: float) -> str:
    fmt = get_format(name)
    read = x.numel() * x.element_size()
    if not supports(fmt):
        return f"| {name} | (no Triton kernel) | | | | | |"
    fmt.validate(x, "w")
    key = seed.key_for("w")
    hard = quantize_triton(fmt, x, key)
    written = hard.nbytes()
    hard_s = _time(lambda: quantize_triton(fmt, x, key))
    plain_s = _time(lambda: quantize_triton(fmt, x, None))
    label, standard = _standard(name, x)
    try:
        std_out = standard()
        std_s = _time(standard)
        std_cell = f"{std_s * 1e3:.3f} ({label}, {(read + _out_bytes(std_out)) / std_s / 1e9:.0f} GB/s)"
    except Exception as err:  # report, keep measuring the other formats
        std_cell = f"failed: {type(err).__name__}"
    gbs = (read + written) / hard_s / 1e9
    copy_gbs = 2 * read / copy_s / 1e9
    return (
        f"| {name} | {hard_s * 1e3:.3f} | {gbs:.0f} | {plain_s * 1e3:.3f} | {hard_s / plain_s:.3f} | "
        f"{gbs / copy_gbs:.2f} | {std_cell} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(LLAMA3_8B), default="gate_proj")
    parser.add_argument("--formats", nargs="+", default=None)
    parser.add_argument("--whole-model", action="store_true", help="also harden all 224 linear weights per format")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_triton_kernels: needs a CUDA GPU (none found); nothing measured", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_triton_kernels: needs the triton package; nothing measured", file=sys.stderr)
        return 2

    rows, cols = LLAMA3_8B[args.shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, cols, generator=g, device="cuda").to(torch.bfloat16)
    seed = DeploymentSeed.fresh()
    copy_s = _time(lambda: torch.empty_like(x).copy_(x))
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | {args.shape} {rows}x{cols} bf16")
    print(f"# device-to-device copy: {copy_s * 1e3:.3f} ms, {2 * x.numel() * 2 / copy_s / 1e9:.0f} GB/s")
    print("| format | hardened ms | hardened GB/s | plain ms | hardened/plain | of copy bw | standard ms |")
    print("|---|---:|---:|---:|---:|---:|---|")
    names = args.formats or format_names()
    for name in names:
        print(_row(name, x, seed, copy_s), flush=True)

    if args.whole_model:
        weights = {k: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16) for k, s in LLAMA3_8B.items()}
        print("\n| format | whole 8B model hardened, kernels only, s | as the adapters run it (harden_fused), s |")
        print("|---|---:|---:|")
        for name in names:
            fmt = get_format(name)
            if not supports(fmt) or any(w.shape[-1] % getattr(fmt, "block_size", 1) for w in weights.values()):
                continue
            keys = {k: seed.key_for(f"layers.0.{k}") for k in weights}

            def whole(fmt=fmt, keys=keys) -> None:
                for _layer in range(LAYERS):
                    for k, w in weights.items():
                        quantize_triton(fmt, w, keys[k])

            whole()
            torch.cuda.synchronize()
            times = []
            for _ in range(3):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                whole()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            # the adapters' path: round-to-nearest and hardened launches, codes changed, the detector on its CPU sample
            start_s = time.perf_counter()
            for _layer in range(LAYERS):
                for k, w in weights.items():
                    harden_fused(w, fmt, f"layers.0.{k}", seed, backend="triton")
            torch.cuda.synchronize()
            adapters_s = time.perf_counter() - start_s
            print(f"| {name} | {statistics.median(times):.3f} | {adapters_s:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
