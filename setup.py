"""qcbguard: hardening quantized LLM serving against quantization-conditioned backdoors.

The source folder `kernels/` is installed as the import package `qcbguard_kernels`: PyPI's `kernels` (Hugging Face's
hub kernels, imported by transformers and bitsandbytes) owns the name `kernels`, and neither package may shadow the
other.

kernels/native/ (C twins of the hottest references: the k-quant scale searches, the GGUF legacy encoding, the
rounding cells of integer and e4m3 grids, the detector's histograms, the Philox stream) is an optional extension:
without a C compiler the install still succeeds and the bit-identical torch references run instead. Its flags are
part of its numerics: no FMA contraction and no fast-math, so every float32 operation rounds once, as in ggml's
reference quantizers (no -march=native either: a wheel built here must run on any x86-64 or aarch64 machine; x86-64
gets an AVX2 clone of the vectorized loops, picked at load).
"""

from setuptools import Extension, find_packages, setup

KERNEL_PACKAGES = find_packages(include=["kernels", "kernels.*"])
INSTALLED_AS = {p: "qcbguard_kernels" + p[len("kernels") :] for p in KERNEL_PACKAGES}
ADAPTERS = find_packages(include=["vllm_qcbguard*", "gguf_tools*", "qcbguard", "qcbguard.*"])

NATIVE_SOURCES = ["module", "kquant_search", "kquant_fused", "legacy", "grid_cells", "fp8_cells", "histogram"]
NATIVE_SOURCES += ["philox", "widen", "feedback"]
NATIVE = Extension(
    "qcbguard_kernels.native._native",
    sources=[f"kernels/native/{name}.c" for name in NATIVE_SOURCES],
    depends=["kernels/native/native.h"],
    # -fno-trapping-math / -fno-math-errno change no value (they let selects and sqrtf vectorize); the other two keep
    # one rounding per operation.
    extra_compile_args=[
        "-O3",
        "-std=c11",
        "-fno-fast-math",
        "-ffp-contract=off",
        "-fno-trapping-math",
        "-fno-math-errno",
        "-fopenmp",
    ],
    # libgomp.so.1: the OpenMP runtime torch ships and loads first, which the extension then shares (module.c)
    extra_link_args=["-fopenmp"],
    optional=True,
)

setup(
    ext_modules=[NATIVE],
    packages=[*INSTALLED_AS.values(), *ADAPTERS],
    package_dir={installed: source.replace(".", "/") for source, installed in INSTALLED_AS.items()},
)
