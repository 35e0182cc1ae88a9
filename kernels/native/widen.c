/* Checkpoint rows as float32, one row at a time: the fused quantize passes read bfloat16 and float16 weights as
 * they are and widen each row into row-sized scratch (in cache), instead of a float32 copy of the whole tensor,
 * whose fresh pages cost more than the conversion (1.5 ns per weight on a 23 M-weight tensor, measured).
 * Both widenings are exact, as torch's .float(): bfloat16 is float32's upper half; a float16 normal rebiases its
 * exponent (15 -> 127), a subnormal or zero is its integer mantissa times 2**-24 (exact in float32, signed zeros
 * kept), and inf and NaN keep their class (the callers refuse non-finite weights before any pass). */
#include "native.h"

#include <string.h>

static inline float from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    const float fixed = (float)mantissa * 0x1p-24f; /* exponent 0: subnormal or zero */
    const float wide = from_bits(exponent == 0x1f ? (sign | 0x7f800000u | mantissa << 13)
                                                  : (sign | (exponent + 112) << 23 | mantissa << 13));
    return exponent == 0 ? (sign ? -fixed : fixed) : wide;
}

VECTORIZED const float *float_row(const void *x, int dtype, ptrdiff_t row, ptrdiff_t cols, float *restrict scratch) {
    if (dtype == WEIGHTS_F32) return (const float *)x + row * cols;
    const uint16_t *in = (const uint16_t *)x + row * cols;
    if (dtype == WEIGHTS_BF16)
        for (ptrdiff_t i = 0; i < cols; ++i) scratch[i] = from_bits((uint32_t)in[i] << 16);
    else
        for (ptrdiff_t i = 0; i < cols; ++i) scratch[i] = half_to_float(in[i]);
    return scratch;
}
