"""Quantize a full-precision GGUF file the way llama-quantize does, with every rounding hardened.

The output has llama-quantize's layout (writer.py), per-tensor types (mixtures.py) and scales (the format registry's
bit-exact references). With hardening off the file is byte-identical to llama-quantize's; with it on, each quantized
tensor keeps the standard quantizer's scales and takes codes drawn by harden_tensor, and three metadata keys record
the algorithm, the seed's public fingerprint and the qcbguard version (never the seed).

Streaming: one tensor at a time, in row chunks of at most CHUNK_ELEMENTS weights (GGUF formats quantize rows
independently and the hardening draws depend only on each weight's global (row, col), so chunking changes no byte).
The detector screens each tensor once, on its sample rows (detection.sample_row_ranges over the whole tensor, as the
vLLM hook and `scan` read it), before any chunk is quantized: the verdict does not depend on the chunk size.
The output goes to a temporary file in the target directory, renamed into place only when complete.

With calibration Hessians (`--hessians`, from `qcbguard calibrate --gguf-names`), the tensors they name are hardened
with error feedback along them (harden_calibrated: the same unbiased per-element draws, errors steered to where the
layer's inputs cancel them); the file is checked against the model before anything is written.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qcbguard.calibration import HessianFile
from qcbguard_kernels import UnsupportedInputError, native
from qcbguard_kernels import __version__ as kernels_version
from qcbguard_kernels.detection import sample_row_ranges
from qcbguard_kernels.dispatch import harden_fused, pick_backend, quantize_packed, resolve_backend
from qcbguard_kernels.formats.base import Format, QuantizedTensor
from qcbguard_kernels.hardening import (
    ALGORITHM_VERSION,
    DeploymentSeed,
    FeedbackPlan,
    HardeningConfig,
    Screened,
    TensorReport,
    detector_sample_key,
    feedback_plan,
    harden_calibrated,
    harden_tensor,
    screen,
)

from .constants import FULL_PRECISION_TYPES, ValueType
from .mixtures import Mixture, ModelInfo, TensorPlan, category, mixture, output_order, plan_types
from .reader import GgufFile, TensorInfo
from .tensors import from_float, read_rows, registry_format
from .writer import GgufWriter, OutputTensor, encode_kv, publish

__all__ = [
    "CALIBRATION_KEY",
    "CHUNK_ELEMENTS",
    "GPU_CHUNK_ELEMENTS",
    "HARDENING_KEYS",
    "QuantizeOptions",
    "QuantizeResult",
    "RequantizeError",
    "model_info",
    "plan_file",
    "quantize_file",
]

# 4 MiB of float32 per chunk: the quantizers' temporaries stay below glibc's mmap threshold (32 MiB), so they are
# reused from the heap instead of being mapped, faulted in and unmapped for every operation (measured on Q8_0:
# 2**23 -> 2**20 cut the system time 5.9 s -> 1.1 s and the wall time 6.6 s -> 2.8 s, peak memory 1.1 -> 0.6 GB)
CHUNK_ELEMENTS = 1 << 20
# On a GPU a chunk is one host-to-device copy and a few kernel launches: larger chunks amortise both (64 MiB float32)
GPU_CHUNK_ELEMENTS = 1 << 24
#: keys llama-quantize rewrites (removed from their place, quantization_version and file_type appended last)
REWRITTEN_KEYS = ("general.quantization_version", "general.file_type")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
GGML_QNT_VERSION = 2
HARDENING_KEYS = ("qcbguard.algorithm", "qcbguard.seed_fingerprint", "qcbguard.version")
#: appended after them when calibrated hardening ran: the Hessian file's fingerprint (HessianFile.fingerprint)
CALIBRATION_KEY = "qcbguard.calibration"

WEAKER_REQUANTIZE = (
    "re-quantizing from a quantized file's dequantized values is weaker: its codes were already chosen by "
    "round-to-nearest, so a backdoor planted for that quantizer is baked into the values and hardening cannot "
    "remove it; quantize from the full-precision (F32/F16/BF16) checkpoint instead"
)


class RequantizeError(UnsupportedInputError):
    """The input is already quantized and re-quantizing was not asked for."""


@dataclass(frozen=True)
class QuantizeOptions:
    output_type: str
    #: False: plain round-to-nearest, byte-identical to llama-quantize (no qcbguard keys)
    harden: bool = True
    config: HardeningConfig = field(default_factory=HardeningConfig)
    allow_requantize: bool = False
    threads: int | None = None
    #: auto: the fused Triton kernels on a GPU when one is present (and covers the type), the reference otherwise
    backend: str = "auto"
    #: calibration Hessians (qcbguard calibrate --gguf-names): the tensors they name get calibrated hardening
    hessians: str | None = None


@dataclass
class QuantizeResult:
    output: Path
    mixture: Mixture
    plans: list[TensorPlan]
    #: per rewritten tensor (hardened or detect-only): the hardening report
    reports: dict[str, TensorReport]
    seconds: dict[str, float]
    seed_fingerprint: str | None
    elapsed: float
    #: tensors hardened with error feedback along a calibration Hessian
    calibrated: frozenset[str] = frozenset()

    def as_dict(self) -> dict[str, object]:
        tensors = []
        for p in self.plans:
            entry: dict[str, object] = {
                "name": p.name,
                "source_type": p.source.name,
                "type": p.target.name,
                "rewritten": p.rewrite,
                "fallback_from": p.chosen.name if p.fell_back else None,
                "calibrated": p.name in self.calibrated,
                "seconds": round(self.seconds.get(p.name, 0.0), 6),
            }
            rep = self.reports.get(p.name)
            if rep is not None:
                entry.update(
                    codes_changed=rep.codes_changed,
                    elements=rep.elements,
                    mean_change_steps=rep.mean_change_steps,
                    max_change_steps=rep.max_change_steps,
                    detector_distance=rep.detector_distance,
                    detector_sampled=rep.detector_sampled,
                    suspicious=rep.suspicious,
                    reasons=list(rep.reasons),
                )
            tensors.append(entry)
        return {
            "output": str(self.output),
            "output_type": self.mixture.name,
            "hardened": self.seed_fingerprint is not None,
            "algorithm": ALGORITHM_VERSION if self.seed_fingerprint else None,
            "seed_fingerprint": self.seed_fingerprint,
            "seconds": round(self.elapsed, 3),
            "cpu_kernels": native.status(),
            "tensors": tensors,
        }


def model_info(f: GgufFile) -> ModelInfo:
    """The hyper-parameters the type rules read, from `<arch>.*` metadata (defaults as llama.cpp's loader)."""
    arch = f.value("general.architecture")
    if not isinstance(arch, str):
        raise UnsupportedInputError("general.architecture is missing: not a llama.cpp model file")

    def first(key: str, default: int) -> int:
        v = f.value(f"{arch}.{key}", default)
        if isinstance(v, list):
            v = v[0] if v else default
        if isinstance(v, bool) or not isinstance(v, int):
            raise UnsupportedInputError(f"{arch}.{key} must be an integer, got {v!r}")
        return v

    n_layer = first("block_count", 0)
    n_head = first("attention.head_count", 0)
    return ModelInfo(
        arch=arch,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=first("attention.head_count_kv", n_head),
        n_expert=first("expert_count", 0),
    )


def plan_file(f: GgufFile, mix: Mixture, allow_requantize: bool = False) -> list[TensorPlan]:
    """Each tensor's output type, in llama-quantize's output order; refuses what cannot be produced exactly."""
    if int(f.value("split.count", 1) or 1) > 1:
        raise UnsupportedInputError("split GGUF input is not supported; merge it first (llama-gguf-split --merge)")
    order = output_order([t.name for t in f.tensors])
    tensors = [(n, f.by_name[n].ne, f.by_name[n].type) for n in order]
    plans = plan_types(tensors, mix, model_info(f))
    for p in plans:
        if not p.rewrite and not (p.quantizable and p.source.quantized):
            continue
        if p.source.quantized and p.quantizable and not allow_requantize:
            raise RequantizeError(
                f"tensor {p.name!r} is already quantized ({p.source.name}); pass --allow-requantize to re-quantize "
                f"anyway ({WEAKER_REQUANTIZE})"
            )
        if p.source.name not in FULL_PRECISION_TYPES:
            registry_format(p.source)  # raises for types we cannot dequantize
        if p.target.name not in FULL_PRECISION_TYPES:
            registry_format(p.target)
    return plans


def _open_hessians(path: str | None, plans: list[TensorPlan], options: QuantizeOptions) -> HessianFile | None:
    """The calibration file, checked against the tensors this run quantizes (before anything is written)."""
    if path is None:
        return None
    if not options.harden:
        raise UnsupportedInputError("--hessians calibrates hardening: it cannot be combined with --no-harden")
    hessians = HessianFile(path)
    hessians.check(_quantized_shapes(plans), kept=[p.name for p in plans])
    return hessians


def _quantized_shapes(plans: list[TensorPlan]) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the tensors this run quantizes, as torch orders it: (experts,) rows, inputs (ggml's ne
    reversed)."""
    return {p.name: p.ne[::-1] for p in plans if p.rewrite and p.target.name not in FULL_PRECISION_TYPES}


def _kv_pairs(
    f: GgufFile, mix: Mixture, seed: DeploymentSeed | None, hessians: HessianFile | None = None
) -> list[bytes]:
    pairs = [f.raw_kv(k) for k in f.kv if k not in REWRITTEN_KEYS and k not in SPLIT_KEYS]
    pairs.append(encode_kv("general.quantization_version", ValueType.UINT32, GGML_QNT_VERSION))
    pairs.append(encode_kv("general.file_type", ValueType.UINT32, mix.file_type))
    if seed is not None:
        pairs.append(encode_kv("qcbguard.algorithm", ValueType.STRING, ALGORITHM_VERSION))
        pairs.append(encode_kv("qcbguard.seed_fingerprint", ValueType.STRING, seed.fingerprint))
        pairs.append(encode_kv("qcbguard.version", ValueType.STRING, kernels_version))
        if hessians is not None:
            pairs.append(encode_kv(CALIBRATION_KEY, ValueType.STRING, hessians.fingerprint))
    return pairs


def _merge(parts: list[TensorReport]) -> TensorReport:
    """One report for a tensor hardened in row chunks (counts add, means weight by elements, extremes take max)."""
    if len(parts) == 1:
        return parts[0]
    n = sum(p.elements for p in parts)
    reasons: list[str] = []
    for p in parts:
        reasons.extend(r for r in p.reasons if r not in reasons)
    return TensorReport(
        name=parts[0].name,
        format=parts[0].format,
        mode=parts[0].mode,
        elements=n,
        steerable=sum(p.steerable for p in parts),
        codes_changed=sum(p.codes_changed for p in parts),
        mean_change_steps=sum(p.mean_change_steps * p.elements for p in parts) / n,
        max_change_steps=max(p.max_change_steps for p in parts),
        detector_distance=max(p.detector_distance for p in parts),
        detector_sampled=max(p.detector_sampled for p in parts),  # the chunks share one screen of the tensor
        on_grid_fraction=sum(p.on_grid_fraction * p.elements for p in parts) / n,
        suspicious=any(p.suspicious for p in parts),
        reasons=tuple(reasons),
        seconds=sum(p.seconds for p in parts),
    )


def _check_target(dst: Path, src: Path) -> None:
    parent = dst.parent
    if not parent.is_dir():
        raise UnsupportedInputError(f"output directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UnsupportedInputError(f"output directory {str(parent)!r} is not writable")
    if dst.exists() and dst.is_dir():
        raise UnsupportedInputError(f"output {str(dst)!r} is a directory")
    if dst.exists() and src.exists() and os.path.samefile(dst, src):
        raise UnsupportedInputError("output and input are the same file")


def quantize_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    options: QuantizeOptions,
    progress: Callable[[int, int, str], None] | None = None,
) -> QuantizeResult:
    """Quantize src into dst (written to a temporary file beside dst, renamed at the end). Raises QcbguardError
    (a ValueError) on bad input and OSError on I/O failure; dst is untouched in both cases."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    mix = mixture(options.output_type)
    _check_target(dst, src)
    if options.threads is not None:
        if options.threads < 1:
            raise UnsupportedInputError(f"--threads must be at least 1, got {options.threads}")
        torch.set_num_threads(options.threads)
    with GgufFile(src) as f:
        plans = plan_file(f, mix, options.allow_requantize)
        hessians = _open_hessians(options.hessians, plans, options)
        hardening = options.harden and options.config.mode == "harden"
        # detect-only packs round-to-nearest: nothing to calibrate
        calibrated = frozenset()
        if hessians is not None and hardening:  # the Hessians of tensors kept as they are go unused
            calibrated = hessians.names & set(_quantized_shapes(plans))
        seed = None
        if options.harden:
            seed = (
                DeploymentSeed.from_file(options.config.seed_file)
                if options.config.seed_file
                else DeploymentSeed.fresh()
            )
        outputs = [OutputTensor(p.name, p.ne, p.target) for p in plans]
        device = _device(options.backend)
        reports: dict[str, TensorReport] = {}
        seconds: dict[str, float] = {}
        fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                kv = _kv_pairs(f, mix, seed if hardening else None, hessians)
                writer = GgufWriter(out, kv, outputs, f.alignment)
                feedback = _FeedbackPlans(hessians, calibrated)
                for i, p in enumerate(plans):
                    if progress is not None:
                        progress(i, len(plans), p.name)
                    t0 = time.perf_counter()
                    info = f.by_name[p.name]
                    per_chunk = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
                    chunk = max(1, per_chunk // info.ne[0])
                    parts = []
                    screened = None
                    block_rows = feedback.block_rows(p.name, info.n_rows)
                    chunks = row_chunks(info.n_rows, chunk, block_rows)  # none spans two experts' Hessians
                    for r0, r1 in chunks:
                        plan = feedback.plan(p.name, r0 // block_rows)
                        if not p.rewrite:
                            writer.write_rows(f.tensor_bytes(info, r0, r1))
                            f.release(info, r0, r1)
                            continue
                        x = read_rows(f, info, r0, r1)
                        if p.target.name in FULL_PRECISION_TYPES:
                            writer.write_rows(from_float(x, p.target))
                            continue
                        fmt = registry_format(p.target)
                        if screened is None and options.harden and len(chunks) > 1:
                            # several chunks: screen the whole tensor's sample once (one chunk screens itself,
                            # on the same sample, reusing its encoding)
                            screened = _screen(f, info, fmt, p.name, options, seed)
                        if plan is not None:
                            packed, rep = harden_calibrated(
                                x, fmt, p.name, seed, plan, options.config, row_offset=r0, screened=screened
                            )
                        else:
                            packed, rep = _quantize_rows(x.to(device), fmt, p.name, r0, seed, options, screened)
                        if rep is not None:
                            parts.append(rep)
                        writer.write_rows(packed.tensors["blocks"].cpu().numpy())
                    if parts:
                        reports[p.name] = _merge(parts)
                    seconds[p.name] = time.perf_counter() - t0
                writer.finish()
                out.flush()
                os.fsync(out.fileno())
            publish(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if progress is not None:
        progress(len(plans), len(plans), "")
    return QuantizeResult(
        output=dst,
        mixture=mix,
        plans=plans,
        reports=reports,
        seconds=seconds,
        seed_fingerprint=seed.fingerprint if hardening and seed is not None else None,
        elapsed=time.perf_counter() - start,
        calibrated=calibrated,
    )


class _FeedbackPlans:
    """The feedback plans of a run's calibrated tensors (`names`), each computed once: a tensor's for all its row
    chunks, a Hessian several tensors read (q, k, v; gate, up) once for all of them while they come one after
    another, and a stacked Hessian (one per expert of a 3-D tensor: row block e reads slice e) one expert at a time,
    as its rows come."""

    def __init__(self, hessians: HessianFile | None, names: frozenset[str]) -> None:
        self.hessians, self.names = hessians, names
        self._latest: tuple[tuple[str, int], FeedbackPlan] | None = None  # (Hessian stored, slice), its plan

    def block_rows(self, name: str, rows: int) -> int:
        """Rows that read one Hessian: all of them, or one expert's."""
        return rows // self.hessians.slices(name) if name in self.names else rows

    def plan(self, name: str, block: int) -> FeedbackPlan | None:
        """The plan of row block `block` of tensor `name`, or None where it is not calibrated."""
        if name not in self.names:
            return None
        stacked = len(self.hessians.shape(name)) == 3
        key = (self.hessians.source(name), block)
        if self._latest is None or self._latest[0] != key:
            self._latest = (key, feedback_plan(self.hessians.get(name, block if stacked else None)))
        return self._latest[1]


def row_chunks(rows: int, chunk: int, block: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most `chunk` rows covering `rows`, none crossing a multiple of `block`."""
    return [
        (r0, min(b0 + block, r0 + chunk, rows))
        for b0 in range(0, rows, block)
        for r0 in range(b0, min(b0 + block, rows), chunk)
    ]


def _device(backend: str) -> torch.device:
    """Where the rows go: a GPU when the backend (QCBGUARD_BACKEND included) may take the kernels and one is present,
    else the CPU (where a forced triton backend runs only under TRITON_INTERPRET=1, for tests)."""
    usable = resolve_backend(backend) != "reference" and torch.cuda.is_available()
    return torch.device("cuda") if usable else torch.device("cpu")


def _screen(
    f: GgufFile, info: TensorInfo, fmt: Format, name: str, options: QuantizeOptions, seed: DeploymentSeed | None
) -> Screened:
    """The detector's score and verdict for a whole tensor, from its sample rows only (drawn with the deployment seed,
    the rows screen() draws on a whole tensor; refuses a flagged tensor under on_suspicious="refuse", before any of
    it is quantized)."""
    key = None if seed is None else detector_sample_key(seed, name)
    ranges = sample_row_ranges(info.n_rows, info.ne[0], options.config.detector_sample, key)
    sample = torch.cat([read_rows(f, info, start, end) for start, end in ranges])
    return screen(sample, fmt, name, options.config)


def _quantize_rows(
    x: torch.Tensor,
    fmt: Format,
    name: str,
    row_offset: int,
    seed: DeploymentSeed | None,
    options: QuantizeOptions,
    screened: Screened | None,
) -> tuple[QuantizedTensor, TensorReport | None]:
    """One row chunk: hardened (or detect-only) with its report, or plain round-to-nearest; the fused Triton kernels
    or native CPU pass (the legacy types) when the backend picks them (the same bytes as the reference,
    dispatch.harden_fused). `screened`: the whole tensor's detector result (_screen)."""
    if not options.harden:
        return quantize_packed(x, fmt, name, None, row_offset=row_offset, backend=options.backend), None
    assert seed is not None
    place = {"row_offset": row_offset, "screened": screened}
    if pick_backend(x, fmt, options.backend) != "reference":
        _, packed, report = harden_fused(x, fmt, name, seed, options.config, backend=options.backend, **place)
        return packed, report
    return harden_tensor(x, fmt, name, seed, options.config, **place)


def layer_type(name: str) -> str:
    """The metrics' layer_type label: llama-quantize's category of the tensor."""
    return category(name)
