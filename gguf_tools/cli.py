"""`qcbguard-gguf`: harden and quantize GGUF files for llama.cpp, and scan them for tampering.

    qcbguard-gguf quantize model-f16.gguf model-Q4_K_M.gguf Q4_K_M [--no-harden] [--seed-file F] ...
    qcbguard-gguf scan model.gguf [--report scan.json] [--metrics-file scan.prom]
    qcbguard-gguf dequantize model-Q4_1.gguf model-f16.gguf   (a full-precision stand-in for tests and benchmarks)

Every input is validated before anything is written; outputs go to a temporary file beside the target and are
renamed into place when complete. Bad input or a failed write: one line on stderr, exit code 2, no output left.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from qcbguard.allocator import keep_freed_memory
from qcbguard.atomic import write_json_atomic
from qcbguard_kernels import QcbguardError
from qcbguard_kernels.detection import DETECTOR_SAMPLE, LATTICE_NULL_HELP
from qcbguard_kernels.hardening import HardeningConfig

from .mixtures import ALIASES, MIXTURES
from .quantize import QuantizeOptions, QuantizeResult, layer_type, quantize_file

__all__ = ["main"]

log = logging.getLogger("qcbguard.gguf")
EXIT_BAD_INPUT = 2


class _Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, i: int, n: int, name: str) -> None:
        if not self.enabled:
            return
        width = 30
        done = width * i // max(n, 1)
        end = "\n" if i >= n else ""
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {name[:40]:<40}{end}")
        sys.stderr.flush()


def _check_output_dir(path: str | None, what: str) -> None:
    if path is None:
        return
    parent = Path(path).parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise QcbguardError(f"{what} directory {str(parent)!r} does not exist or is not writable")


def _export_metrics(result: QuantizeResult, args: argparse.Namespace, mode: str) -> None:
    if not (args.metrics_file or args.pushgateway):
        return
    from qcbguard.metrics import QcbguardMetrics, write_textfile

    metrics = QcbguardMetrics()
    metrics.set_info(adapter="gguf", mode=mode, seed_fingerprint=result.seed_fingerprint or "none")
    model = Path(args.input).stem
    for p in result.plans:
        rep = result.reports.get(p.name)
        if rep is not None:
            metrics.record(rep, model=model, layer_type=layer_type(p.name))
        elif p.quantizable and p.target.quantized:
            reason = "pre-quantized" if not p.rewrite else "not-hardened"
            metrics.record_skipped(model=model, layer_type=layer_type(p.name), reason=reason)
    if args.metrics_file:
        write_textfile(metrics, args.metrics_file)
    if args.pushgateway:
        from prometheus_client import push_to_gateway

        try:
            push_to_gateway(args.pushgateway, job="qcbguard-gguf", registry=metrics.registry)
        except OSError as e:  # URLError, refused connection, timeout: the output stands, the report did not arrive
            raise QcbguardError(
                f"{result.output} was written, but pushing its metrics to {args.pushgateway} failed: {e}"
            ) from None


def cmd_quantize(args: argparse.Namespace) -> int:
    _check_output_dir(args.report, "report")
    _check_output_dir(args.metrics_file, "metrics file")
    config = HardeningConfig(
        mode=args.mode,
        on_suspicious=args.on_suspicious,
        seed_file=args.seed_file,
        detector_sample=args.detector_sample,
        detector_lattice_null=args.detector_lattice_null,
    )
    options = QuantizeOptions(
        output_type=args.type,
        harden=not args.no_harden,
        config=config,
        allow_requantize=args.allow_requantize,
        threads=args.threads,
        backend=args.backend,
        hessians=args.hessians,
    )
    progress = _Progress(sys.stderr.isatty() and not args.quiet)
    result = quantize_file(args.input, args.output, options, progress=progress)
    mode = "off" if args.no_harden else args.mode
    if args.report:
        write_json_atomic(args.report, result.as_dict())
    _export_metrics(result, args, mode)
    flagged = [n for n, r in result.reports.items() if r.suspicious]
    changed = sum(r.codes_changed for r in result.reports.values())
    log.info(
        "wrote %s (%s, %d tensors, hardening %s, %d codes changed, %.1f s)",
        result.output,
        result.mixture.name,
        len(result.plans),
        mode,
        changed,
        result.elapsed,
    )
    if flagged:
        print(f"qcbguard-gguf: detector flagged {len(flagged)} tensor(s): {', '.join(flagged[:5])}", file=sys.stderr)
    return 0


def cmd_dequantize(args: argparse.Namespace) -> int:
    from .dequantize import dequantize_file

    _check_output_dir(args.output, "output")
    dequantize_file(args.input, args.output, args.type)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcbguard-gguf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a full-precision GGUF file like llama-quantize, hardened")
    q.add_argument("input", help="F32, F16 or BF16 GGUF file (llama.cpp's converter output)")
    q.add_argument("output", help="output GGUF file")
    q.add_argument("type", help=f"output type: {', '.join([*MIXTURES, *ALIASES])}")
    q.add_argument("--no-harden", action="store_true", help="plain round-to-nearest: byte-identical to llama-quantize")
    q.add_argument("--seed-file", help="deployment seed file (64 hex characters, mode 600); default: a fresh seed")
    q.add_argument("--mode", choices=("harden", "detect-only"), default="harden")
    q.add_argument("--on-suspicious", choices=("report", "refuse"), default="report")
    q.add_argument(
        "--detector-sample",
        type=int,
        default=DETECTOR_SAMPLE,
        metavar="N",
        help=f"weights the detector reads per tensor at most (default {DETECTOR_SAMPLE})",
    )
    q.add_argument("--detector-lattice-null", action="store_true", help=LATTICE_NULL_HELP)
    q.add_argument("--report", help="write a per-tensor JSON report here")
    q.add_argument("--metrics-file", help="write Prometheus metrics here (node_exporter textfile format)")
    q.add_argument("--pushgateway", help="push the metrics to this Prometheus Pushgateway URL")
    q.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    q.add_argument(
        "--backend",
        choices=("auto", "triton", "reference"),
        default="auto",
        help="auto: the fused Triton kernels on a GPU when one is present; reference: the plain-torch quantizers",
    )
    q.add_argument(
        "--hessians", help="calibration Hessians (qcbguard calibrate --gguf-names): calibrated hardening where given"
    )
    q.add_argument("--allow-requantize", action="store_true", help="re-quantize already-quantized tensors (weaker)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.add_argument("-v", "--verbose", action="store_true")
    q.set_defaults(func=cmd_quantize)

    from .scan import add_scan_parser

    add_scan_parser(sub)

    d = sub.add_parser("dequantize", help="write a quantized GGUF file's values as F16 (a full-precision stand-in)")
    d.add_argument("input")
    d.add_argument("output")
    d.add_argument("--type", choices=("F16", "F32"), default="F16")
    d.add_argument("-v", "--verbose", action="store_true")
    d.set_defaults(func=cmd_dequantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    keep_freed_memory()
    try:
        return args.func(args)
    except QcbguardError as e:
        print(f"qcbguard-gguf: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        print(f"qcbguard-gguf: error: cannot write or read{where}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
