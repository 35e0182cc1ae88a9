"""What a quantization format is, in one interface every consumer (hardening, detection, adapters) relies on.

A standard quantizer does two things: it picks per-block scale parameters, then rounds every weight onto the grid those
parameters define. qcbguard keeps the first step exactly as the standard quantizer does it and only ever changes the
second, so a format is split the same way:

    encode(x)          -> Encoding: the scale parameters, and per element the rounding cell it lands in
    pack(enc, codes)   -> QuantizedTensor in the format's native layout (codes default to round-to-nearest)
    dequantize(q)      -> float32 values

`quantize(x) == pack(encode(x))` is bit-exact with the format's real quantizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedInputError, check_finite

__all__ = ["SUPPORTED_INPUT_DTYPES", "CodeValueRule", "Encoding", "Format", "QuantizedTensor", "RoundingCells"]

SUPPORTED_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class RoundingCells:
    """Per element, the cell of the code grid a weight falls in.

    Codes are int32 in the format's own code space, in grid order within one scale block: adjacent codes are adjacent
    grid points (their values ascend, or descend where the format's scale is negative, as in GGUF Q4_0; sign-magnitude
    formats use the magnitude and take the sign from the weight). `lower` and `upper` are the neighbouring codes
    (upper = lower + 1); they are equal where the weight sits exactly on a code or beyond the end of the grid
    (clamped). `position` in [0, 1] is where the weight sits between their values: 0 at lower, 1 at upper, 0.5 on the
    boundary the standard quantizer rounds at. `nearest` is the code the standard quantizer picks (lower or upper;
    its tie rule decides at 0.5).
    """

    lower: torch.Tensor
    upper: torch.Tensor
    position: torch.Tensor
    nearest: torch.Tensor

    @property
    def steerable(self) -> torch.Tensor:
        """Elements whose rounding direction depends on where the weight sits (lower != upper)."""
        return self.lower != self.upper


@dataclass
class Encoding:
    """The standard quantizer's scale decisions for one tensor, and the rounding cell of every element."""

    format: str
    shape: torch.Size
    cells: RoundingCells
    scales: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class CodeValueRule:
    """Format.code_values as one formula, for the detector's native pass to evaluate per element instead of reading
    value tensors: code c of the element at flat index e is worth (table[c - first_code] * sign) * scale[e // group],
    plus shift[e // group] where there is a shift, one float32 rounding per operation; sign is -1 where `negative`
    (per element) is set, else 1 (a factor of +-1 is exact, -0.0 included)."""

    table: torch.Tensor  # float32, the value of codes first_code, first_code + 1, ... before scaling
    first_code: int
    scale: torch.Tensor  # float32, one per group of `group` consecutive elements
    group: int
    negative: torch.Tensor | None = None  # bool, shaped like the tensor
    shift: torch.Tensor | None = None  # float32, one per group

    def element_terms(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(multiplier, shift) of flat elements 0 .. n - 1, float64: code c of element e is worth
        table[c - first_code] * multiplier[e] + shift[e], multiplier = sign * scale of e's group (shift None where
        the rule has none)."""
        group = torch.arange(n) // self.group
        multiplier = self.scale.reshape(-1).double()[group]
        if self.negative is not None:
            multiplier = torch.where(self.negative.reshape(-1)[:n], -multiplier, multiplier)
        return multiplier, None if self.shift is None else self.shift.reshape(-1).double()[group]


@dataclass
class QuantizedTensor:
    """Packed codes and scales, in the native layout of the format's real implementation."""

    format: str
    shape: torch.Size
    tensors: dict[str, torch.Tensor]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class Format(ABC):
    """One quantization format. Instances are registered once by name (see registry.py)."""

    #: registry key, e.g. "nf4", "fp8_per_channel", "q4_k"
    name: str
    #: packing family: absmax-int, codebook-4bit, fp8-mx, gguf-legacy, gguf-kquant
    family: str
    #: bits per stored code
    bits: int
    #: one line for tables and errors
    description: str
    #: True where the scale rule searches for the scale that best fits the block (the GGUF k-quants): the fit pulls
    #: clean weights toward codes, so the detector's null must re-run the search on its decoys (detection/).
    fits_scales: bool = False

    def encode(self, x: torch.Tensor, name: str = "tensor") -> Encoding:
        """Validate x (dtype, shape, finiteness) and compute the standard quantizer's scales and rounding cells.

        Every reference computes in float32: float16 and bfloat16 inputs convert exactly, as the real quantizers do.
        """
        self.validate(x, name)
        return self._encode(x.float().contiguous())

    def quantize(self, x: torch.Tensor, name: str = "tensor") -> QuantizedTensor:
        """Round-to-nearest, exactly as the format's real quantizer does."""
        return self.pack(self.encode(x, name))

    def pack(self, enc: Encoding, codes: torch.Tensor | None = None) -> QuantizedTensor:
        """Pack codes (default: the standard quantizer's nearest codes) with enc's scales into the native layout."""
        if enc.format != self.name:
            raise UnsupportedInputError(f"encoding of format {enc.format!r} cannot be packed as {self.name!r}")
        if codes is None:
            codes = enc.cells.nearest
        elif codes.shape != enc.cells.nearest.shape:
            raise UnsupportedInputError(
                f"codes of shape {tuple(codes.shape)} do not match the encoded tensor {tuple(enc.cells.nearest.shape)}"
            )
        return self._pack(enc, codes.to(torch.int32))

    def validate(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise UnsupportedInputError(f"tensor {name!r}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in SUPPORTED_INPUT_DTYPES:
            raise UnsupportedInputError(
                f"tensor {name!r}: dtype {x.dtype} is not supported by {self.name}; "
                "convert it to float32, float16 or bfloat16 first"
            )
        if x.numel() == 0:
            raise UnsupportedInputError(f"tensor {name!r} is empty")
        self.check_shape(x, name)
        check_finite(x, name)

    def check_shape(self, x: torch.Tensor, name: str) -> None:
        """Formats with block constraints override this and raise UnsupportedInputError; any shape is fine here."""
        return None

    @abstractmethod
    def _encode(self, x: torch.Tensor) -> Encoding:
        """x is float32, contiguous, finite and of a shape check_shape accepted."""

    @abstractmethod
    def _pack(self, enc: Encoding, codes: torch.Tensor) -> QuantizedTensor: ...

    @abstractmethod
    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        """float32 values of the packed tensor, with the logical shape of the input."""

    @abstractmethod
    def code_values(self, enc: Encoding, codes: torch.Tensor) -> torch.Tensor:
        """float32 value each element would dequantize to if it were given `codes` (same shape as the input).

        For the nearest codes this equals dequantize(quantize(x)) up to the format's storage rounding of scales.
        """

    def code_value_rule(self, enc: Encoding) -> CodeValueRule | None:
        """code_values(enc, codes) for every codes as a CodeValueRule, or None where the format's values take
        another form (the detector then reads value tensors)."""
        return None

    def fuses_on_cpu(self, x: torch.Tensor) -> bool:
        """True where native_quantize serves x: one native CPU pass from weights to packed bytes, without the cells."""
        return False

    def native_quantize(
        self, x: torch.Tensor, name: str, key: int | None, row_offset: int = 0, col_offset: int = 0
    ) -> tuple[QuantizedTensor, QuantizedTensor | None, int]:
        """(round-to-nearest, hardened with `key` at global (row_offset, col_offset) or None, codes that differ):
        the bytes pack(encode(x)) and pack(encode(x), stochastic_codes(...)) give, where fuses_on_cpu(x)."""
        if not self.fuses_on_cpu(x):
            raise UnsupportedInputError(f"{self.name} has no fused native CPU pass for this tensor: use encode, pack")
        self.validate(x, name)
        nearest, hardened, changed = self._native_quantize(x, key, row_offset, col_offset)

        def packed(tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
            return QuantizedTensor(self.name, x.shape, tensors)

        return packed(nearest), (None if hardened is None else packed(hardened)), changed

    def _native_quantize(
        self, x: torch.Tensor, key: int | None, row_offset: int, col_offset: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, int]:
        """native_quantize's packed tensors (round-to-nearest, hardened or None) and change count; x is validated and
        fuses_on_cpu(x) holds. The native passes read float32, bfloat16 and float16 as they are (widening 16-bit rows
        themselves, exactly) and convert other dtypes to float32 (native._weights)."""
        raise NotImplementedError(f"{self.name} declares a fused native pass but has none")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {self.description}>"
