/* The tamper detector's counting pass: the native twin of detection.cell_statistic._tally_reference, whose
 * docstrings (and cell_score's) state the rules; this file restates only what the C must match.
 *
 * Bin of a position p in [0, 1]: clamp(ceil(|p - 0.5| * 2 * cdf_points), 0, cdf_points), exact in float32 (a
 * power-of-two scaling). A decoy of a weight at position p with per-weight shift s (in cells) is p + k * s wrapped
 * into [0, 1) the way torch.remainder(., 1.0) does it: fmodf, then + 1 where the result is negative (that sum rounds:
 * -1e-9 wraps to 1.0f). fmodf(a, 1) is computed as a - truncf(a), the same value (only a zero's sign may differ,
 * which no bin and no on-code test sees). The checkpoint's lattice spacing at v is 2**(e - 1 - mantissa_bits) with
 * frexp(max(|v|, tiny)) = (m, e), read off the bits. Counts accumulate per call; the caller sums the calls of its threads.
 */
#include "native.h"

#include <math.h>
#include <string.h>

static inline int64_t bin_of(float p, int cdf_points) {
    float b = ceilf(fabsf(p - 0.5f) * (float)(2 * cdf_points));
    int64_t k = b == b ? (int64_t)(int32_t)(b < 2147483648.0f ? b : 0.0f) : 0; /* NaN and overflow: as x86, then 0 */
    return k < 0 ? 0 : (k > cdf_points ? cdf_points : k);
}

static inline float storage_ulp(float v, const struct tally_params *tp) {
    float mag = fabsf(v) < tp->tiny ? tp->tiny : fabsf(v); /* a normal float32: tiny >= 2**-126 */
    int32_t bits, ulp_bits;
    memcpy(&bits, &mag, sizeof bits);
    int32_t biased = (bits >> 23) - tp->mantissa_bits; /* 2**(e - 1 - mantissa_bits)'s exponent field */
    if (biased < 1) return ldexpf(1.0f, biased - 127); /* a float32 subnormal (float32 checkpoints only) */
    ulp_bits = biased << 23;
    memcpy(&mag, &ulp_bits, sizeof mag);
    return mag;
}

/* The decoys p + k * shift of one source weight: binned, or counted as on a code. */
static inline void count_decoys(float p, float shift, const struct tally_params *tp, int64_t *decoy_counts,
                                int64_t *on_code) {
    for (int j = 0; j < tp->nshifts; ++j) {
        float a = p + (float)tp->shifts[j] * shift;
        float d = a - truncf(a); /* fmodf(a, 1.0f), exactly (a float's fractional part is a float), inline */
        if (d != 0.0f && d < 0.0f) d += 1.0f;
        if (d < tp->on_low || d > tp->on_high) /* within float32 noise of a code: on it */
            ++*on_code;
        else
            decoy_counts[bin_of(d, tp->cdf_points)] += 1;
    }
}

VECTORIZED void cell_tally(const float *values, const float *position, const int32_t *lower, const int32_t *upper,
                           const int32_t *nearest, const float *lo, const float *hi, const float *near,
                           const float *above, ptrdiff_t count, const struct tally_params *tp, int64_t *live_counts,
                           int64_t *decoy_counts, int64_t *tally) {
    int64_t t[TALLY_FIELDS] = {0};
    for (ptrdiff_t i = 0; i < count; ++i) {
        float v = values[i], p = position[i], l = lo[i], h = hi[i];
        float nv = near ? near[i] : l; /* no near: v == l is tested already, and the near-code count is not read */
        int steerable = lower[i] != upper[i];
        int at_code = (p < tp->on_low) | (p > tp->on_high);
        int on_grid = (v == nv) | (v == l) | (v == h) | at_code;
        int end_code = (nearest[i] == tp->bottom) | (nearest[i] == tp->top);
        int live = steerable & !on_grid & (fabsf(h - l) > 0.0f);
        float ulp = storage_ulp(v, tp);
        t[TALLY_ON_GRID] += on_grid;
        t[TALLY_INTERIOR_ON_GRID] += on_grid & !end_code;
        t[TALLY_NEAR_CODE] += on_grid | !steerable | (fabsf(v - nv) <= 0.5f * ulp);
        t[TALLY_STEERABLE] += steerable;
        t[TALLY_LIVE] += live;
        if (live) live_counts[bin_of(p, tp->cdf_points)] += 1;
        if (!above) continue;
        /* in-cell decoys: from every live weight, and from every weight on an interior code (position 0 in the cell
         * toward `above`, the code next to it) */
        float pinned_step = above[i] - nv;
        if (!(live | (on_grid & !end_code & (pinned_step != 0.0f)))) continue;
        float step = live ? h - l : pinned_step;
        float spacing = fmaxf(ulp, fabsf(step) / 64.0f); /* DECOY_RESOLUTION */
        t[TALLY_SOURCE] += 1;
        count_decoys(live ? p : 0.0f, spacing / step, tp, decoy_counts, &t[TALLY_DECOY_ON_CODE]);
    }
    for (int k = 0; k < TALLY_FIELDS; ++k) tally[k] += t[k];
}
