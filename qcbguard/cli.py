"""`qcbguard`: the command line.

qcbguard demo      build the embedded tiny model and show, per format, how its weights quantize
qcbguard formats   list the supported formats
qcbguard scan      look for a quantization-conditioned backdoor in a safetensors or GGUF checkpoint (exit 0 clean,
                   1 suspicious, 2 unreadable)
qcbguard calibrate collect calibration Hessians from a Hugging Face checkpoint, for calibrated hardening
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import time

import torch

from qcbguard_kernels import QcbguardError, format_names, get_format, native
from qcbguard_kernels.detection import LATTICE_NULL_HELP
from qcbguard_kernels.hardening import DeploymentSeed, harden_encoding

from .allocator import keep_freed_memory
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
    seed = DeploymentSeed.from_file(args.seed_file) if args.seed_file else DeploymentSeed.fresh()
    model = build_tiny_llama()
    names = linear_weight_names(model)
    elements = sum(model[n].numel() for n in names)
    print(f"embedded tiny Llama: {len(names)} linear weights, {elements:,} parameters (bf16); seed {seed.fingerprint}")
    print(f"CPU kernels: {native.status()}")
    header = (
        f"{'format':<17}{'bits/w':>7}{'RTN dB':>8}{'hard dB':>8}{'changed':>9}{'near-tie':>9}"
        f"{'detector':>9}{'flagged':>8}{'ms':>7}"
    )
    print(header)
    print("-" * len(header))
    for fmt in formats:
        nbytes = near = changed = flagged = 0
        worst = 0.0
        originals, rtn, hardened = [], [], []
        start = time.perf_counter()
        for n in names:
            enc = fmt.encode(model[n], n)
            packed, report = harden_encoding(model[n], enc, fmt, n, seed)
            nbytes += packed.nbytes()
            changed += report.codes_changed
            near += int(((enc.cells.position - 0.5).abs() < _NEAR_BOUNDARY).sum())
            worst = max(worst, abs(report.detector_distance))
            flagged += report.suspicious
            originals.append(model[n].float().reshape(-1))
            rtn.append(fmt.code_values(enc, enc.cells.nearest).reshape(-1))
            hardened.append(fmt.dequantize(packed).reshape(-1))
        ms = (time.perf_counter() - start) * 1e3
        w = torch.cat(originals)
        print(
            f"{fmt.name:<17}{8 * nbytes / elements:>7.2f}{_sqnr_db(w, torch.cat(rtn)):>8.1f}"
            f"{_sqnr_db(w, torch.cat(hardened)):>8.1f}{changed / elements:>9.1%}{near / elements:>9.1%}"
            f"{worst:>9.3f}{flagged:>8}{ms:>7.0f}"
        )
    print(
        "RTN/hard dB: SQNR of round-to-nearest and of hardened codes; changed: codes hardening moved off "
        f"round-to-nearest; near-tie: weights within {_NEAR_BOUNDARY:.0%} of a cell of a rounding boundary; "
        "detector: largest cell-position distance (flagged above 0.02)."
    )
    return 0


def cmd_formats(args: argparse.Namespace) -> int:
    for name in format_names():
        fmt = get_format(name)
        print(f"{name:<17}{fmt.family:<15}{fmt.bits:>2} bits  {fmt.description}")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from .scan import run_scan

    return run_scan(
        args.path, formats=args.formats, include=args.include, report=args.report, lattice_null=args.lattice_null
    )


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import calibrate_checkpoint

    generate_seed = args.generate_seed if args.generate_seed is not None else secrets.randbits(63)
    counts = calibrate_checkpoint(
        args.model, args.text, args.out, context=args.context, max_tokens=args.max_tokens,
        gguf_names=args.gguf_names, generate=args.generate, generate_seed=generate_seed,
    )  # fmt: skip
    source = "tokens" if args.generate is None else f"tokens the model wrote (--generate-seed {generate_seed})"
    print(f"wrote {args.out}: {counts['tensors']} Hessians from {counts['tokens']} {source}")
    if counts["expert_modules"]:
        print(f"  of which {counts['expert_modules']} mixture-of-experts layers: one Hessian per expert")
    if counts["other_experts"]:
        print(
            f"  {counts['other_experts']} expert module(s) of a layout calibrate does not read (biases, interleaved "
            "gate and up): no Hessians, hardened without feedback"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcbguard", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="harden the embedded tiny model in every format and report")
    demo.add_argument("--formats", nargs="+", metavar="NAME", help="only these formats (default: all)")
    demo.add_argument("--seed-file", help="seed file (64 hex characters, mode 600) for reproducible hardening")
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("formats", help="list supported formats").set_defaults(func=cmd_formats)
    scan = sub.add_parser("scan", help="detect tampering in a checkpoint (exit 0 clean, 1 suspicious, 2 unreadable)")
    scan.add_argument("path", help="a .safetensors file, a directory of them, or a .gguf file")
    scan.add_argument(
        "--formats", nargs="+", metavar="NAME", help="target formats to score under (default: one per grid)"
    )
    scan.add_argument("--include", metavar="REGEX", help="only tensors whose name matches")
    scan.add_argument("--report", metavar="JSON", help="write every tensor's scores here")
    scan.add_argument("--lattice-null", action="store_true", help=LATTICE_NULL_HELP)
    scan.set_defaults(func=cmd_scan)
    cal = sub.add_parser("calibrate", help="collect calibration Hessians (for qcbguard-gguf quantize --hessians)")
    cal.add_argument("model", help="a Hugging Face checkpoint directory (config, safetensors, tokenizer)")
    source = cal.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="calibration text (UTF-8): the kind the model will serve")
    source.add_argument("--generate", type=int, metavar="N", help="no text: the model writes N tokens itself")
    cal.add_argument("--generate-seed", type=int, help="seed of the generated text (default: fresh; in the file)")
    cal.add_argument("--out", required=True, help="output .safetensors file")
    cal.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    cal.add_argument("--max-tokens", type=int, help="read at most this many tokens of the text")
    cal.add_argument("--gguf-names", action="store_true", help="name the Hessians as llama.cpp names the tensors")
    cal.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    keep_freed_memory()
    try:
        return args.func(args)
    except (QcbguardError, OSError) as exc:
        print(f"qcbguard: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
