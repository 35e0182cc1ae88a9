"""llama.cpp as the GGUF oracle, in process: its quantizer by file-type name, and its log kept off.

Shared by the GGUF benchmarks (benchmarks/qcb/gguf_eval.py, bench_gguf_perplexity.py) and the GGUF tests; needs
llama-cpp-python (the test extra builds 0.3.36). bench_gguf_quantize.py runs llama.cpp in a child process of its
own instead, to time it and read its peak memory alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from gguf_tools.mixtures import mixture

__all__ = ["llama_quantize", "quiet_stderr"]


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
