/* Rounding cells on an integer grid in one pass: the native twin of formats.cells.integer_grid_cells' torch body.
 *
 * Per element: a grid coordinate u that is not finite collapses onto the written code (u = nearest - offset); else
 * lower = clamp(floor(u)), upper = clamp(ceil(u)) in [qmin, qmax] (clamped in float, then converted, as torch does),
 * both + offset, and position = u - floor(u) (exact), or +0 where lower == upper.
 */
#include "native.h"

#include <math.h>

VECTORIZED void grid_cells(const float *u, const int32_t *nearest, ptrdiff_t count, int qmin, int qmax, int offset,
                           int32_t *lower, int32_t *upper, float *position) {
    const float fmin = (float)qmin, fmax = (float)qmax;
    for (ptrdiff_t i = 0; i < count; ++i) {
        float v = u[i];
        v = isfinite(v) ? v : (float)(nearest[i] - offset);
        float lo = floorf(v), hi = ceilf(v);
        float lo_c = lo < fmin ? fmin : (lo > fmax ? fmax : lo); /* v is finite here: no NaN to order */
        float hi_c = hi < fmin ? fmin : (hi > fmax ? fmax : hi);
        int32_t l = (int32_t)lo_c, h = (int32_t)hi_c;
        lower[i] = l + offset;
        upper[i] = h + offset;
        position[i] = l == h ? 0.0f : v - lo;
    }
}
