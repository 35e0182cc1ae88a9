/* GGUF's legacy 32-weight blocks (Q8_0, Q4_0, Q5_0, Q4_1, Q5_1): the scale rule and the grid coordinates in one pass,
 * the native twin of formats.gguf_legacy.GgufLegacy's torch encoding (whose docstring states the rules, ggml's
 * quantize_row_<type>_ref). Per block: the scale d (and the minimum m), then per weight the grid coordinate u the
 * cell is read on and the code C writes. Casts of NaN or out-of-range floats follow x86, as the reference says.
 */
#include "native.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

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

/* The block maxima below, over LANES independent partial results combined at the end: the max or min of finite
 * floats does not depend on the order (the one C loop, a chain of dependent compares, ran at a quarter of the
 * speed); which element the C code picks among equal values is found by first_equal. */
#define LANES 8

static inline float abs_max(const float *xb) {
    float part[LANES] = {0};
    for (int i = 0; i < QK; i += LANES)
        for (int k = 0; k < LANES; ++k) {
            float a = fabsf(xb[i + k]);
            part[k] = a > part[k] ? a : part[k];
        }
    float m = part[0];
    for (int k = 1; k < LANES; ++k) m = part[k] > m ? part[k] : m;
    return m;
}

/* The block's largest (upper) or smallest value. */
static inline float block_extreme(const float *xb, int upper) {
    float part[LANES];
    for (int k = 0; k < LANES; ++k) part[k] = xb[k];
    for (int i = LANES; i < QK; i += LANES)
        for (int k = 0; k < LANES; ++k) {
            float v = xb[i + k];
            part[k] = (upper ? v > part[k] : v < part[k]) ? v : part[k];
        }
    float m = part[0];
    for (int k = 1; k < LANES; ++k) m = (upper ? part[k] > m : part[k] < m) ? part[k] : m;
    return m;
}

/* The index of the first element equal to v (which is one of them). */
static inline int first_equal(const float *xb, float v) {
    int i = 0;
    while (i < QK - 1 && xb[i] != v) ++i;
    return i;
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
            /* C: `if (v < min) min = v; if (v > max) max = v;` from +-FLT_MAX: the first element of the extreme value
             * (which of +0.0 / -0.0 reaches d and m) */
            lo = xb[first_equal(xb, block_extreme(xb, 0))];
            float hi = xb[first_equal(xb, block_extreme(xb, 1))];
            d = (hi - lo) / (float)qmax;
        } else if (bits == 8) {
            d = abs_max(xb) / 127.0f;
        } else {
            /* C: the first element of largest |x| (strict `<` from 0), with its sign; all zeros: +0.0 */
            const float amax = abs_max(xb);
            float max = 0.0f;
            if (amax > 0.0f)
                for (int i = 0; i < QK; ++i)
                    if (fabsf(xb[i]) == amax) {
                        max = xb[i];
                        break;
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

int legacy_block_bytes(int bits, int affine) {
    return 2 * (1 + affine) + (bits == 5 ? 4 : 0) + (bits == 8 ? QK : QK / 2);
}

static void put_half(uint8_t *out, float f) {
    uint16_t h = half_bits(f);
    out[0] = (uint8_t)h;
    out[1] = (uint8_t)(h >> 8);
}

/* One row's blocks as ggml lays them out (GgufLegacy._pack): fp16 d, fp16 m (affine), then Q8_0's 32 int8 codes, or
 * the 5-bit types' qh (bit j of a little-endian uint32 = bit 4 of code j) and 16 bytes of nibbles (code j | code
 * j + 16 << 4). */
static void pack_legacy_row(const int32_t *codes, const float *d, const float *m, ptrdiff_t nblocks, int bits,
                            int affine, uint8_t *out) {
    for (ptrdiff_t b = 0; b < nblocks; ++b) {
        const int32_t *q = codes + b * QK;
        put_half(out, d[b]);
        out += 2;
        if (affine) {
            put_half(out, m[b]);
            out += 2;
        }
        if (bits == 8) {
            for (int j = 0; j < QK; ++j) out[j] = (uint8_t)q[j];
            out += QK;
            continue;
        }
        if (bits == 5) {
            uint32_t qh = 0;
            for (int j = 0; j < QK; ++j) qh |= (uint32_t)((q[j] >> 4) & 1) << j;
            for (int k = 0; k < 4; ++k) out[k] = (uint8_t)(qh >> (8 * k));
            out += 4;
        }
        for (int j = 0; j < QK / 2; ++j) out[j] = (uint8_t)((q[j] & 0x0f) | (q[j + QK / 2] & 0x0f) << 4);
        out += QK / 2;
    }
}

int legacy_quantize(const void *x, int dtype, ptrdiff_t rows, ptrdiff_t cols, int bits, int affine, int harden,
                    uint64_t key, uint32_t row_start, uint64_t col_start, uint8_t *nearest_bytes,
                    uint8_t *hardened_bytes, int64_t *changed) {
    const ptrdiff_t nblocks = cols / QK;
    const int qmax = (affine || bits < 8) ? (1 << bits) - 1 : 127, qmin = (affine || bits < 8) ? 0 : -127;
    const ptrdiff_t row_bytes = nblocks * legacy_block_bytes(bits, affine);
    /* per row: d, m, u, position, the widened row (float) and nearest, lower, upper, codes (int32) */
    float *scratch = malloc((size_t)(2 * nblocks + 3 * cols) * sizeof(float) + (size_t)(4 * cols) * sizeof(int32_t));
    if (!scratch) return -1;
    float *d = scratch, *m = d + nblocks, *u = m + nblocks, *position = u + cols, *wide = position + cols;
    int32_t *nearest = (int32_t *)(wide + cols), *lower = nearest + cols, *upper = lower + cols, *codes = upper + cols;
    int64_t differ = 0;
    for (ptrdiff_t row = 0; row < rows; ++row) {
        legacy_encode(float_row(x, dtype, row, cols, wide), nblocks, bits, affine, d, m, u, nearest);
        pack_legacy_row(nearest, d, m, nblocks, bits, affine, nearest_bytes + row * row_bytes);
        if (!harden) continue;
        grid_cells(u, nearest, cols, qmin, qmax, 0, lower, upper, position);
        stochastic_codes(key, row_start + (uint32_t)row, 1, col_start, cols, position, lower, upper, codes);
        pack_legacy_row(codes, d, m, nblocks, bits, affine, hardened_bytes + row * row_bytes);
        for (ptrdiff_t c = 0; c < cols; ++c) differ += codes[c] != nearest[c];
    }
    *changed += differ;
    free(scratch);
    return 0;
}
