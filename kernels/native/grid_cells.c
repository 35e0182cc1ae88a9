/* Rounding cells on an integer grid in one pass: the native twin of formats.cells.integer_grid_cells' torch body,
 * and the fused passes' hardened codes drawn on those cells without keeping them.
 *
 * Per element: a grid coordinate u that is not finite collapses onto the written code (u = nearest - offset); else
 * lower = clamp(floor(u)), upper = clamp(ceil(u)) in [qmin, qmax] (clamped in float, then converted, as torch does),
 * both + offset, and position = u - floor(u) (exact), or +0 where lower == upper.
 */
#include "native.h"

#include <math.h>

/* One element's cell: lower and upper codes, and the position returned. */
static inline float grid_cell(float v, int32_t nearest, float fmin, float fmax, int offset, int32_t *lower,
                              int32_t *upper) {
    v = isfinite(v) ? v : (float)(nearest - offset);
    float lo = floorf(v), hi = ceilf(v);
    float lo_c = lo < fmin ? fmin : (lo > fmax ? fmax : lo); /* v is finite here: no NaN to order */
    float hi_c = hi < fmin ? fmin : (hi > fmax ? fmax : hi);
    int32_t l = (int32_t)lo_c, h = (int32_t)hi_c;
    *lower = l + offset;
    *upper = h + offset;
    return l == h ? 0.0f : v - lo;
}

VECTORIZED void grid_cells(const float *u, const int32_t *nearest, ptrdiff_t count, int qmin, int qmax, int offset,
                           int32_t *lower, int32_t *upper, float *position) {
    const float fmin = (float)qmin, fmax = (float)qmax;
    for (ptrdiff_t i = 0; i < count; ++i)
        position[i] = grid_cell(u[i], nearest[i], fmin, fmax, offset, &lower[i], &upper[i]);
}

/* Uniforms drawn per window: a window's draws stay in L1 until its codes are picked. */
#define WINDOW 512

/* grid_cell's pick without the cell: code = floor(v) + (draw < v - floor(v)), then clamped to [qmin, qmax]. The same
 * code in every case: an integer v has position 0 (never steps up); beyond or at an end, floor and ceil clamp to
 * the same code either way; inside, it is lower or upper as stochastic_codes picks. floor(v) is clamped to
 * [qmin - 1, qmax] in float first, so the conversion never overflows. */
VECTORIZED int64_t grid_draw(uint64_t key, uint32_t row, uint64_t col_start, const float *u, const int32_t *nearest,
                             ptrdiff_t count, int qmin, int qmax, int offset, int32_t *codes) {
    const float below = (float)qmin - 1.0f, fmax = (float)qmax;
    float draw[WINDOW];
    int64_t differ = 0;
    for (ptrdiff_t c0 = 0; c0 < count; c0 += WINDOW) {
        const ptrdiff_t width = count - c0 < WINDOW ? count - c0 : WINDOW;
        philox_uniform_grid(key, row, 1, col_start + (uint64_t)c0, width, 0, draw);
        int32_t window_differ = 0; /* 32-bit lanes: a 64-bit sum per element cost as much as the cells */
        for (ptrdiff_t c = 0; c < width; ++c) {
            const int32_t near = nearest[c0 + c];
            const float v = isfinite(u[c0 + c]) ? u[c0 + c] : (float)(near - offset), lo = floorf(v);
            float lo_c = lo < fmax ? lo : fmax; /* one-sided selects: vminps / vmaxps, v being finite */
            lo_c = lo_c > below ? lo_c : below;
            int32_t code = (int32_t)lo_c + (draw[c] < v - lo);
            code = code < qmax ? code : qmax;
            code = (code > qmin ? code : qmin) + offset;
            codes[c0 + c] = code;
            window_differ += code != near;
        }
        differ += window_differ;
    }
    return differ;
}
