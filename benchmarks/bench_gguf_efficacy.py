"""The efficacy harness's QCB end to end in llama.cpp: llama-quantize delivers it, qcbguard-gguf removes it.

    python benchmarks/bench_gguf_efficacy.py [--cases q4_k:Q4_K_M q4_0:Q4_0 q8_0:Q8_0 q6_k:Q6_K] [--seeds 5]

Trains the harness's clean model and its standard attack on each GGUF format (as benchmarks/bench_efficacy.py does,
one torch thread), converts the attacked and the clean model to F32 GGUF (benchmarks/qcb/gguf_export.py), quantizes
each to the llama-quantize file type with llama_model_quantize (what llama-quantize runs) and with qcbguard-gguf
(hardened, --seeds public benchmark seeds), and prints one markdown table of what llama.cpp's own greedy generation
does with every file (ASR, accuracy), next to the harness's torch numbers for the same model.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.qcb beside us

from benchmarks.qcb.attack import LAYOUTS
from benchmarks.qcb.evaluate import bench_seeds
from benchmarks.qcb.gguf_eval import gguf_efficacy, markdown_table
from benchmarks.qcb.harness import ATTACK_VALID_FP_MAX, ATTACK_VALID_Q_MIN, HarnessConfig, prepare
from gguf_tools.mixtures import mixture
from qcbguard_kernels import QcbguardError

DEFAULT_CASES = ["q4_k:Q4_K_M", "q4_0:Q4_0", "q8_0:Q8_0", "q6_k:Q6_K"]
log = logging.getLogger("bench_gguf_efficacy")


def _case(text: str) -> tuple[str, str]:
    fmt, sep, type_name = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FORMAT:TYPE, e.g. q4_k:Q4_K_M")
    try:
        mix = mixture(type_name)
    except QcbguardError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if fmt not in LAYOUTS or not fmt.startswith("q"):
        raise argparse.ArgumentTypeError(f"{fmt!r} is not a GGUF format the harness attacks")
    if mix.default != fmt.upper():
        raise argparse.ArgumentTypeError(f"{mix.name} quantizes to {mix.default} by default, not to {fmt.upper()}")
    return fmt, mix.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", type=_case, default=[_case(c) for c in DEFAULT_CASES])
    parser.add_argument("--seeds", type=int, default=5, help="deployment seeds of qcbguard-gguf per model")
    parser.add_argument("--seed", type=int, default=0, help="the harness's training seed")
    parser.add_argument("--verbose", action="store_true", help="progress")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    import llama_cpp

    torch.set_num_threads(1)
    config = HarnessConfig(seeds=args.seeds, adaptive=(), seed=args.seed)
    seeds = bench_seeds(args.seeds)
    wall = time.perf_counter()
    prepared = prepare(config)
    log.info("clean FP %s; malicious FP %s", prepared.clean_fp, prepared.malicious_fp)
    rows = []
    for fmt, type_name in args.cases:
        rows.append(gguf_efficacy(prepared, fmt, type_name, config, seeds))
        log.info("%s %s done at %.0f s", fmt, type_name, time.perf_counter() - wall)

    spec = config.model
    print(
        f"# QCB through llama.cpp: Llama {spec.layers}x{spec.hidden}, {config.digits}-digit reversal, "
        f"{config.eval_prompts} prompts, llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}, "
        f"{platform.machine()}"
    )
    print(
        f"# ASR and accuracy in %; a valid attack has FP ASR <= {ATTACK_VALID_FP_MAX:.0%} and quantized ASR >= "
        f"{ATTACK_VALID_Q_MIN:.0%}; qcbguard-gguf 'a / b' = mean / max over {args.seeds} seeds"
    )
    print()
    print(markdown_table(rows))
    print()
    print(f"# {time.perf_counter() - wall:.0f} s wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
