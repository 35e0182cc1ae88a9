"""Per-process hook state: settings, seed, metrics and which layers were hardened or left alone.

One state per vLLM configuration being loaded (an LLM() or a server loads one; tests build several in one process).
The hook is active only when vLLM's additional_config holds a "qcbguard" entry, which `--quantization-hook qcbguard`
writes; installing qcbguard next to vLLM changes nothing otherwise.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from weakref import WeakSet

import torch

from qcbguard.calibration import HessianFile
from qcbguard.metrics import QcbguardMetrics, write_textfile
from qcbguard_kernels.errors import QcbguardError
from qcbguard_kernels.hardening import DeploymentSeed, TensorReport

from .layout import layer_type
from .settings import ADDITIONAL_CONFIG_KEY, HookSettings

__all__ = ["METRICS_DIR_ENV", "HookState", "active_state"]

logger = logging.getLogger("vllm_qcbguard")

#: directory where each vLLM process writes its qcbguard metrics for the API server's /metrics (see metrics_bridge)
METRICS_DIR_ENV = "QCBGUARD_METRICS_DIR"


@dataclass
class HookState:
    settings: HookSettings
    seed: DeploymentSeed
    model: str
    metrics: QcbguardMetrics = field(default_factory=QcbguardMetrics)
    reports: list[TensorReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    handled: WeakSet[torch.nn.Module] = field(default_factory=WeakSet)
    config_ref: Any = None
    hessians: HessianFile | None = None

    def record(self, layer: torch.nn.Module, report: TensorReport, label: str | None = None) -> None:
        """`label`: the metrics' layer type when the layer's prefix does not name it (fused experts)."""
        self.handled.add(layer)
        self.reports.append(report)
        label = label or layer_type(getattr(layer, "prefix", report.name))
        self.metrics.record(report, model=self.model, layer_type=label)
        if report.suspicious:
            logger.warning("qcbguard: %s flagged by the detector: %s", report.name, "; ".join(report.reasons))

    def skip(self, layer: torch.nn.Module, prefix: str, reason: str) -> None:
        self.handled.add(layer)
        self.skipped.append((prefix, reason))
        self.metrics.record_skipped(model=self.model, layer_type=layer_type(prefix), reason=reason)

    def publish(self) -> None:
        """Write this process's metrics where the API server's collector reads them (when a directory is set)."""
        directory = os.environ.get(METRICS_DIR_ENV)
        if not directory:
            return
        write_textfile(self.metrics, Path(directory) / f"qcbguard-{os.getpid()}.prom")


_current: HookState | None = None


def _model_label(vllm_config: Any) -> str:
    model_config = getattr(vllm_config, "model_config", None)
    served = getattr(model_config, "served_model_name", None)
    if isinstance(served, (list, tuple)):
        served = served[0] if served else None
    return str(served or getattr(model_config, "model", "unknown"))


def active_state() -> HookState | None:
    """The hook state for the vLLM config being loaded, or None when the hook was not asked for."""
    global _current
    from vllm.config import get_current_vllm_config

    vllm_config = get_current_vllm_config()
    raw = (getattr(vllm_config, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_KEY)
    if raw is None:
        return None
    if _current is not None and _current.config_ref is vllm_config:
        return _current
    settings = HookSettings.from_mapping(raw)
    seed_file = settings.hardening.seed_file
    parallel = getattr(vllm_config, "parallel_config", None)
    world = int(getattr(parallel, "world_size", 1) or 1)
    if seed_file is None and world > 1:
        raise QcbguardError(
            f"qcbguard: {world} model ranks must draw from one seed; set seed_file in the qcbguard settings "
            "(a 64-hex-character file, mode 600) so that every rank reads the same secret"
        )
    seed = DeploymentSeed.from_file(seed_file) if seed_file else DeploymentSeed.fresh()
    hessians = HessianFile(settings.hessians) if settings.hessians else None  # unreadable: refused before loading
    state = HookState(
        settings=settings, seed=seed, model=_model_label(vllm_config), config_ref=vllm_config, hessians=hessians
    )
    state.metrics.set_info(adapter="vllm", mode=settings.hardening.mode, seed_fingerprint=seed.fingerprint)
    logger.info(
        "qcbguard: hardening quantized layers (mode %s, seed fingerprint %s)", settings.hardening.mode, seed.fingerprint
    )
    _current = state
    return state
