"""Running one vLLM LLM() per fresh subprocess, for the vLLM benchmarks: each run starts vLLM from scratch (no state
or compiled kernels carried over) and hands back one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

__all__ = ["emit_result", "prepare_child_env", "run_child"]

_TAG = "RESULT "


def prepare_child_env() -> None:
    """In-process engine (no worker processes to spawn) and a small KV cache: what a 2-core CPU machine needs."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def emit_result(result: dict) -> None:
    print(_TAG + json.dumps(result))


def run_child(script: str, *args: str) -> dict:
    """Run `script --child args...` and return the dict its last RESULT line carries; exit with its stderr if none."""
    cmd = [sys.executable, script, "--child", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tempfile.gettempdir())
    lines = [line for line in done.stdout.splitlines() if line.startswith(_TAG)]
    if done.returncode or not lines:
        raise SystemExit(f"vLLM run failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1][len(_TAG) :])
