"""Monitoring: the alert rules pass promtool's unit tests, every series the dashboard and rules query is one qcbguard
exports, and a real Prometheus server scraping qcbguard's metrics fires the tamper alert for a box-attacked tensor.

Prometheus comes from Debian (`apt-get install prometheus`; .ci/run installs it when missing).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest, start_http_server

from qcbguard.metrics import QcbguardMetrics
from qcbguard_kernels import get_format
from qcbguard_kernels.hardening import DeploymentSeed, harden_tensor
from tests.attacks import box_attack, clean_weights
from tests.inputs import fresh_seed

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
RULES = MONITORING / "qcbguard-alerts.yml"
SEED = fresh_seed()


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's prometheus package (.ci/run does)")
    return path


def _metrics_with_one_flagged_tensor() -> QcbguardMetrics:
    metrics = QcbguardMetrics()
    seed = DeploymentSeed.fresh()
    metrics.set_info(adapter="test", mode="harden", seed_fingerprint=seed.fingerprint)
    fmt = get_format("nf4")
    clean = clean_weights(SEED)
    attacked, _ = box_attack(clean, "nf4", 0.01, 64, SEED)
    for name, w in (("layers.0.mlp.up_proj.weight", clean), ("layers.1.mlp.up_proj.weight", attacked)):
        _, report = harden_tensor(w, fmt, name, seed)
        metrics.record(report, model="tiny", layer_type="mlp")
    return metrics


def test_alert_rules_pass_promtool_unit_tests():
    promtool = _tool("promtool")
    subprocess.run([promtool, "check", "rules", str(RULES)], check=True, capture_output=True)
    out = subprocess.run(
        [promtool, "test", "rules", "qcbguard-alerts.test.yml"], cwd=MONITORING, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_and_rules_query_only_exported_series():
    exported = set(re.findall(r"^(qcbguard_[a-z_]+)", generate_latest(_exported_example().registry).decode(), re.M))
    queried = set(re.findall(r"qcbguard_[a-z_]+", RULES.read_text()))
    dashboard = json.loads((MONITORING / "qcbguard-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queried |= set(re.findall(r"qcbguard_[a-z_]+", target["expr"]))
    assert queried, "nothing queried"
    assert queried <= exported, sorted(queried - exported)


def _exported_example() -> QcbguardMetrics:
    metrics = QcbguardMetrics()
    fmt = get_format("q4_0")
    _, report = harden_tensor(clean_weights(SEED)[:8], fmt, "w", DeploymentSeed.fresh())
    metrics.record(report, model="m", layer_type="mlp")
    metrics.record_skipped(model="m", layer_type="attention", reason="pre-quantized")
    metrics.set_info(adapter="test", mode="harden", seed_fingerprint="0" * 16)
    return metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)["data"]["result"]


@pytest.mark.slow
def test_real_prometheus_scrapes_qcbguard_and_fires_the_tamper_alert(tmp_path):
    prometheus = _tool("prometheus")
    metrics = _metrics_with_one_flagged_tensor()
    exporter_port = _free_port()
    server, thread = start_http_server(exporter_port, addr="127.0.0.1", registry=metrics.registry)
    prom_port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{str(RULES)!r}]\n"
        "scrape_configs:\n"
        f"  - job_name: qcbguard\n    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n"
    )
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        flagged, alerts = [], []
        while time.monotonic() < deadline and not alerts:
            time.sleep(1)
            try:
                flagged = _query(prom_port, "sum by (model, format) (qcbguard_tensors_flagged_total)")
                alerts = _query(prom_port, 'ALERTS{alertname="QcbguardTamperSuspected", alertstate="firing"}')
            except OSError:
                continue  # not listening yet
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert [(r["metric"]["model"], r["metric"]["format"], r["value"][1]) for r in flagged] == [("tiny", "nf4", "1")]
        assert len(alerts) == 1 and alerts[0]["metric"]["severity"] == "critical", alerts
        info = _query(prom_port, "qcbguard_info")
        assert info[0]["metric"]["mode"] == "harden" and len(info[0]["metric"]["seed_fingerprint"]) == 16
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        server.shutdown()
        thread.join(timeout=5)


@pytest.mark.slow
def test_gguf_tool_pushes_its_metrics_to_a_real_pushgateway(tmp_path, capsys):
    from gguf_tools.cli import main as gguf_main
    from tests.gguf_models import write_tensors

    pushgateway = _tool("prometheus-pushgateway")
    attacked, _ = box_attack(clean_weights(SEED + 1), "q4_0", 0.05, 32, SEED)
    src = write_tensors(
        tmp_path / "tiny-f32.gguf",
        {"blk.0.attn_q.weight": clean_weights(SEED).numpy(), "blk.0.ffn_up.weight": attacked.numpy()},
    )
    seed_file = tmp_path / "seed"
    seed = DeploymentSeed.fresh()
    seed.write(seed_file)
    port = _free_port()
    proc = subprocess.Popen(
        [pushgateway, f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).close()
                break
            except OSError:
                time.sleep(0.2)
        out = tmp_path / "tiny-Q4_0.gguf"
        argv = ["quantize", str(src), str(out), "Q4_0", "--seed-file", str(seed_file), "-q"]
        assert gguf_main([*argv, "--pushgateway", f"127.0.0.1:{port}"]) == 0 and out.exists()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        pushed = [line for line in text.splitlines() if line.startswith("qcbguard_") and 'job="qcbguard-gguf"' in line]
        flagged = [line for line in pushed if line.startswith("qcbguard_tensors_flagged_total")]
        assert any('layer_type="ffn_up"' in line and line.endswith(" 1") for line in flagged), pushed
        assert any('layer_type="attn_q"' in line and line.endswith(" 0") for line in flagged), pushed
        assert any(f'seed_fingerprint="{seed.fingerprint}"' in line for line in pushed), pushed
        assert seed_file.read_text().strip() not in text  # the secret itself never leaves
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # gateway gone: the output stands and the tool says what failed, in one line, exit 2
    out2 = tmp_path / "again-Q4_0.gguf"
    argv2 = ["quantize", str(src), str(out2), "Q4_0", "--seed-file", str(seed_file), "-q"]
    capsys.readouterr()
    assert gguf_main([*argv2, "--pushgateway", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert out2.exists() and len(err.splitlines()) == 1 and "was written, but pushing its metrics" in err, err
