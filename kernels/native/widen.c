/* 16-bit floats: checkpoint rows as float32, one row at a time, and the IEEE half conversions the packers share.
 *
 * Rows: the fused quantize passes read bfloat16 and float16 weights as they are and widen each row into row-sized
 * scratch (in cache), instead of a float32 copy of the whole tensor, whose fresh pages cost more than the conversion
 * (1.5 ns per weight on a 23 M-weight tensor, measured). Both widenings are exact, as torch's .float(): bfloat16 is
 * float32's upper half; a float16 normal rebiases its exponent (15 -> 127), a subnormal or zero is its integer
 * mantissa times 2**-24 (exact in float32, signed zeros kept), and inf and NaN keep their class (the callers refuse
 * non-finite weights before any pass). float16 rows take F16C's conversion where the CPU has it (widen_init). */
#include "native.h"

#include <math.h>
#include <string.h>

static inline float from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float half_value(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    const float fixed = (float)mantissa * 0x1p-24f; /* exponent 0: subnormal or zero */
    const float wide = from_bits(exponent == 0x1f ? (sign | 0x7f800000u | mantissa << 13)
                                                  : (sign | (exponent + 112) << 23 | mantissa << 13));
    return exponent == 0 ? (sign ? -fixed : fixed) : wide;
}

VECTORIZED static void widen_half_c(const uint16_t *in, ptrdiff_t n, float *restrict out) {
    for (ptrdiff_t i = 0; i < n; ++i) out[i] = half_value(in[i]);
}

typedef void (*widen_half_fn)(const uint16_t *, ptrdiff_t, float *restrict);

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* F16C's vcvtph2ps, eight halves per instruction: exact like half_value for every finite half and infinity (MXCSR's
 * DAZ does not apply to it; tested over all 2^16 bit patterns). A NaN comes out quiet, whose payload no caller sees:
 * non-finite weights are refused before any pass. */
__attribute__((target("avx,f16c"))) static void widen_half_f16c(const uint16_t *in, ptrdiff_t n,
                                                                float *restrict out) {
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + i))));
    for (; i < n; ++i) out[i] = half_value(in[i]);
}
#endif

static widen_half_fn widen_half = widen_half_c;

int widen_init(int widest) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (widest >= WIDEN_F16C && __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c")) {
        widen_half = widen_half_f16c;
        return WIDEN_F16C;
    }
#endif
    (void)widest;
    widen_half = widen_half_c;
    return WIDEN_PORTABLE;
}

VECTORIZED const float *float_row(const void *x, int dtype, ptrdiff_t row, ptrdiff_t cols, float *restrict scratch) {
    if (dtype == WEIGHTS_F32) return (const float *)x + row * cols;
    const uint16_t *in = (const uint16_t *)x + row * cols;
    if (dtype == WEIGHTS_BF16)
        for (ptrdiff_t i = 0; i < cols; ++i) scratch[i] = from_bits((uint32_t)in[i] << 16);
    else
        widen_half(in, cols, scratch);
    return scratch;
}

float half_to_float(uint16_t h) { return half_value(h); }

/* IEEE half bits of f, rounded to nearest even, as torch's float -> float16 and ggml's GGML_FP32_TO_FP16 round;
 * beyond the half range inf, NaN the quiet 0x7e00 (a finite input never makes one). */
uint16_t half_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u;
    if (ax >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520, the midpoint above 65504: inf */
    if (ax < 0x38800000u) {                       /* below 2**-14: a half subnormal, in units of 2**-24 */
        float a;
        memcpy(&a, &ax, sizeof a);
        return sign | (uint16_t)rintf(a * 0x1p24f); /* exact scaling, then ties to even; 1024 is the first normal */
    }
    const uint32_t rebased = ax - 0x38000000u; /* exponent bias 127 -> 15 */
    uint32_t h = rebased >> 13, rest = rebased & 0x1fffu;
    h += rest > 0x1000u || (rest == 0x1000u && (h & 1u)); /* a carry into the exponent is the right rounding */
    return sign | (uint16_t)h;
}
