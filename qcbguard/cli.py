"""`qcbguard`: the command line.

qcbguard demo      build the embedded tiny model and show, per format, how its weights quantize
qcbguard formats   list the supported formats
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from qcbguard_kernels import QcbguardError, format_names, get_format

from .tiny_model import build_tiny_llama, linear_weight_names

__all__ = ["main"]

log = logging.getLogger("qcbguard")

# Weights this close to a rounding boundary (in units of the cell) are the ones whose code a perturbation of the
# full-precision value can flip: the room an attacker steers in, and the room hardening re-randomizes.
_NEAR_BOUNDARY = 0.05


def _sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    noise = (x - y).double().pow(2).sum()
    return float(10 * torch.log10(x.double().pow(2).sum() / noise)) if noise > 0 else float("inf")


def cmd_demo(args: argparse.Namespace) -> int:
    formats = [get_format(name) for name in args.formats or format_names()]  # refuse unknown names up front
    model = build_tiny_llama()
    names = linear_weight_names(model)
    elements = sum(model[n].numel() for n in names)
    print(f"embedded tiny Llama: {len(names)} linear weights, {elements:,} parameters (bf16)")
    header = f"{'format':<17}{'family':<15}{'bits/w':>7}{'SQNR dB':>9}{'steerable':>10}{'near-tie':>9}{'ms':>8}"
    print(header)
    print("-" * len(header))
    for fmt in formats:
        nbytes = 0
        steerable = near = 0
        originals, restored = [], []
        start = time.perf_counter()
        for n in names:
            enc = fmt.encode(model[n], n)
            q = fmt.pack(enc)
            nbytes += q.nbytes()
            steerable += int(enc.cells.steerable.sum())
            near += int(((enc.cells.position - 0.5).abs() < _NEAR_BOUNDARY).sum())
            originals.append(model[n].float().reshape(-1))
            restored.append(fmt.dequantize(q).reshape(-1))
        ms = (time.perf_counter() - start) * 1e3
        sqnr = _sqnr_db(torch.cat(originals), torch.cat(restored))
        print(
            f"{fmt.name:<17}{fmt.family:<15}{8 * nbytes / elements:>7.2f}{sqnr:>9.1f}"
            f"{steerable / elements:>10.1%}{near / elements:>9.1%}{ms:>8.0f}"
        )
    print(
        f"steerable: weights between two codes; near-tie: within {_NEAR_BOUNDARY:.0%} of a cell of the rounding "
        "boundary. Hardening (next) re-randomizes exactly these roundings."
    )
    return 0


def cmd_formats(args: argparse.Namespace) -> int:
    for name in format_names():
        fmt = get_format(name)
        print(f"{name:<17}{fmt.family:<15}{fmt.bits:>2} bits  {fmt.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcbguard", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize the embedded tiny model in every format and report")
    demo.add_argument("--formats", nargs="+", metavar="NAME", help="only these formats (default: all)")
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("formats", help="list supported formats").set_defaults(func=cmd_formats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except QcbguardError as exc:
        print(f"qcbguard: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
