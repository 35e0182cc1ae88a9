"""ggml's own C quantizers (libggml-python's prebuilt libggml-base) through ctypes.

ggml_quantize_chunk with no importance matrix runs quantize_row_<type>_ref for every GGUF type: exactly what
llama-quantize writes for a tensor.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import torch

__all__ = ["GGML_TYPES", "ggml_dequantize", "ggml_quantize", "ggml_row_size"]

# enum ggml_type (ggml.h)
GGML_TYPES = {
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "q2_k": 10,
    "q3_k": 11,
    "q4_k": 12,
    "q5_k": 13,
    "q6_k": 14,
}


@functools.cache
def _lib() -> ctypes.CDLL:
    import libggml

    libdir = Path(libggml.__file__).parent / "lib64"
    if not libdir.exists():
        libdir = Path(libggml.__file__).parent / "lib"
    lib = ctypes.CDLL(str(libdir / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_get_type_traits.restype = ctypes.c_void_p
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def ggml_row_size(type_name: str, n_per_row: int) -> int:
    return int(_lib().ggml_row_size(GGML_TYPES[type_name], n_per_row))


def ggml_quantize(type_name: str, x: torch.Tensor) -> torch.Tensor:
    """Quantize a 2-D float tensor (rows, n_per_row) with ggml; returns uint8 (rows, row_bytes)."""
    src = np.ascontiguousarray(x.detach().float().cpu().numpy(), dtype=np.float32)
    if src.ndim == 1:
        src = src[None, :]
    rows, n_per_row = src.shape
    row_bytes = ggml_row_size(type_name, n_per_row)
    dst = np.zeros((rows, row_bytes), dtype=np.uint8)
    written = _lib().ggml_quantize_chunk(
        GGML_TYPES[type_name], src.ctypes.data, dst.ctypes.data, 0, rows, n_per_row, None
    )
    if written != rows * row_bytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {rows * row_bytes}")
    return torch.from_numpy(dst)


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def ggml_dequantize(type_name: str, blocks: torch.Tensor, n_per_row: int) -> torch.Tensor:
    """ggml's own dequantize_row_<type> over (rows, row_bytes) uint8 blocks; returns float32 (rows, n_per_row)."""
    traits = _TypeTraits.from_address(_lib().ggml_get_type_traits(GGML_TYPES[type_name]))
    to_float = _TO_FLOAT(traits.to_float)
    src = np.ascontiguousarray(blocks.numpy(), dtype=np.uint8)
    out = np.zeros((src.shape[0], n_per_row), dtype=np.float32)
    for r in range(src.shape[0]):
        to_float(src[r].ctypes.data, out[r].ctypes.data, n_per_row)
    return torch.from_numpy(out)
