/* Rounding cells on the e4m3fn grid in one pass: the native twin of formats.fp8.fp8_cells (e4m3_floor_code,
 * e4m3_round_magnitude and cells.codebook_cells on the 127 non-negative magnitudes, whose docstrings state the
 * rules). Per value r handed to the e4m3 cast: v = |r|; lower = the largest magnitude code <= v, read off v's bits
 * (saturating at 126 = 448); nearest = round to nearest, ties to the even code; upper = lower + 1 unless v sits on
 * lower or beyond the grid; position = (v - grid[lower]) / (grid[upper] - grid[lower]), or 0 on a zero-width cell;
 * negative = r's sign bit. The value r is x itself, or x divided by its row's scale or times one inverse scale (the
 * scale rules of vLLM's per-channel and per-tensor quantizers, fused here to save a pass over memory).
 */
#include "native.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define TOP_CODE 126

static inline int32_t floor_code(float v) {
    int32_t bits;
    memcpy(&bits, &v, sizeof bits);
    /* both candidates, then a select (v's range is data, a branch on it mispredicts) */
    int32_t normal = ((bits >> 23) - 120) * 8 + ((bits >> 20) & 7); /* exponent and top 3 mantissa bits */
    float f = floorf(v * 512.0f);                                    /* fixed point below the normal range: exact */
    int32_t subnormal = (f >= 0.0f && f < 2147483648.0f) ? (int32_t)f : INT32_MIN; /* NaN as on x86 (-> 0) */
    int32_t code = v >= 0x1p-6f ? normal : subnormal;
    return code < 0 ? 0 : (code > TOP_CODE ? TOP_CODE : code);
}

/* The cell of the value r handed to the e4m3 cast, written at index i. */
static inline void cell_at(float r, ptrdiff_t i, float top, int32_t *restrict lower, int32_t *restrict upper,
                           float *restrict position, int32_t *restrict nearest, uint8_t *restrict negative) {
    float v = fabsf(r);
    int32_t lo = floor_code(v);
    int32_t next = lo < TOP_CODE ? lo + 1 : TOP_CODE;
    float g_lo = e4m3_magnitude(lo), g_next = e4m3_magnitude(next);
    float mid = (g_lo + g_next) * 0.5f; /* exact in float32 */
    /* ties to the even code (an odd lower is below 126, so lo + 1 == next); written as nested selects, the form
     * gcc's if-conversion vectorizes (a bool | int mix here kept the whole loop scalar) */
    nearest[i] = v > mid ? next : (v == mid ? lo + (lo & 1) : lo);
    int32_t stays = (g_lo == v) | (v > top); /* on the lower code, or beyond the grid (v = |r| >= 0) */
    int32_t up = stays ? lo : next;
    float span = stays ? 0.0f : g_next - g_lo;
    float within = (v - g_lo) / (span > 0 ? span : 1.0f);
    lower[i] = lo;
    upper[i] = up;
    position[i] = span > 0 ? within : 0.0f;
    negative[i] = signbit(r) != 0;
}

VECTORIZED void fp8_cells(const float *restrict x, ptrdiff_t rows, ptrdiff_t cols, const float *restrict factor,
                          int rule, int32_t *restrict lower, int32_t *restrict upper, float *restrict position,
                          int32_t *restrict nearest, uint8_t *restrict negative) {
    const float top = e4m3_magnitude(TOP_CODE);
    for (ptrdiff_t row = 0; row < rows; ++row) {
        const float *xr = x + row * cols;
        ptrdiff_t base = row * cols;
        float f = rule == FP8_AS_IS ? 1.0f : factor[rule == FP8_DIVIDE_ROW ? row : 0];
        /* One loop per rule (a select on the value ahead of cell_at keeps gcc from vectorizing, so there is
         * none): the quantizers clamp r to +-448, which changes no cell (beyond 448, inf included, a value
         * saturates to the top code at position 0, as 448 itself does), and the caller keeps NaN out (x * inv is
         * NaN only for a zero weight times an infinite inverse scale, which it hands over as r instead). */
        if (rule == FP8_DIVIDE_ROW)
            for (ptrdiff_t i = 0; i < cols; ++i)
                cell_at(xr[i] / f, base + i, top, lower, upper, position, nearest, negative);
        else if (rule == FP8_MULTIPLY)
            for (ptrdiff_t i = 0; i < cols; ++i)
                cell_at(xr[i] * f, base + i, top, lower, upper, position, nearest, negative);
        else
            for (ptrdiff_t i = 0; i < cols; ++i)
                cell_at(xr[i], base + i, top, lower, upper, position, nearest, negative);
    }
}

/* vLLM's per-channel scale of one row of finite weights (Fp8E4M3._scale_rule): max(amax / 448, 1 / (448 * 512)),
 * each operation rounded once as torch does it. amax = max |x| over the bits with the sign cleared: for finite
 * floats their order is the integers' (and -0.0 becomes +0.0, as abs() makes it), and an integer max vectorizes. */
static float row_scale(const float *x, ptrdiff_t cols) {
    const float floor_scale = 1.0f / 229376.0f; /* 1 / (448 * 512): both exact, the quotient rounded once */
    uint32_t top = 0;
    for (ptrdiff_t i = 0; i < cols; ++i) {
        uint32_t bits;
        memcpy(&bits, x + i, sizeof bits);
        bits &= 0x7fffffffu;
        top = bits > top ? bits : top;
    }
    float amax;
    memcpy(&amax, &top, sizeof amax);
    float scale = amax / 448.0f;
    return scale < floor_scale ? floor_scale : scale;
}

/* Quantize rows x cols weights (float32, bfloat16 or float16: `dtype`, widen.c) to e4m3 bytes without keeping their
 * cells: each row's cells go to row-sized scratch (in cache), the stochastic choice is stochastic_codes' on the row's
 * global coordinates, and the bytes are Fp8E4M3._pack's (magnitude code | sign << 7). FP8_ROW_SCALE computes each
 * row's scale first (from the row, in cache: a pass over memory saved) and writes it to factor[row]. Writes
 * round-to-nearest bytes, and with `harden` the hardened bytes and how many differ. Returns 0, or -1 when the scratch
 * could not be allocated (nothing written). An AVX2 clone where the CPU has it, as the passes it calls: compiled for
 * SSE2 alone, its own byte packing and count took a third of the hardened pass. */
VECTORIZED int fp8_quantize(const void *x, int dtype, ptrdiff_t rows, ptrdiff_t cols, float *factor, int rule,
                            int harden, uint64_t key, uint32_t row_start, uint64_t col_start, uint8_t *nearest_bytes,
                            uint8_t *hardened_bytes, int64_t *changed) {
    int32_t *scratch = malloc((size_t)cols * (4 * sizeof(int32_t) + 2 * sizeof(float) + 1));
    if (!scratch) return -1;
    int32_t *lower = scratch, *upper = lower + cols, *nearest = upper + cols, *codes = nearest + cols;
    float *position = (float *)(codes + cols), *wide = position + cols;
    uint8_t *negative = (uint8_t *)(wide + cols);
    int64_t differ = 0;
    for (ptrdiff_t row = 0; row < rows; ++row) {
        const float *xr = float_row(x, dtype, row, cols, wide);
        if (rule == FP8_ROW_SCALE) factor[row] = row_scale(xr, cols);
        const int cell_rule = rule == FP8_ROW_SCALE ? FP8_DIVIDE_ROW : rule;
        const float *row_factor = cell_rule == FP8_DIVIDE_ROW ? factor + row : factor;
        fp8_cells(xr, 1, cols, row_factor, cell_rule, lower, upper, position, nearest, negative);
        uint8_t *near_out = nearest_bytes + row * cols, *hard_out = hardened_bytes + row * cols;
        for (ptrdiff_t c = 0; c < cols; ++c) near_out[c] = (uint8_t)(nearest[c] | negative[c] << 7);
        if (!harden) continue;
        stochastic_codes(key, row_start + (uint32_t)row, 1, col_start, cols, position, lower, upper, codes);
        int32_t row_differ = 0; /* 32-bit lanes: a 64-bit sum per element kept the loop slow */
        for (ptrdiff_t c = 0; c < cols; ++c) {
            hard_out[c] = (uint8_t)(codes[c] | negative[c] << 7);
            row_differ += codes[c] != nearest[c];
        }
        differ += row_differ;
    }
    *changed += differ;
    free(scratch);
    return 0;
}
