"""llama.cpp as the GGUF oracle, in process: its quantizer by file-type name, and its log kept off.

Shared by the GGUF benchmarks (benchmarks/qcb/gguf_eval.py, bench_gguf_perplexity.py) and the GGUF tests; needs
llama-cpp-python (the test extra builds 0.3.36). bench_gguf_quantize.py runs llama.cpp in a child process of its
own instead, to time it and read its peak memory alone.

Every model these callers load goes through `model_params()`: llama.cpp's CPU "extra buffer types" (the weight repacking
and AMX paths, what `llama-cli --no-repack` turns off) are off. llama-cpp-python 0.3.36 built with GGML_NATIVE on a
CPU with AMX (here a Xeon with AMX_INT8 and AVX512) segfaults in llama_decode on llama-quantize's own Q8_0, Q4_0 and
Q4_K_M outputs with them on (2026-12-08; the F16 model runs), and runs them with them off.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from gguf_tools.mixtures import mixture

__all__ = ["llama_quantize", "model_params", "plain_cpu_buffers", "quiet_stderr"]


@contextlib.contextmanager
def quiet_stderr(quiet: bool = True) -> Iterator[None]:
    """llama.cpp's log (hundreds of lines per model load or quantization) off: file descriptor 2 to /dev/null for the
    duration, as llama_cpp.Llama(verbose=False) does; errors still surface as exceptions."""
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def model_params() -> object:
    """llama_model_default_params() with the CPU extra buffer types off (see the module's docstring)."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = False
    return params


@contextlib.contextmanager
def plain_cpu_buffers() -> Iterator[None]:
    """For llama_cpp.Llama, which takes no such argument: its model loads inside the block get model_params()."""
    import llama_cpp.llama_cpp as api

    default = api.llama_model_default_params
    api.llama_model_default_params = model_params
    try:
        yield
    finally:
        api.llama_model_default_params = default


def llama_quantize(src: Path, dst: Path, type_name: str, threads: int = 1, verbose: bool = False) -> Path:
    """llama.cpp's quantizer (llama_model_quantize, what the llama-quantize tool runs) for a file type's name."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = mixture(type_name).file_type
    params.nthread = threads
    with quiet_stderr(not verbose):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed: {src} -> {dst} ({type_name})")
    return dst
