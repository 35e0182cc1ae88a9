/* Calibrated hardening's column loop inside one lazy block: the native twin of the per-column steps of
 * hardening.feedback.feedback_codes (its docstring and _Grid's state the rule).
 *
 * The arrays are in the reference's layout: transposed to (cols, ld) in rounding order, so that column j of rows
 * [0, count) is contiguous; this job's rows start at row0 of the tensor (for the group of an element: its flat index
 * in the original (rows, cols) weight is row * cols + order[j]). Per element, in the reference's operations and
 * order (float64, one rounding each, no contraction):
 *   multiplier = +-scale[group], shift = shift[group]; live = multiplier != 0 and both finite;
 *   z = (target - shift) * (1 / multiplier); lower = (entries of table <= z) - 1, clamped to [0, last] (NaN: last);
 *   upper = min(lower + 1, last); position = (z - table[lower]) / span (span > 0, else 1), clamped to [0, 1];
 *   index = u < position ? upper : lower (live), else the round-to-nearest index;
 *   error = (target - (table[index] * multiplier + shift)) / factor[j][j] (0 where not live);
 * and every later column c of the block: target[c] -= factor[j][c] * error. The trailing columns' update (a matrix
 * product) stays with the caller, so that both paths share it.
 */
#include "native.h"

#include <math.h>

#define ROW_TILE 256 /* rows per pass over the block: the block's targets (128 x 256 doubles) stay in L2 */

/* torch.searchsorted(table, z, right=True) - 1 clamped to [0, n - 1]: the last entry <= z; NaN sorts above all. */
static inline int32_t lower_entry(const double *table, int32_t n, double z) {
    if (isnan(z)) return n - 1;
    int32_t lo = 0, hi = n; /* the count of entries <= z lies in [lo, hi] */
    while (lo < hi) {
        int32_t mid = (lo + hi) / 2;
        if (table[mid] <= z)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo > 0 ? lo - 1 : 0;
}

VECTORIZED void feedback_block(const struct value_rule *rule, const int64_t *order, ptrdiff_t cols, ptrdiff_t row0,
                               ptrdiff_t count, ptrdiff_t ld, ptrdiff_t start, ptrdiff_t end, const double *factor,
                               double *work, const float *u, const int32_t *nearest, int32_t *index,
                               double *errors) {
    const int32_t n = rule->size, last = n - 1;
    double table[256];
    for (int32_t i = 0; i < n; ++i) table[i] = (double)rule->table[i];
    for (ptrdiff_t t0 = 0; t0 < count; t0 += ROW_TILE) {
        const ptrdiff_t t1 = t0 + ROW_TILE < count ? t0 + ROW_TILE : count;
        for (ptrdiff_t j = start; j < end; ++j) {
            double *target = work + j * ld, *error = errors + (j - start) * ld;
            const double pivot = factor[j * cols + j];
            for (ptrdiff_t r = t0; r < t1; ++r) {
                const ptrdiff_t flat = (row0 + r) * cols + order[j], group = flat / rule->group;
                double multiplier = (double)rule->scale[group];
                if (rule->negative && rule->negative[flat]) multiplier = -multiplier;
                const double shift = rule->shift ? (double)rule->shift[group] : 0.0;
                if (!(multiplier != 0.0 && isfinite(multiplier) && isfinite(shift))) {
                    index[j * ld + r] = nearest[j * ld + r];
                    error[r] = 0.0 / pivot;
                    continue;
                }
                const double z = (target[r] - shift) * (1.0 / multiplier);
                const int32_t lower = lower_entry(table, n, z), upper = lower < last ? lower + 1 : last;
                const double base = table[lower], span = table[upper] - base;
                double position = (z - base) / (span > 0.0 ? span : 1.0);
                position = position < 0.0 ? 0.0 : (position > 1.0 ? 1.0 : position); /* NaN stays NaN */
                const int32_t drawn = (double)u[j * ld + r] < position ? upper : lower;
                index[j * ld + r] = drawn;
                error[r] = (target[r] - (table[drawn] * multiplier + shift)) / pivot;
            }
            for (ptrdiff_t c = j + 1; c < end; ++c) {
                const double f = factor[j * cols + c];
                double *later = work + c * ld;
                for (ptrdiff_t r = t0; r < t1; ++r) later[r] -= f * error[r];
            }
        }
    }
}
