"""Getting the workers' qcbguard metrics onto the API server's /metrics.

vLLM serves /metrics from the API server process's default prometheus registry (or, when PROMETHEUS_MULTIPROC_DIR is
set, from the files of its multiprocess collector). Layers are quantized in the engine-core/worker processes, whose
in-memory metrics that endpoint never sees. Setting PROMETHEUS_MULTIPROC_DIR from the plugin is too late in the API
server process (prometheus_client picks its value store when it is imported) and would hide vLLM's own series.

So each process that hardens layers writes its metrics atomically as a Prometheus text file into one directory
(QCBGUARD_METRICS_DIR, which the API server creates and its children inherit), and the API server registers a
collector that reads every file on each scrape and adds them up: counters and histogram buckets are sums over
processes and ranks; the info metric is the same everywhere.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .state import METRICS_DIR_ENV

__all__ = ["TextfileDirCollector", "ensure_metrics_dir", "install_collector"]

_installed: set[int] = set()
_DIR_HOLDER: list[tempfile.TemporaryDirectory[str]] = []


class TextfileDirCollector(Collector):
    """Sums the qcbguard series of every `*.prom` file in a directory (one per hardening process)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        for path in sorted(self.directory.glob("*.prom")):
            try:
                text = path.read_text(encoding="utf-8")
            except OSError:
                continue  # replaced between listing and reading: the next scrape sees the new file
            for family in text_string_to_metric_families(text):
                if not family.name.startswith("qcbguard") or family.name.endswith("_created"):
                    continue  # per-process creation times do not add up
                families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                    if family.type == "info" or family.name.endswith("_info"):
                        values[key] = 1.0  # the text format carries an info metric as a gauge of 1
                    else:
                        values[key] = values.get(key, 0.0) + sample.value
        for (family_name, sample_name, labels), value in values.items():
            families[family_name].add_sample(sample_name, dict(labels), value)
        yield from families.values()


def ensure_metrics_dir() -> str:
    """The directory the hardening processes write to: QCBGUARD_METRICS_DIR, or a fresh one exported for children."""
    directory = os.environ.get(METRICS_DIR_ENV)
    if not directory:
        holder = tempfile.TemporaryDirectory(prefix="qcbguard-metrics-")
        _DIR_HOLDER.append(holder)  # removed when the API server exits
        directory = holder.name
        os.environ[METRICS_DIR_ENV] = directory
    Path(directory).mkdir(parents=True, exist_ok=True)
    return directory


def install_collector(registry: CollectorRegistry = REGISTRY, directory: str | None = None) -> TextfileDirCollector:
    """Register the collector once per registry (the plugin runs again in every process and on every import)."""
    collector = TextfileDirCollector(directory or ensure_metrics_dir())
    if id(registry) not in _installed:
        registry.register(collector)
        _installed.add(id(registry))
    return collector
