"""bitsandbytes formats, the schemes the QCB papers attack: LLM.int8 row-wise absmax, NF4 and FP4 with 64-blocks.

The rules are those of bitsandbytes 0.50 on CPU (backends/default/ops.py for the 4-bit and int8 quantizers,
csrc/cpu_ops.cpp for the 8-bit blockwise quantizer that double quantization uses):

- LLM.int8: row_stats = max|row|; codes = round_half_even(x * (127 / row_stats)) as int8.
- NF4 / FP4: the tensor is flattened and cut into blocks of 64 (a shorter last block keeps its own absmax);
  v = clamp(x * (1 / max(absmax, 1e-38)), -1, 1), or x / absmax for the short last block; the code is the nearest
  codebook entry, ties going to the lower value (torch.bucketize on the midpoints). Codes are packed two per byte,
  the first element in the high nibble; an odd element count is padded with the code of 0.0.
- Double quantization (QLoRA): absmax - mean(absmax) is quantized with the signed 8-bit dynamic map in blocks of 256,
  through a 65536-entry lookup table: index = (uint16)((v + 1) * 0.5 * 65535 + 0.5), v = clamp(a / blockmax, -1, 1).
"""

from __future__ import annotations

import functools

import torch

from ..errors import UnsupportedInputError
from ..numerics import div_rn
from .base import CodeValueRule, Encoding, Format, QuantizedTensor
from .cells import codebook_cells, integer_grid_cells
from .registry import register_format

__all__ = ["FP4_CODE", "NF4_CODE", "BnbCodebook4bit", "BnbRowwiseInt8", "dynamic_map", "quantize_dynamic_blockwise"]

# bitsandbytes' code tables, in storage order (the 4-bit value written to the nibble indexes these).
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
# FP4 (e2m1 with bitsandbytes' own exponent bias), normalized by its largest magnitude 12 in float32 like bnb does.
FP4_CODE = torch.tensor(
    [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], dtype=torch.float32
) / torch.tensor(12.0, dtype=torch.float32)

_ABSMAX_FLOOR = 1e-38  # bnb clamps the block absmax before taking its reciprocal (all-zero blocks)
_DQ_BLOCK = 256  # double quantization block size of the absmax statistics
_LUT_SIZE = 65536


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class BnbRowwiseInt8(Format):
    """LLM.int8 weights: one absmax per row, symmetric int8 codes in [-127, 127], round half to even."""

    family = "absmax-int"
    bits = 8

    def __init__(self, name: str) -> None:
        self.name = name
        self.description = "bitsandbytes LLM.int8 row-wise absmax int8"

    def check_shape(self, x: torch.Tensor, name: str) -> None:
        if x.dim() != 2:
            raise UnsupportedInputError(
                f"tensor {name!r}: {self.name} quantizes 2-D weights row by row, got shape {tuple(x.shape)}"
            )

    def _encode(self, x: torch.Tensor) -> Encoding:
        row_stats = x.abs().amax(dim=1)
        # An all-zero row makes bnb compute 0 * inf = NaN and a subnormal row an infinite multiplier: the codes are then
        # whatever torch's float -> int8 cast makes of them, and we take the very same cast.
        u = x * (127.0 / row_stats.unsqueeze(-1))
        nearest = torch.round(u).to(torch.int8).to(torch.int32)
        cells = integer_grid_cells(u, nearest, -127, 127)
        return Encoding(self.name, x.shape, cells, {"row_stats": row_stats})

    def _pack(self, enc: Encoding, codes: torch.Tensor) -> QuantizedTensor:
        return QuantizedTensor(
            self.name, enc.shape, {"int8": codes.to(torch.int8), "row_stats": enc.scales["row_stats"]}
        )

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        return q.tensors["int8"].float() * (q.tensors["row_stats"].unsqueeze(-1) / 127.0)

    def code_values(self, enc: Encoding, codes: torch.Tensor) -> torch.Tensor:
        return codes.float() * (enc.scales["row_stats"].unsqueeze(-1) / 127.0)

    def code_value_rule(self, enc: Encoding) -> CodeValueRule:
        """code_values as a rule: code * (row_stats / 127), per row."""
        table = torch.arange(-127, 128, dtype=torch.float32)
        return CodeValueRule(table, -127, enc.scales["row_stats"] / 127.0, enc.shape[-1])


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (create_dynamic_map(True, 7, 8)), sorted ascending, float32.

    Dynamic exponent (powers of ten from 1e-6 to 1) with a shrinking linear fraction: entries are the means of
    linspace(0.1, 1) intervals scaled by each power of ten, plus 0 and 1.
    """
    data: list[float] = []
    non_sign_bits, max_exponent_bits = 7, 7
    for i in range(max_exponent_bits):
        bounds = torch.linspace(0.1, 1, 2 ** (i + non_sign_bits - max_exponent_bits) + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@functools.cache
def _dynamic_lut() -> torch.Tensor:
    """The CPU quantizer's table from uint16 bins of [-1, 1] to the code whose midpoint interval holds the bin."""
    code = dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_LUT_SIZE, dtype=torch.float32)
    val = -1.0 + (2.0 * i) / float(_LUT_SIZE - 1)
    # code_idx advances while midpoints[code_idx] < val: the count of midpoints strictly below val.
    return torch.searchsorted(midpoints, val, side="left").to(torch.uint8)


def quantize_dynamic_blockwise(a: torch.Tensor, blocksize: int = _DQ_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's CPU quantize_blockwise with the dynamic map: (uint8 codes, float32 absmax per block).

    Each value goes through a 16-bit bin first: index = trunc((clamp(a / absmax) + 1) * 0.5 * 65535 + 0.5)
    (the C code multiplies by the float reciprocal of absmax, and its two products and the sum round separately).
    """
    n = a.numel()
    nblocks = -(-n // blocksize)
    padded = torch.zeros(nblocks * blocksize, dtype=torch.float32)
    padded[:n] = a.reshape(-1)
    blocks = padded.view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = div_rn(1.0, absmax)  # C: 1.0f / absmax_block
    v = (blocks * inv.unsqueeze(1)).clamp(-1.0, 1.0)
    index = torch.trunc((v + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = _dynamic_lut()[index.clamp(0, _LUT_SIZE - 1)]
    codes = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n], absmax


class BnbCodebook4bit(Format):
    """bitsandbytes 4-bit blockwise formats (NF4, FP4): a 16-entry codebook scaled by each block's absmax.

    Code space: indices into the distinct codebook values sorted ascending. FP4 stores 0.0 twice (nibbles 0 and 8);
    bitsandbytes writes nibble 0 for v in (-m, 0] and nibble 8 for v in (0, m), m the midpoint to the next entry.
    """

    family = "codebook-4bit"
    bits = 4

    def __init__(self, name: str, code: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> None:
        self.name = name
        self.code = code
        self.blocksize = blocksize
        self.double_quant = double_quant
        kind = name.split("_")[0].upper()
        self.description = f"bitsandbytes {kind}, blocks of {blocksize}" + (
            ", double-quantized absmax" if double_quant else ""
        )
        self.grid = torch.unique(code)  # sorted, distinct (the two FP4 zeros become one entry)
        # Storage nibbles of each grid entry: for a duplicated value, [first, second] in bnb's sort order.
        storage = [torch.nonzero(code == g).flatten().tolist() for g in self.grid]
        self._nibble_low = torch.tensor([s[0] for s in storage], dtype=torch.uint8)
        self._nibble_high = torch.tensor([s[-1] for s in storage], dtype=torch.uint8)
        self._grid_of_nibble = torch.searchsorted(self.grid, code)
        self._midpoints = (self.grid[:-1] + self.grid[1:]) / 2

    def _normalized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v in [-1, 1] per element, absmax per block), exactly as bnb's quantize_4bit computes them."""
        flat = x.reshape(-1)
        n = flat.numel()
        full = n - n % self.blocksize
        body = flat[:full].view(-1, self.blocksize)
        absmax = body.abs().amax(dim=1)
        v = (body * (1.0 / absmax.clamp(min=_ABSMAX_FLOOR)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
        if full < n:
            tail = flat[full:]
            tail_max = tail.abs().amax().clamp(min=_ABSMAX_FLOOR)
            absmax = torch.cat([absmax, tail_max.unsqueeze(0)])  # stored clamped, unlike full blocks
            v = torch.cat([v, (tail / tail_max).clamp(-1, 1)])  # bnb divides here instead of multiplying
        return v, absmax

    def _encode(self, x: torch.Tensor) -> Encoding:
        v, absmax = self._normalized(x)
        nearest = torch.bucketize(v, self._midpoints)  # ties (v == midpoint) go to the lower entry
        cells = codebook_cells(v, self.grid, nearest)
        cells = type(cells)(*(t.view(x.shape) for t in (cells.lower, cells.upper, cells.position, cells.nearest)))
        scales = {"absmax": absmax, "v_positive": (v > 0).view(x.shape)}
        if self.double_quant:
            offset = absmax.mean()  # torch's own reduction, as bnb computes it
            scales["absmax_codes"], scales["nested_absmax"] = quantize_dynamic_blockwise(absmax - offset)
            scales["offset"] = offset
        return Encoding(self.name, x.shape, cells, scales)

    def _nibbles(self, enc: Encoding, codes: torch.Tensor) -> torch.Tensor:
        grid_index = codes.reshape(-1).long()
        positive = enc.scales["v_positive"].reshape(-1)
        return torch.where(positive, self._nibble_high[grid_index], self._nibble_low[grid_index])

    def _pack(self, enc: Encoding, codes: torch.Tensor) -> QuantizedTensor:
        if codes.min() < 0 or codes.max() >= self.grid.numel():
            raise UnsupportedInputError(f"{self.name} codes must lie in [0, {self.grid.numel() - 1}]")
        nibbles = self._nibbles(enc, codes)
        if nibbles.numel() % 2:
            zero_nibble = self._nibble_low[torch.searchsorted(self.grid, torch.tensor(0.0, dtype=self.grid.dtype))]
            nibbles = torch.cat([nibbles, zero_nibble.reshape(1)])
        packed = ((nibbles[::2] << 4) | nibbles[1::2]).unsqueeze(1)
        if self.double_quant:
            tensors = {
                "weight": packed,
                "absmax": enc.scales["absmax_codes"],
                "offset": enc.scales["offset"],
                "nested_absmax": enc.scales["nested_absmax"],
            }
        else:
            tensors = {"weight": packed, "absmax": enc.scales["absmax"]}
        return QuantizedTensor(self.name, enc.shape, tensors)

    def _stored_absmax(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The absmax a consumer sees: after double quantization when it is on."""
        if not self.double_quant:
            return tensors["absmax"]
        nested = tensors["nested_absmax"].repeat_interleave(_DQ_BLOCK)[: tensors["absmax"].numel()]
        return dynamic_map()[tensors["absmax"].long()] * nested + tensors["offset"]

    def _scale_elements(self, values: torch.Tensor, absmax: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        block_of = torch.arange(values.numel()) // self.blocksize
        return (values * absmax[block_of]).view(shape)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        n = q.shape.numel()
        packed = q.tensors["weight"].reshape(-1)
        nibbles = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]
        return self._scale_elements(self.code[nibbles.long()], self._stored_absmax(q.tensors), q.shape)

    def code_values(self, enc: Encoding, codes: torch.Tensor) -> torch.Tensor:
        return self._scale_elements(self.grid[codes.reshape(-1).long()], self._consumer_absmax(enc), enc.shape)

    def code_value_rule(self, enc: Encoding) -> CodeValueRule:
        """code_values as a rule: grid value * the block's absmax as a consumer reads it, per block."""
        return CodeValueRule(self.grid, 0, self._consumer_absmax(enc), self.blocksize)

    def _consumer_absmax(self, enc: Encoding) -> torch.Tensor:
        return self._stored_absmax(self._pack(enc, enc.cells.nearest).tensors)


register_format(BnbRowwiseInt8("bnb_int8"))
register_format(BnbCodebook4bit("nf4", NF4_CODE))
register_format(BnbCodebook4bit("nf4_dq", NF4_CODE, double_quant=True))
register_format(BnbCodebook4bit("fp4", FP4_CODE))
