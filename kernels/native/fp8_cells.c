/* Rounding cells on the e4m3fn grid in one pass: the native twin of formats.fp8.fp8_cells (e4m3_floor_code,
 * e4m3_round_magnitude and cells.codebook_cells on the 127 non-negative magnitudes, whose docstrings state the
 * rules). Per value r handed to the e4m3 cast: v = |r|; lower = the largest magnitude code <= v, read off v's bits
 * (saturating at 126 = 448); nearest = round to nearest, ties to the even code; upper = lower + 1 unless v sits on
 * lower or beyond the grid; position = (v - grid[lower]) / (grid[upper] - grid[lower]), or 0 on a zero-width cell;
 * negative = r's sign bit.
 */
#include "native.h"

#include <math.h>
#include <string.h>

#define TOP_CODE 126

static float grid[TOP_CODE + 1]; /* e4m3fn magnitudes by code; filled once by fp8_cells_init */

void fp8_cells_init(void) {
    for (int c = 0; c <= TOP_CODE; ++c) {
        int e = c >> 3, m = c & 7;
        grid[c] = e == 0 ? (float)m * 0x1p-9f : ldexpf(1.0f + (float)m / 8.0f, e - 7); /* exact */
    }
}

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

VECTORIZED void fp8_cells(const float *r, ptrdiff_t count, int32_t *lower, int32_t *upper, float *position,
                          int32_t *nearest, uint8_t *negative) {
    for (ptrdiff_t i = 0; i < count; ++i) {
        float v = fabsf(r[i]);
        int32_t lo = floor_code(v);
        int32_t next = lo < TOP_CODE ? lo + 1 : TOP_CODE;
        float mid = (grid[lo] + grid[next]) * 0.5f; /* exact in float32 */
        /* bitwise | and & rather than || and &&: selects, not data-dependent branches */
        nearest[i] = ((v > mid) | ((v == mid) & (lo & 1))) ? next : lo;
        int32_t up = ((grid[lo] == v) | (v > grid[TOP_CODE]) | (v < grid[0])) ? lo : next;
        float span = grid[up] - grid[lo];
        float within = (v - grid[lo]) / (span > 0 ? span : 1.0f);
        lower[i] = lo;
        upper[i] = up;
        position[i] = span > 0 ? within : 0.0f;
        negative[i] = signbit(r[i]) != 0;
    }
}
