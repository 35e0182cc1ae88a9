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

/* The block's extremes in one pass over its 32 weights, eight lanes at a time in GCC's generic vectors (one ymm
 * operation per step in the AVX2 clone, two xmm ones otherwise; the scalar loops compiled to a chain of dependent
 * compares). Each lane applies C's `a > b ? a : b` (a NaN never displaces a number), and the lanes combine in a
 * fixed order: the max or min of floats does not depend on the order, and which element C picks among equal values
 * is settled by the callers. */
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

static inline f32x8 load8(const float *p) {
    f32x8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* a where take_a, else b (take_a: a comparison's all-ones / zero lanes) */
static inline f32x8 pick8(i32x8 take_a, f32x8 a, f32x8 b) {
    return (f32x8)(((i32x8)a & take_a) | ((i32x8)b & ~take_a));
}

static inline float lanes_max(f32x8 v) {
    float m = v[0];
    for (int k = 1; k < 8; ++k) m = v[k] > m ? v[k] : m;
    return m;
}

static inline float lanes_min(f32x8 v) {
    float m = v[0];
    for (int k = 1; k < 8; ++k) m = v[k] < m ? v[k] : m;
    return m;
}

struct extremes {
    float amax; /* largest |x| (+0.0 when none is above zero) */
    float hi, lo; /* largest and smallest x */
};

static inline struct extremes block_extremes(const float *xb) {
    const i32x8 magnitude = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff,
                             0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
    f32x8 amax = {0}, hi = load8(xb), lo = hi;
    for (int i = 0; i < QK; i += 8) {
        f32x8 v = load8(xb + i), a = (f32x8)((i32x8)v & magnitude);
        amax = pick8(a > amax, a, amax);
        hi = pick8(v > hi, v, hi);
        lo = pick8(v < lo, v, lo);
    }
    return (struct extremes){lanes_max(amax), lanes_max(hi), lanes_min(lo)};
}

/* The index of the first element equal to v (which is one of them). */
static inline int first_equal(const float *xb, float v) {
    int i = 0;
    while (i < QK - 1 && xb[i] != v) ++i;
    return i;
}

/* The element C reaches as the block's extreme v: a non-zero float equals only itself, so the scan for the first
 * equal element (a branch mispredicted once per block) is needed only to tell +0.0 from -0.0 (and for a NaN). */
static inline float first_of(const float *xb, float v) {
    return isfinite(v) && v != 0.0f ? v : xb[first_equal(xb, v)];
}

/* C's signed maximum of the symmetric 4- and 5-bit types: the first element of largest |x| (strict `<` from 0),
 * with its sign; all zeros: +0.0. It is hi or lo, whichever is farther from zero (a select: the side is a coin flip
 * per block, which a branch would mispredict every other block); only a block holding both +amax and -amax needs
 * the scan for the first of them. */
static inline float signed_max(const float *xb, struct extremes e) {
    if (!(e.amax > 0.0f)) return 0.0f;
    if (e.hi > -e.lo || e.hi < -e.lo) return e.hi > -e.lo ? e.hi : e.lo;
    for (int i = 0; i < QK; ++i)
        if (fabsf(xb[i]) == e.amax) return xb[i];
    return 0.0f;
}

VECTORIZED void legacy_encode(const float *restrict x, ptrdiff_t nblocks, int bits, int affine, float *restrict d_out,
                              float *restrict m_out, float *restrict u, int32_t *restrict nearest) {
    const int qmax = (affine || bits < 8) ? (1 << bits) - 1 : 127;
    const int offset = (affine || bits == 8) ? 0 : 1 << (bits - 1);
    const int capped = !(affine && bits == 5); /* MIN(15, ...) / MIN(31, ...); Q5_1 has no cap */
    for (ptrdiff_t b = 0; b < nblocks; ++b) {
        const float *xb = x + b * QK;
        const struct extremes e = block_extremes(xb);
        float d, lo = 0.0f;
        if (affine) {
            /* C: `if (v < min) min = v; if (v > max) max = v;` from +-FLT_MAX: the first element of the extreme value
             * (which of +0.0 / -0.0 reaches d and m) */
            lo = first_of(xb, e.lo);
            d = (first_of(xb, e.hi) - lo) / (float)qmax;
        } else if (bits == 8) {
            d = e.amax / 127.0f;
        } else {
            d = signed_max(xb, e) / (float)(-offset);
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

static void put_half(uint8_t *out, uint16_t h) {
    out[0] = (uint8_t)h;
    out[1] = (uint8_t)(h >> 8);
}

/* One row's blocks as ggml lays them out (GgufLegacy._pack): fp16 d, fp16 m (affine; both given as their fp16 bits),
 * then Q8_0's 32 int8 codes, or the 5-bit types' qh (bit j of a little-endian uint32 = bit 4 of code j) and 16 bytes
 * of nibbles (code j | code j + 16 << 4). */
VECTORIZED static void pack_legacy_row(const int32_t *codes, const uint16_t *d, const uint16_t *m, ptrdiff_t nblocks,
                                       int bits, int affine, uint8_t *out) {
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

/* Blocks per window of a row: the window's coordinates and codes stay in L1 between the passes. */
#define WINDOW_BLOCKS 8

int legacy_quantize(const void *x, int dtype, ptrdiff_t rows, ptrdiff_t cols, int bits, int affine, int harden,
                    uint64_t key, uint32_t row_start, uint64_t col_start, uint8_t *nearest_bytes,
                    uint8_t *hardened_bytes, int64_t *changed) {
    enum { N = WINDOW_BLOCKS * QK };
    const ptrdiff_t nblocks = cols / QK;
    const int qmax = (affine || bits < 8) ? (1 << bits) - 1 : 127, qmin = (affine || bits < 8) ? 0 : -127;
    const int block_bytes = legacy_block_bytes(bits, affine);
    float *wide = malloc((size_t)cols * sizeof(float)); /* a 16-bit row widened */
    if (!wide) return -1;
    float d[WINDOW_BLOCKS], m[WINDOW_BLOCKS], u[N];
    uint16_t dh[WINDOW_BLOCKS], mh[WINDOW_BLOCKS];
    int32_t nearest[N], codes[N];
    int64_t differ = 0;
    for (ptrdiff_t row = 0; row < rows; ++row) {
        const float *xr = float_row(x, dtype, row, cols, wide);
        uint8_t *near_out = nearest_bytes + row * nblocks * block_bytes;
        uint8_t *hard_out = hardened_bytes + row * nblocks * block_bytes;
        for (ptrdiff_t b0 = 0; b0 < nblocks; b0 += WINDOW_BLOCKS) {
            const ptrdiff_t count = nblocks - b0 < WINDOW_BLOCKS ? nblocks - b0 : WINDOW_BLOCKS, n = count * QK;
            legacy_encode(xr + b0 * QK, count, bits, affine, d, m, u, nearest);
            for (ptrdiff_t b = 0; b < count; ++b) { /* the scales' fp16 bits, shared by both packs */
                dh[b] = half_bits(d[b]);
                mh[b] = affine ? half_bits(m[b]) : 0;
            }
            pack_legacy_row(nearest, dh, mh, count, bits, affine, near_out + b0 * block_bytes);
            if (!harden) continue;
            differ += grid_draw(key, row_start + (uint32_t)row, col_start + (uint64_t)(b0 * QK), u, nearest, n, qmin,
                                qmax, 0, codes);
            pack_legacy_row(codes, dh, mh, count, bits, affine, hard_out + b0 * block_bytes);
        }
    }
    *changed += differ;
    free(wide);
    return 0;
}
