"""Prometheus metrics of what hardening changed and of what the detector saw, shared by both adapters.

Every series carries the `qcbguard_` prefix; counters end in `_total`, durations are in seconds. The vLLM plugin
exports them on vLLM's own /metrics, the GGUF tool writes them as a node_exporter textfile (or pushes them to a
Pushgateway). Nothing secret is exported: the seed appears only as its public fingerprint.

Mean code change in steps is `qcbguard_code_change_steps_total / qcbguard_elements_total`: counters add up across
tensors, processes and ranks, where a gauge of means would not.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, write_to_textfile

from qcbguard_kernels import __version__ as kernels_version
from qcbguard_kernels.hardening import ALGORITHM_VERSION, TensorReport

from .atomic import atomic_path

__all__ = ["DETECTOR_BUCKETS", "QcbguardMetrics", "write_textfile"]

NAMESPACE = "qcbguard"
_TENSOR_LABELS = ("model", "layer_type", "format", "mode")
#: Kolmogorov distances: clean tensors sit below ~0.01, the threshold at 0.02, box attacks far above 0.05.
DETECTOR_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.2, 0.5, 1.0)


class QcbguardMetrics:
    """The qcbguard series in one registry (a fresh private one unless given: tests and tools never collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()

        def counter(name: str, doc: str, labels: tuple[str, ...] = _TENSOR_LABELS) -> Counter:
            return Counter(name, doc, labels, namespace=NAMESPACE, registry=self.registry)

        self.tensors = counter("tensors", "Tensors quantized through qcbguard (hardened or, in detect-only, reported).")
        self.elements = counter("elements", "Weights in those tensors.")
        self.codes_changed = counter("codes_changed", "Weights whose code differs from round-to-nearest.")
        self.change_steps = counter("code_change_steps", "Sum over weights of |code - round-to-nearest code|, steps.")
        self.flagged = counter("tensors_flagged", "Tensors the detector found suspicious.")
        self.seconds = counter("hardening_seconds", "Time spent encoding, detecting, hardening and packing.")
        self.skipped = counter(
            "tensors_skipped",
            "Tensors left untouched (pre-quantized checkpoints, layers outside the threat model).",
            ("model", "layer_type", "reason"),
        )
        self.detector_distance = Histogram(
            "detector_distance",
            "Per-tensor detector statistic: Kolmogorov distance of cell positions from the decoy null.",
            _TENSOR_LABELS,
            namespace=NAMESPACE,
            registry=self.registry,
            buckets=DETECTOR_BUCKETS,
        )
        # Exposed as qcbguard_info{version=..., algorithm=..., adapter=..., mode=..., seed_fingerprint=...} 1
        self.info = Info(
            NAMESPACE, "qcbguard version, algorithm, adapter, mode and seed fingerprint.", registry=self.registry
        )

    def set_info(self, *, adapter: str, mode: str, seed_fingerprint: str) -> None:
        """Identify the running configuration. `seed_fingerprint` is DeploymentSeed.fingerprint, never the seed."""
        self.info.info(
            {
                "version": kernels_version,
                "algorithm": ALGORITHM_VERSION,
                "adapter": adapter,
                "mode": mode,
                "seed_fingerprint": seed_fingerprint,
            }
        )

    def record(self, report: TensorReport, *, model: str, layer_type: str) -> None:
        """Add one tensor's report."""
        labels = {"model": model, "layer_type": layer_type, "format": report.format, "mode": report.mode}
        self.tensors.labels(**labels).inc()
        self.elements.labels(**labels).inc(report.elements)
        self.codes_changed.labels(**labels).inc(report.codes_changed)
        self.change_steps.labels(**labels).inc(report.mean_change_steps * report.elements)
        self.flagged.labels(**labels).inc(int(report.suspicious))
        self.seconds.labels(**labels).inc(report.seconds)
        self.detector_distance.labels(**labels).observe(abs(report.detector_distance))

    def record_skipped(self, *, model: str, layer_type: str, reason: str) -> None:
        """Count a tensor qcbguard did not touch, and why."""
        self.skipped.labels(model=model, layer_type=layer_type, reason=reason).inc()


def write_textfile(metrics: QcbguardMetrics, path: str | os.PathLike[str]) -> None:
    """Write the metrics in Prometheus text format for node_exporter's textfile collector, atomically.

    The file appears complete or not at all (temporary file in the same directory, then rename), so the collector
    never scrapes half a file; a missing directory is a clear error rather than a traceback from the library.
    """
    with atomic_path(path) as tmp:
        write_to_textfile(tmp, metrics.registry)
