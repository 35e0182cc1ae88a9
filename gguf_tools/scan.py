"""`qcbguard-gguf scan FILE.gguf`: the tamper detector over every weight of a GGUF file.

Full-precision weights (F32, F16, BF16) are scored against the GGUF formats llama-quantize could round them to
(qcbguard_kernels.detection.scan): a quantization-conditioned backdoor parks weights inside the cells of one of those
quantizers, which shows as cell positions piled up away from where clean weights sit. Already-quantized tensors are
reported as not scannable: their full-precision values are gone, and with them the evidence; scan the checkpoint the
file was quantized from. Tensors llama-quantize never quantizes (norms, 1-D tensors, routers) are skipped.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcbguard_kernels.detection import (
    LATTICE_NULL_HELP,
    ModelVerdict,
    TensorScan,
    default_scan_formats,
    sample_row_ranges,
    scan_tensor,
    scan_verdict,
)

from .constants import FULL_PRECISION_TYPES
from .mixtures import allows_quantization, category
from .reader import GgufFile
from .tensors import read_rows

__all__ = ["ScanResult", "add_scan_parser", "scan_file"]


@dataclass
class ScanResult:
    path: Path
    scanned: list[TensorScan] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, reason)
    verdict: ModelVerdict | None = None

    @property
    def suspicious(self) -> bool:
        return bool(self.verdict is not None and self.verdict.suspicious)

    def as_dict(self) -> dict[str, object]:
        return {
            "file": str(self.path),
            "verdict": self.verdict.as_dict() if self.verdict is not None else None,
            "tensors": [s.as_dict() for s in self.scanned],
            "skipped": [{"name": n, "type": t, "reason": r} for n, t, r in self.skipped],
        }


def scan_file(path: str | Path, all_formats: bool = False, lattice_null: bool = False) -> ScanResult:
    """Score every quantizable full-precision tensor of the file; see the module docstring. `lattice_null`:
    cell_score's experimental lattice null (own_lattice)."""
    result = ScanResult(Path(path))
    with GgufFile(path) as f:
        for info in f.tensors:
            if not allows_quantization(info.name, info.ne):
                result.skipped.append((info.name, info.type.name, "never quantized by llama-quantize"))
                continue
            if info.type.name not in FULL_PRECISION_TYPES:
                reason = (
                    "already quantized: the full-precision values are gone; scan the checkpoint it came from"
                    if info.type.quantized
                    else f"{info.type.name} is not a weight type"
                )
                result.skipped.append((info.name, info.type.name, reason))
                continue
            # only the rows the detector samples are read: memory and time stay bounded on huge embeddings
            ranges = sample_row_ranges(info.n_rows, info.ne[0])
            x = torch.cat([read_rows(f, info, start, end) for start, end in ranges])
            formats = default_scan_formats(x)
            if not all_formats:
                formats = [fmt for fmt in formats if fmt.family.startswith("gguf")]
            if not formats:
                result.skipped.append((info.name, info.type.name, "no GGUF format accepts its row length"))
                continue
            shape = tuple(reversed(info.ne))
            result.scanned.append(scan_tensor(x, info.name, formats, shape=shape, own_lattice=lattice_null))
    result.verdict = scan_verdict(result.scanned)
    return result


def cmd_scan(args: argparse.Namespace) -> int:
    from qcbguard.atomic import write_json_atomic

    from .cli import _check_output_dir

    _check_output_dir(args.report, "report")
    _check_output_dir(args.metrics_file, "metrics file")
    result = scan_file(args.input, all_formats=args.all_formats, lattice_null=args.lattice_null)
    if args.report:
        write_json_atomic(args.report, result.as_dict())
    if args.metrics_file:
        _write_metrics(result, args)
    n_flagged = len(result.verdict.flagged) if result.verdict is not None else 0
    caution = result.verdict.caution() if result.verdict is not None else ""
    print(
        f"{args.input}: {len(result.scanned)} tensors scanned, {len(result.skipped)} skipped, "
        f"{n_flagged} flagged: {'SUSPICIOUS' if result.suspicious else 'clean'}{caution}"
    )
    for name in list(result.verdict.flagged)[:20] if result.verdict is not None else []:
        print(f"  flagged: {name}")
    return 1 if result.suspicious else 0


def _write_metrics(result: ScanResult, args: argparse.Namespace) -> None:
    from qcbguard.metrics import QcbguardMetrics, write_textfile

    metrics = QcbguardMetrics()
    metrics.set_info(adapter="gguf-scan", mode="scan", seed_fingerprint="none")
    model = Path(args.input).stem
    for scan in result.scanned:
        for finding in scan.findings:
            labels = {"model": model, "layer_type": category(scan.name), "format": finding.score.format, "mode": "scan"}
            metrics.detector_distance.labels(**labels).observe(abs(float(finding.score.distance)))
            metrics.flagged.labels(**labels).inc(int(finding.verdict.suspicious))
            metrics.tensors.labels(**labels).inc()
    for name, _, reason in result.skipped:
        metrics.record_skipped(model=model, layer_type=category(name), reason=reason.split(":")[0])
    write_textfile(metrics, args.metrics_file)


def add_scan_parser(sub: Any) -> None:
    s = sub.add_parser("scan", help="run the tamper detector over a GGUF file's weights")
    s.add_argument("input", help="GGUF file (full precision, or quantized: reports what it can)")
    s.add_argument("--report", help="write the per-tensor JSON report here")
    s.add_argument("--metrics-file", help="write Prometheus metrics here (node_exporter textfile format)")
    s.add_argument("--all-formats", action="store_true", help="score every registry format, not only GGUF's")
    s.add_argument("--lattice-null", action="store_true", help=LATTICE_NULL_HELP)
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=cmd_scan)


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["scan", *sys.argv[1:]]))
