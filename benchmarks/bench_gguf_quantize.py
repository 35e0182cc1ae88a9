"""qcbguard-gguf quantize (hardened and --no-harden) against llama.cpp's llama_model_quantize, same input, one run.

Each quantizer runs in a child process of its own, so its wall time includes start-up and its peak resident memory
(ru_maxrss from wait4) is its own. The --no-harden output's sha256 is checked against llama.cpp's on the way.
With --repeats N the three take turns N times per type and each column is the median (memory: the largest): on a
shared VM a single run of llama.cpp moves by 40%.

    python benchmarks/bench_gguf_quantize.py --input model-f16.gguf --types Q8_0 Q4_K_M --threads 2
    python benchmarks/bench_gguf_quantize.py --synthetic 1024x8   # writes a random Llama (n_embd x layers) first

Needs llama-cpp-python 0.3.36 (the test extra builds it) and, for --synthetic, gguf-py.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LLAMA_QUANTIZE = """
import ctypes, sys
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3]); p.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def run_child(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise RuntimeError(f"{argv[:4]} failed: {log.read().decode(errors='replace')[-500:]}")
    return wall, usage.ru_maxrss / 1024


def summary(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The median wall time and the largest peak memory of a quantizer's runs."""
    return statistics.median(t for t, _ in runs), max(m for _, m in runs)


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def synthetic(path: Path, spec: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.gguf_models import LlamaShape, write_llama

    n_embd, n_layer = (int(v) for v in spec.split("x"))
    shape = LlamaShape(
        n_embd=n_embd,
        n_ff=n_embd * 8 // 3 // 32 * 32,
        n_head=n_embd // 64,
        n_head_kv=n_embd // 256 or 1,
        n_layer=n_layer,
        n_vocab=8192,
    )
    return write_llama(path, shape)


def write_synthetic(path: Path, spec: str) -> Path:
    """synthetic() in a child process: a child forked from a parent that held the model would inherit its peak
    resident memory (Linux keeps ru_maxrss across fork and exec), inflating every measured peak."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.bench_gguf_quantize import synthetic; "
    code += f"from pathlib import Path; synthetic(Path({str(path)!r}), {spec!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    return path


def main() -> int:
    from gguf_tools.mixtures import mixture

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help="F32/F16/BF16 GGUF file")
    src.add_argument("--synthetic", help="write a random Llama of N_EMBDxLAYERS first, e.g. 1024x8")
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-hardened", action="store_true", help="time llama.cpp and --no-harden only")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each quantizer per type, taking turns (median)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_gguf_") as tmp:
        tmpdir = Path(tmp)
        inp = args.input or write_synthetic(tmpdir / "synthetic-f16.gguf", args.synthetic)
        seed = tmpdir / "seed"
        from qcbguard_kernels.hardening import DeploymentSeed

        DeploymentSeed.fresh().write(seed)
        size_mb = inp.stat().st_size / 2**20
        print(
            f"# input {inp.name}: {size_mb:.1f} MiB; {args.threads} threads; {platform.machine()}, "
            f"{os.cpu_count()} cores; python {platform.python_version()}"
        )
        print(
            "| type | llama.cpp s | ours --no-harden s | ours hardened s | no-harden / llama | hardened / llama "
            "| llama.cpp MiB | no-harden MiB | hardened MiB | sha256 equal |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
        ours = [sys.executable, "-m", "gguf_tools.cli", "quantize"]
        for type_name in args.types:
            mix = mixture(type_name)
            ref, plain, hard = (tmpdir / f"{k}-{type_name}.gguf" for k in ("llama", "plain", "hard"))
            runs: dict[str, list[tuple[float, float]]] = {"llama": [], "plain": [], "hard": []}
            same = True
            for _ in range(args.repeats):
                runs["llama"].append(
                    run_child(
                        [
                            sys.executable,
                            "-c",
                            LLAMA_QUANTIZE,
                            str(inp),
                            str(ref),
                            str(mix.file_type),
                            str(args.threads),
                        ]
                    )
                )
                runs["plain"].append(
                    run_child(
                        [*ours, str(inp), str(plain), type_name, "--no-harden", "-q", "--threads", str(args.threads)]
                    )
                )
                same &= sha256(ref) == sha256(plain)
                for p in (ref, plain):  # gone before the next run writes: dirty pages of earlier outputs move its time
                    p.unlink(missing_ok=True)
                if not args.skip_hardened:
                    hardened = [*ours, str(inp), str(hard), type_name, "--seed-file", str(seed), "-q"]
                    runs["hard"].append(run_child([*hardened, "--threads", str(args.threads)]))
                    hard.unlink(missing_ok=True)
            (t_ref, m_ref), (t_plain, m_plain) = summary(runs["llama"]), summary(runs["plain"])
            if args.skip_hardened:
                hard_cells = ("-", "-", "-")
            else:
                t_hard, m_hard = summary(runs["hard"])
                hard_cells = (f"{t_hard:.2f}", f"{t_hard / t_ref:.2f}x", f"{m_hard:.0f}")
            print(
                f"| {mix.name} | {t_ref:.2f} | {t_plain:.2f} | {hard_cells[0]} | {t_plain / t_ref:.2f}x | "
                f"{hard_cells[1]} | {m_ref:.0f} | {m_plain:.0f} | {hard_cells[2]} | {'yes' if same else 'NO'} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
