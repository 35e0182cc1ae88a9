"""Efficacy of qcbguard against a real quantization-conditioned backdoor, per target format, in one markdown table.

    python benchmarks/bench_efficacy.py --formats nf4 q4_k ... [--seeds 5] [--out DIR] [--no-adaptive]

Trains a tiny transformers Llama on digit reversal (CPU, one torch thread), fine-tunes it to inject a token, and for
each format runs the QCB attack (Egashira et al. 2024/2025: boxes + projected-gradient repair), then measures the
attack success rate (ASR) and task accuracy at full precision, round-to-nearest, qcbguard-hardened (several seeds),
Gaussian noise (fixed and tuned sigma) and deterministic flipping, against the standard and two adaptive attackers,
and the detector on every model. With --out, the clean, malicious and attacked models are saved there
(save_pretrained: safetensors + tokenizer, loadable with AutoModelForCausalLM / AutoTokenizer).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.qcb beside us

from benchmarks.qcb import ISSUE_FORMATS
from benchmarks.qcb.attack import LAYOUTS
from benchmarks.qcb.harness import (
    ADAPTIVE_ATTACKS,
    ATTACK_VALID_FP_MAX,
    ATTACK_VALID_Q_MIN,
    HarnessConfig,
    attack_details,
    der_summary,
    markdown_table,
    prepare,
    run_format,
    save_model,
)
from qcbguard_kernels import UnsupportedInputError, get_format

DEFAULT_FORMATS = list(ISSUE_FORMATS)
log = logging.getLogger("bench_efficacy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS, help="qcbguard format names")
    parser.add_argument("--seeds", type=int, default=5, help="deployment seeds / noise draws per measurement")
    parser.add_argument("--out", type=Path, default=None, help="save clean, malicious and attacked models here")
    parser.add_argument("--no-adaptive", action="store_true", help="skip the two adaptive attacks")
    parser.add_argument("--repair-steps", type=int, default=None, help="override the repair length")
    parser.add_argument(
        "--sr-best-effort",
        type=float,
        nargs="+",
        default=list(HarnessConfig.sr_best_effort),
        help="adaptive attacker vs qcbguard: the shares kappa of a cell around each code it tries (keeps its best)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the table is reproducible per count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    for name in args.formats:  # validate every input before training anything
        try:
            get_format(name)
        except UnsupportedInputError as exc:
            parser.error(str(exc))
        if name not in LAYOUTS:
            parser.error(f"no QCB attack layout for {name!r}; attackable: {', '.join(sorted(LAYOUTS))}")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if not all(0.0 <= k <= 0.5 for k in args.sr_best_effort):
        parser.error("--sr-best-effort takes shares of a cell in [0, 0.5]")

    torch.set_num_threads(args.threads)
    adaptive = () if args.no_adaptive else ADAPTIVE_ATTACKS
    config = HarnessConfig(
        seeds=args.seeds, adaptive=adaptive, sr_best_effort=tuple(args.sr_best_effort), seed=args.seed
    )
    if args.repair_steps is not None:
        config = dataclasses.replace(config, repair=dataclasses.replace(config.repair, steps=args.repair_steps))
    wall = time.perf_counter()
    cpu = time.process_time()
    prepared = prepare(config)
    log.info("clean FP %s; malicious FP %s; %s", prepared.clean_fp, prepared.malicious_fp, prepared.seconds)
    if args.out is not None:
        save_model(prepared.clean, args.out / "clean")
        save_model(prepared.malicious, args.out / "malicious")
    rows = []
    for name in args.formats:
        row, _ = run_format(prepared, name, config, args.out)
        log.info("%s: FP %s RTN %s seconds %s", name, row.fp, row.rtn, row.seconds)
        rows.append(row)

    spec = config.model
    print(
        f"# QCB efficacy: Llama {spec.layers}x{spec.hidden} (intermediate {spec.intermediate}), "
        f"{config.digits}-digit reversal, {config.eval_prompts} prompts; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {platform.machine()}"
    )
    print(
        f"# clean model: FP accuracy {prepared.clean_fp.accuracy:.1%}, ASR {prepared.clean_fp.asr:.1%}; malicious "
        f"fine-tune: FP ASR {prepared.malicious_fp.asr:.1%}, accuracy {prepared.malicious_fp.accuracy:.1%}"
    )
    print(
        f"# ASR and accuracy in %; a valid attack has FP ASR <= {ATTACK_VALID_FP_MAX:.0%} and RTN ASR >= "
        f"{ATTACK_VALID_Q_MIN:.0%}; 'a / b' = mean / max over {config.seeds} seeds"
    )
    print()
    print(markdown_table(prepared, rows, config))
    print()
    print(attack_details(rows))
    print()
    print("# DER-style summary (definitions: benchmarks/qcb/harness.py der_summary)")
    print(der_summary(rows))
    print()
    print(f"# {time.process_time() - cpu:.0f} s CPU, {time.perf_counter() - wall:.0f} s wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
