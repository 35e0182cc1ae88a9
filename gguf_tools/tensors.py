"""Tensor data of a GGUF file as torch tensors, and back to GGUF bytes.

Full-precision types convert exactly: F32 as is, F16 and BF16 as torch half / bfloat16 (the detector reads the
checkpoint's own lattice from the dtype). Quantized GGUF types that the format registry knows (Q4_0 ... Q8_0,
Q2_K ... Q6_K) dequantize to float32 with ggml's formulas, for --allow-requantize only.
"""

from __future__ import annotations

import numpy as np
import torch

from qcbguard_kernels import QuantizedTensor, UnsupportedInputError, get_format
from qcbguard_kernels.formats.gguf_common import GgufFormat

from .constants import GgmlType
from .reader import GgufFile, TensorInfo

__all__ = ["REGISTRY_TYPES", "from_float", "read_rows", "registry_format"]

#: ggml types with a bit-exact reference in qcbguard_kernels, by ggml name
REGISTRY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def registry_format(gtype: GgmlType) -> GgufFormat:
    """The registry's reference for a ggml type; refuses types we cannot produce bit-exactly."""
    if gtype.name not in REGISTRY_TYPES:
        raise UnsupportedInputError(f"ggml type {gtype.name} has no qcbguard reference")
    fmt = get_format(gtype.name.lower())
    if not isinstance(fmt, GgufFormat) or fmt.ggml_type != gtype.id or fmt.type_size != gtype.type_size:
        raise UnsupportedInputError(f"registry format {fmt.name} does not match ggml type {gtype.name}")
    return fmt


def read_rows(f: GgufFile, info: TensorInfo, row_start: int, row_end: int) -> torch.Tensor:
    """Rows [row_start, row_end) as a (rows, ne0) tensor: float32/float16/bfloat16, or dequantized float32. The rows
    are copied out of the file's map and its pages released (GgufFile.release): memory follows the chunk, not the
    file."""
    raw = f.tensor_bytes(info, row_start, row_end).copy()
    f.release(info, row_start, row_end)
    name = info.type.name
    if name == "F32":
        return torch.from_numpy(raw.view(np.float32))
    if name == "F16":
        return torch.from_numpy(raw.view(np.float16))
    if name == "BF16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    fmt = registry_format(info.type)
    rows = row_end - row_start
    packed = QuantizedTensor(fmt.name, torch.Size((rows, info.ne[0])), {"blocks": torch.from_numpy(raw)})
    return fmt.dequantize(packed).reshape(rows, info.ne[0])


def from_float(x: torch.Tensor, gtype: GgmlType) -> np.ndarray:
    """A full-precision tensor in a full-precision ggml type (F32, F16: round to nearest even, as ggml converts)."""
    if gtype.name == "F16":
        return x.float().to(torch.float16).contiguous().view(torch.uint8).numpy()
    if gtype.name == "F32":
        return x.float().contiguous().view(torch.uint8).numpy()
    raise UnsupportedInputError(f"cannot convert to ggml type {gtype.name}")
