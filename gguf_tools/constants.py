"""GGUF and ggml constants: the value types of the metadata and the tensor types with their block geometry.

Restated from the GGUF specification and ggml's type traits (llama.cpp as vendored by llama-cpp-python 0.3.36). A
tensor of type T stores rows of ne0 elements as ne0 / block_size blocks of type_size bytes each.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_ALIGNMENT",
    "FULL_PRECISION_TYPES",
    "GGML_TYPES",
    "GGML_TYPES_BY_NAME",
    "GGUF_MAGIC",
    "MAX_DIMS",
    "MAX_NAME_BYTES",
    "SUPPORTED_VERSIONS",
    "GgmlType",
    "ValueType",
    "ggml_type",
]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
#: ggml's GGML_MAX_NAME is 64 bytes including the terminating NUL
MAX_NAME_BYTES = 63


class ValueType:
    """gguf_type: the type tags of metadata values."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12

    #: fixed-size scalar tags -> struct format character
    SCALAR_FORMATS: dict[int, str] = {  # noqa: RUF012 (a constant table)
        0: "B",
        1: "b",
        2: "H",
        3: "h",
        4: "I",
        5: "i",
        6: "f",
        7: "?",
        10: "Q",
        11: "q",
        12: "d",
    }


@dataclass(frozen=True)
class GgmlType:
    """One ggml tensor type: its enum value, name, elements per block and bytes per block."""

    id: int
    name: str
    block_size: int
    type_size: int

    @property
    def quantized(self) -> bool:
        """ggml_is_quantized: block-coded types (everything but the plain float and int types)."""
        return self.name not in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")

    def row_bytes(self, ne0: int) -> int:
        return ne0 // self.block_size * self.type_size


_TYPES = [
    GgmlType(0, "F32", 1, 4),
    GgmlType(1, "F16", 1, 2),
    GgmlType(2, "Q4_0", 32, 18),
    GgmlType(3, "Q4_1", 32, 20),
    GgmlType(6, "Q5_0", 32, 22),
    GgmlType(7, "Q5_1", 32, 24),
    GgmlType(8, "Q8_0", 32, 34),
    GgmlType(9, "Q8_1", 32, 36),
    GgmlType(10, "Q2_K", 256, 84),
    GgmlType(11, "Q3_K", 256, 110),
    GgmlType(12, "Q4_K", 256, 144),
    GgmlType(13, "Q5_K", 256, 176),
    GgmlType(14, "Q6_K", 256, 210),
    GgmlType(15, "Q8_K", 256, 292),
    GgmlType(16, "IQ2_XXS", 256, 66),
    GgmlType(17, "IQ2_XS", 256, 74),
    GgmlType(18, "IQ3_XXS", 256, 98),
    GgmlType(19, "IQ1_S", 256, 50),
    GgmlType(20, "IQ4_NL", 32, 18),
    GgmlType(21, "IQ3_S", 256, 110),
    GgmlType(22, "IQ2_S", 256, 82),
    GgmlType(23, "IQ4_XS", 256, 136),
    GgmlType(24, "I8", 1, 1),
    GgmlType(25, "I16", 1, 2),
    GgmlType(26, "I32", 1, 4),
    GgmlType(27, "I64", 1, 8),
    GgmlType(28, "F64", 1, 8),
    GgmlType(29, "IQ1_M", 256, 56),
    GgmlType(30, "BF16", 1, 2),
    GgmlType(34, "TQ1_0", 256, 54),
    GgmlType(35, "TQ2_0", 256, 66),
    GgmlType(39, "MXFP4", 32, 17),
    GgmlType(40, "NVFP4", 64, 36),
    GgmlType(41, "Q1_0", 128, 18),
    GgmlType(42, "Q2_0", 64, 18),
]

GGML_TYPES: dict[int, GgmlType] = {t.id: t for t in _TYPES}
GGML_TYPES_BY_NAME: dict[str, GgmlType] = {t.name: t for t in _TYPES}
FULL_PRECISION_TYPES = frozenset({"F32", "F16", "BF16"})


def ggml_type(name: str) -> GgmlType:
    """The ggml type called `name` (e.g. "Q4_K")."""
    try:
        return GGML_TYPES_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown ggml type {name!r}") from None
