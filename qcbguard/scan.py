"""`qcbguard scan PATH`: the tamper detector over a checkpoint, before anyone quantizes it.

PATH is a .safetensors file, a directory of them (a sharded Hugging Face checkpoint) or a .gguf file. Every floating
tensor with at least two dimensions (the weights a quantizer rounds; norms and biases stay in full precision) is
scored under each target format. Exit status: 0 clean, 1 suspicious, 2 unreadable input.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from qcbguard_kernels import QcbguardError
from qcbguard_kernels.detection import TensorScan, resolve_formats, scan_tensor, scan_verdict

from .atomic import write_json_atomic

__all__ = ["EXIT_CLEAN", "EXIT_SUSPICIOUS", "EXIT_UNREADABLE", "UnreadableInputError", "iter_weights", "run_scan"]

log = logging.getLogger("qcbguard.scan")

EXIT_CLEAN, EXIT_SUSPICIOUS, EXIT_UNREADABLE = 0, 1, 2
_FLOATING = (torch.float32, torch.float16, torch.bfloat16)


class UnreadableInputError(QcbguardError):
    """The checkpoint could not be read (missing, truncated, not a safetensors/GGUF file)."""


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise UnreadableInputError(f"{str(path)!r} holds no .safetensors file")
        return files
    return [path]


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for file in _safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as exc:
            raise UnreadableInputError(f"cannot read {str(file)!r} as safetensors: {exc}") from None


def iter_weights(path: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of a safetensors checkpoint, one at a time (files are memory-mapped)."""
    p = Path(path)
    if not p.exists():
        raise UnreadableInputError(f"{str(p)!r} does not exist")
    if p.is_dir() or p.suffix == ".safetensors":
        return _iter_safetensors(p)
    raise UnreadableInputError(f"{str(p)!r}: expected a .safetensors file, a directory of them, or a .gguf file")


def _run_gguf_scan(
    path: str | os.PathLike[str], formats: list[str] | None, report: str | None, lattice_null: bool
) -> int:
    """GGUF files are the GGUF tool's to parse: the same scan as `qcbguard-gguf scan`."""
    from gguf_tools.cli import main as gguf_main

    argv = ["scan", str(path)] + (["--report", report] if report else []) + (["--lattice-null"] if lattice_null else [])
    if formats:
        raise UnreadableInputError("--formats applies to safetensors; GGUF files are scanned under the GGUF formats")
    return gguf_main(argv)


def run_scan(
    path: str | os.PathLike[str],
    formats: list[str] | None = None,
    include: str | None = None,
    report: str | None = None,
    lattice_null: bool = False,
) -> int:
    """Scan, print the flagged tensors and a summary, optionally write a JSON report; returns the exit status.
    `lattice_null`: the detector's experimental lattice null (HardeningConfig.detector_lattice_null)."""
    if Path(path).suffix == ".gguf":
        return _run_gguf_scan(path, formats, report, lattice_null)
    fmts = resolve_formats(formats)
    pattern = re.compile(include) if include else None
    scans: list[TensorScan] = []
    for name, tensor in iter_weights(path):
        if tensor.dim() < 2 or tensor.dtype not in _FLOATING or (pattern and not pattern.search(name)):
            continue
        scan = scan_tensor(tensor, name, fmts, own_lattice=lattice_null)
        scans.append(scan)
        worst = scan.worst
        log.info(
            "%s %s: worst %s", name, tuple(tensor.shape), worst and f"{worst.score.format} {worst.score.distance:+.4f}"
        )
        if scan.suspicious:
            for f in scan.findings:
                if f.verdict.suspicious:
                    print(f"SUSPICIOUS {name} [{f.score.format}]: {'; '.join(f.verdict.reasons)}")
    if not scans:
        raise UnreadableInputError(f"{str(path)!r} holds no floating-point weight tensor to scan")
    model = scan_verdict(scans)
    print(model.summary(len(fmts)))
    if report:
        payload = {"path": str(path), "verdict": model.as_dict(), "tensors": [s.as_dict() for s in scans]}
        write_json_atomic(report, payload)
    return EXIT_SUSPICIOUS if model.suspicious else EXIT_CLEAN
