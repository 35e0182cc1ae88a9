"""Reference quantizers vs the real ones they are bit-exact with, timed side by side on the same tensor, on CPU.

    python benchmarks/bench_reference_vs_oracle.py [--rows 1024] [--cols 4096] [--repeats 3] [--formats nf4 q4_k ...]

Prints, per format, elements/s of our plain-torch reference (quantize = encode + pack) and of its oracle, and the
ratio ours/oracle (>1: ours is faster). Both see the same bf16-rounded random-normal weight in float32.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests/ oracles beside us

from qcbguard_kernels import format_names, get_format
from tests.oracles import oracle_for


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: caches, lazy imports, LUTs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=None)
    args = parser.parse_args()

    x = (torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16().float()
    n = x.numel()
    print(
        f"# {args.rows}x{args.cols} float32 weight, median of {args.repeats}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print("| format | oracle | ours Melem/s | oracle Melem/s | ours/oracle |")
    print("|---|---|---:|---:|---:|")
    for name in args.formats or format_names():
        fmt = get_format(name)
        oracle_name, oracle = oracle_for(name)
        ours = _median_seconds(lambda fmt=fmt: fmt.quantize(x, "w"), args.repeats)
        theirs = _median_seconds(lambda oracle=oracle: oracle(x), args.repeats)
        print(f"| {name} | {oracle_name} | {n / ours / 1e6:.1f} | {n / theirs / 1e6:.1f} | {theirs / ours:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
