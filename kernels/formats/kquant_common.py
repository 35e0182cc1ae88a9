"""What the GGUF k-quants (Q2_K to Q6_K) share: C-order sums, chunked encoding, and rounding on the final grid.

Both families (gguf_kquant_affine: x = d * q - m; gguf_kquant_symmetric: x = d * (q - h)) cut a 256-weight
super-block into sub-blocks, search a scale per sub-block, quantize those scales against the super-block and then round
every weight once on the final grid. Only the searches, the scale fields and the byte layouts differ; they stay in the
family modules.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch

from ..errors import UnsupportedInputError
from ..numerics import nearest_int
from .base import CodeValueRule, Encoding, QuantizedTensor, RoundingCells
from .cells import integer_grid_cells
from .gguf_common import QK_K, GgufFormat

__all__ = ["NEAREST_INT_LIMIT", "KQuantFormat", "KQuantSpec", "seq_sum"]

NEAREST_INT_LIMIT = 4194303.0  # nearest_int's magic-number trick is exact only up to here (asserted in debug C)
_CHUNK_ELEMENTS = 1 << 18  # weights per encoding chunk: keeps the searches' working set in cache (fastest measured)


@dataclass(frozen=True)
class KQuantSpec:
    """What every k-quant type names: its ggml type, its code width and its block size in bytes."""

    ggml_type: int
    bits: int
    type_size: int

    @property
    def qmax(self) -> int:
        """The largest stored code: codes lie in [0, 2**bits - 1]."""
        return (1 << self.bits) - 1

    @property
    def offset(self) -> int:
        """h: a stored code L stands for l = L - h on the grid coordinate the quantizer rounds (0: l = L)."""
        return 0


def seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of t (n, ...) over its first axis in the C order: ((0 + t0) + t1) + ..., one rounding per addition."""
    acc = t[0] + 0.0  # C starts from +0.0: a -0.0 first term becomes +0.0
    for i in range(1, t.shape[0]):
        acc.add_(t[i])
    return acc


class KQuantFormat(GgufFormat):
    """Base of the k-quant families: 256-weight super-blocks, codes in [0, spec.qmax] on the grid l = L - spec.offset.

    A family implements _encode_rows (the scale search and scale quantization for a chunk of rows, returning the grid
    coordinates "u", the written codes "nearest" and its scales) and _fields (the byte fields of one super-block).
    """

    family = "gguf-kquant"
    fits_scales = True
    block_size = QK_K
    spec: KQuantSpec

    def __init__(self, name: str, spec: KQuantSpec, description: str) -> None:
        self.name = name
        self.spec = spec
        self.ggml_type = spec.ggml_type
        self.bits = spec.bits
        self.type_size = spec.type_size
        self.description = description

    @abstractmethod
    def _encode_rows(self, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows (rows, ne0) float32 -> {"u", "nearest"} (rows, ne0) and the scales, per row and super-block."""

    @abstractmethod
    def _fields(self, enc: Encoding, codes: torch.Tensor) -> list[torch.Tensor]:
        """The byte fields of every super-block, in file order, for codes (rows, nb, 256) in [0, spec.qmax]."""

    def _encode(self, x: torch.Tensor) -> Encoding:
        ne0 = x.shape[-1]
        x2 = x.reshape(-1, ne0)
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // ne0)
        parts = [self._encode_rows(x2[r : r + rows_per_chunk]) for r in range(0, x2.shape[0], rows_per_chunk)]
        cat = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        h = self.spec.offset
        # Cells on l = L - h, whose grid coordinate is the exact quotient C rounds (adding h to it could round).
        cells = integer_grid_cells(cat.pop("u"), cat.pop("nearest"), -h, self.spec.qmax - h, offset=h)
        shape = x.shape
        cells = RoundingCells(*(t.view(shape) for t in (cells.lower, cells.upper, cells.position, cells.nearest)))
        return Encoding(self.name, shape, cells, cat)

    def _round_on_final_grid(
        self, u: torch.Tensor, sub_d: torch.Tensor, search_codes: torch.Tensor, zeroed: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Stage 3 of every k-quant: {"u", "nearest"} (rows, ne0) from grid coordinates u (rows, nb, n_sub, sub_block).

        nearest = clamp(nearest_int(u), -h, qmax - h) + h (round half to even; nearest_int's bit trick reproduced as
        is for huge or non-finite u), except in sub-blocks whose sub_d (rows, nb, n_sub) is zero, which keep the
        search's codes (C: `if (!d) continue;`; a NaN sub_d is not skipped), and in `zeroed` super-blocks (written as
        zero bytes: code 0). Where C did not round u, or nearest_int's trick does not hold, u collapses onto the
        written code, so its cell has no width.
        """
        h = self.spec.offset
        kept = (sub_d == 0).unsqueeze(-1)
        if zeroed is not None:
            kept = kept | zeroed
            search_codes = torch.where(zeroed, torch.zeros_like(search_codes), search_codes)
        codes = torch.where(kept, search_codes, nearest_int(u).clamp_(-h, self.spec.qmax - h) + h)
        degenerate = kept | ~(u.abs() <= NEAREST_INT_LIMIT)
        u = torch.where(degenerate, (codes - h).float(), u)
        return {"u": u.reshape(u.shape[0], -1), "nearest": codes.reshape(u.shape[0], -1)}

    def code_value_rule(self, enc: Encoding) -> CodeValueRule:
        """code_values as a rule: (L - h) * sub_d, minus sub_dm in the affine types, per sub-block (the products and
        the difference each rounded once, as dequantize_row_* does)."""
        h = self.spec.offset
        table = torch.arange(-h, self.spec.qmax - h + 1, dtype=torch.float32)
        sub_d, sub_dm = enc.scales["sub_d"], enc.scales.get("sub_dm")
        shift = None if sub_dm is None else -sub_dm.reshape(-1)  # x - y is x + (-y), bit for bit
        return CodeValueRule(table, 0, sub_d.reshape(-1), QK_K // sub_d.shape[-1], shift=shift)

    def _pack(self, enc: Encoding, codes: torch.Tensor) -> QuantizedTensor:
        qmax = self.spec.qmax
        if bool((codes < 0).any()) or bool((codes > qmax).any()):
            raise UnsupportedInputError(f"{self.name} codes must lie in [0, {qmax}]")
        c = codes.reshape(-1, enc.shape[-1] // QK_K, QK_K)
        return self.container(enc, self._fields(enc, c))
