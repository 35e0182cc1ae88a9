"""Perplexity through llama.cpp of llama-quantize's output vs qcbguard-gguf's hardened output, same input and text.

    python benchmarks/bench_gguf_perplexity.py --input smollm2-f16.gguf --types Q8_0 Q4_0 --seeds 2 \
        [--hessians smollm2-hessians.safetensors]

For each type: llama_model_quantize's file, and the hardened file for each of `--seeds` fresh seeds (with
`--hessians`, from `qcbguard calibrate ... --gguf-names`, also the calibrated file under the same seed); each is
loaded in llama_cpp.Llama and scored on benchmarks/realmodel/eval_text.txt (non-overlapping windows of --ctx tokens,
every token after the first of a window predicted). The full-precision input is scored too.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.llama_cpp_oracle beside us
TEXT = ROOT / "benchmarks" / "realmodel" / "eval_text.txt"


def perplexity(path: Path, text: str, ctx: int, threads: int) -> float:
    import llama_cpp

    from benchmarks.llama_cpp_oracle import plain_cpu_buffers

    with plain_cpu_buffers():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_threads=threads, logits_all=True, verbose=False)
    tokens = llm.tokenize(text.encode(), add_bos=False)
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, ctx - 1):
        window = [llm.token_bos(), *tokens[start : start + ctx - 1]]
        llm.reset()
        llm.eval(window)
        logits = np.array(llm.scores[: len(window)], dtype=np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        targets = window[1:]
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
    llm.close()
    return math.exp(nll / count)


def main() -> int:
    import llama_cpp

    from benchmarks.llama_cpp_oracle import llama_quantize
    from gguf_tools.mixtures import mixture
    from gguf_tools.quantize import QuantizeOptions, quantize_file
    from qcbguard_kernels.hardening import DeploymentSeed, HardeningConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0", "Q4_K_M"])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chars", type=int, default=6000, help="score the text's first CHARS characters")
    ap.add_argument("--hessians", help="calibration Hessians: score calibrated hardening too")
    args = ap.parse_args()
    text = TEXT.read_text(encoding="utf-8")[: args.chars]

    header = f"# {args.input.name}, first {len(text)} characters of {TEXT.name}, windows of {args.ctx} tokens"
    print(f"{header}, llama-cpp-python {llama_cpp.__version__}")
    print(f"full precision: ppl {perplexity(args.input, text, args.ctx, args.threads):.3f}", flush=True)
    print("| type | llama-quantize ppl | hardened ppl (per seed) | calibrated ppl (per seed) |")
    print("|---|---:|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench_gguf_ppl_") as tmp:
        tmpdir = Path(tmp)
        for type_name in args.types:
            mix = mixture(type_name)
            ref = tmpdir / f"ref-{mix.name}.gguf"
            llama_quantize(args.input, ref, mix.name, threads=args.threads)
            ref_ppl = perplexity(ref, text, args.ctx, args.threads)
            scores: dict[str | None, list[float]] = {None: [], args.hessians: []}
            for i in range(args.seeds):
                seed_file = tmpdir / f"seed-{mix.name}-{i}"  # a fresh seed per file (seed files never overwrite)
                DeploymentSeed.fresh().write(seed_file)
                for hessians in scores if args.hessians else [None]:
                    out = tmpdir / f"hard-{mix.name}-{i}.gguf"
                    config = HardeningConfig(seed_file=str(seed_file))
                    options = QuantizeOptions(mix.name, config=config, threads=args.threads, hessians=hessians)
                    quantize_file(args.input, out, options)
                    scores[hessians].append(perplexity(out, text, args.ctx, args.threads))
                    out.unlink()
            hard, calibrated = (", ".join(f"{p:.3f}" for p in scores[k]) or "-" for k in (None, args.hessians))
            print(f"| {mix.name} | {ref_ppl:.3f} | {hard} | {calibrated} |", flush=True)
            ref.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
