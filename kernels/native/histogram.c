/* The tamper detector's counting passes: the native twins of detection.cell_statistic._boundary_counts and of the
 * in-cell decoy loop (_in_cell_decoys), whose docstrings state the rules.
 *
 * Bin of a position p in [0, 1]: clamp(ceil(|p - 0.5| * 2 * cdf_points), 0, cdf_points), exact in float32 (a
 * power-of-two scaling). A decoy of a weight at position p with per-weight shift s (in cells) is p + k * s wrapped
 * into [0, 1) the way torch.remainder(., 1.0) does it: fmodf, then + 1 where the result is negative (that sum rounds:
 * -1e-9 wraps to 1.0f). fmodf(a, 1) is computed as a - truncf(a), the same value (only a zero's sign may differ,
 * which no bin and no on-code test sees). Counts accumulate per call; the caller sums the calls of its threads.
 */
#include "native.h"

#include <math.h>

static inline int64_t bin_of(float p, int cdf_points) {
    float b = ceilf(fabsf(p - 0.5f) * (float)(2 * cdf_points));
    int64_t k = b == b ? (int64_t)(int32_t)(b < 2147483648.0f ? b : 0.0f) : 0; /* NaN and overflow: as x86, then 0 */
    return k < 0 ? 0 : (k > cdf_points ? cdf_points : k);
}

VECTORIZED void boundary_histogram(const float *position, const uint8_t *keep, ptrdiff_t count, int cdf_points,
                        int64_t *counts) {
    for (ptrdiff_t i = 0; i < count; ++i)
        if (keep[i]) counts[bin_of(position[i], cdf_points)] += 1;
}

VECTORIZED void decoy_histogram(const float *position, const float *shift, const uint8_t *source, ptrdiff_t count,
                     const int32_t *shifts, int nshifts, float on_low, float on_high, int cdf_points, int64_t *counts,
                     int64_t *on_code) {
    int64_t on = 0;
    for (ptrdiff_t i = 0; i < count; ++i) {
        if (!source[i]) continue;
        for (int j = 0; j < nshifts; ++j) {
            float a = position[i] + (float)shifts[j] * shift[i];
            float d = a - truncf(a); /* fmodf(a, 1.0f), exactly (a float's fractional part is a float), inline */
            if (d != 0.0f && d < 0.0f) d += 1.0f;
            if (d < on_low || d > on_high) { /* within float32 noise of a code: on it */
                ++on;
                continue;
            }
            counts[bin_of(d, cdf_points)] += 1;
        }
    }
    *on_code += on;
}
