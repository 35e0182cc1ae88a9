/* GGUF's legacy 32-weight blocks (Q8_0, Q4_0, Q5_0, Q4_1, Q5_1): the scale rule and the grid coordinates in one pass,
 * the native twin of formats.gguf_legacy.GgufLegacy's torch encoding (whose docstring states the rules, ggml's
 * quantize_row_<type>_ref). Per block: the scale d (and the minimum m), then per weight the grid coordinate u the
 * cell is read on and the code C writes. Casts of NaN or out-of-range floats follow x86, as the reference says.
 */
#include "native.h"

#include <float.h>
#include <math.h>

#define QK 32

/* C's (int8_t) of a float on x86: cvttss2si (NaN and out-of-range give INT32_MIN), then the low byte. */
static inline int32_t c_float_to_int8(float v) {
    int32_t t = (v > -2147483904.0f && v < 2147483648.0f) ? (int32_t)v : INT32_MIN;
    return ((t & 0xFF) ^ 0x80) - 0x80;
}

/* C's roundf: half away from zero (v - trunc(v) is exact). */
static inline float c_roundf(float v) {
    float t = truncf(v);
    return fabsf(v - t) >= 0.5f ? t + (v > 0 ? 1.0f : -1.0f) : t;
}

VECTORIZED void legacy_encode(const float *x, ptrdiff_t nblocks, int bits, int affine, float *d_out, float *m_out,
                              float *u, int32_t *nearest) {
    const int qmax = (affine || bits < 8) ? (1 << bits) - 1 : 127;
    const int offset = (affine || bits == 8) ? 0 : 1 << (bits - 1);
    const int capped = !(affine && bits == 5); /* MIN(15, ...) / MIN(31, ...); Q5_1 has no cap */
    for (ptrdiff_t b = 0; b < nblocks; ++b) {
        const float *xb = x + b * QK;
        float d, lo = 0.0f;
        if (affine) {
            float hi = -FLT_MAX;
            lo = FLT_MAX;
            for (int i = 0; i < QK; ++i) {
                if (xb[i] < lo) lo = xb[i];
                if (xb[i] > hi) hi = xb[i];
            }
            d = (hi - lo) / (float)qmax;
        } else if (bits == 8) {
            float amax = 0.0f;
            for (int i = 0; i < QK; ++i) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
            d = amax / 127.0f;
        } else {
            float amax = 0.0f, max = 0.0f;
            for (int i = 0; i < QK; ++i)
                if (amax < fabsf(xb[i])) {
                    amax = fabsf(xb[i]);
                    max = xb[i];
                }
            d = max / (float)(-offset);
        }
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        float *ub = u + b * QK;
        int32_t *qb = nearest + b * QK;
        if (bits == 8) {
            for (int i = 0; i < QK; ++i) {
                float s = xb[i] * id;
                ub[i] = s;
                qb[i] = c_float_to_int8(c_roundf(s));
            }
        } else {
            const float shift = (float)offset + 0.5f;
            for (int i = 0; i < QK; ++i) {
                float w = (affine ? xb[i] - lo : xb[i]) * id + shift; /* the float C truncates */
                ub[i] = w - 0.5f; /* exact: the coordinate whose floor and ceil bracket the truncation */
                int32_t q = c_float_to_int8(w);
                qb[i] = capped && q > qmax ? qmax : q;
            }
        }
        d_out[b] = d;
        if (affine) m_out[b] = lo;
    }
}
