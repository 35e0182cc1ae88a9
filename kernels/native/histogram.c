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
#include <stdlib.h>
#include <string.h>

static inline int32_t bin_of(float p, int cdf_points) {
    float b = ceilf(fabsf(p - 0.5f) * (float)(2 * cdf_points));
    int32_t k = (int32_t)((b == b) & (b < 2147483648.0f) ? b : 0.0f); /* NaN and overflow: as x86, then 0 */
    return k < 0 ? 0 : (k > cdf_points ? cdf_points : k);
}

static inline float from_bits(int32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float storage_ulp(float v, const struct tally_params *tp) {
    float mag = fabsf(v) < tp->tiny ? tp->tiny : fabsf(v); /* a normal float32: tiny >= 2**-126 */
    int32_t bits;
    memcpy(&bits, &mag, sizeof bits);
    int32_t biased = (bits >> 23) - tp->mantissa_bits; /* 2**(e - 1 - mantissa_bits)'s exponent field */
    /* below 1: a float32 subnormal, 2**-149 * 2**(biased + 22) (float32 checkpoints only; biased >= -22) */
    int32_t shift = biased + 22 < 0 ? 0 : (biased + 22 > 30 ? 30 : biased + 22);
    return biased >= 1 ? from_bits(biased << 23) : from_bits(1 << shift);
}

#define BLOCK 256 /* weights per round of the two-phase loop below */

/* How a rule's table is read: gathered, or, where the table is one the code can compute, computed (which
 * vectorizes): an integer ramp table[i] = table[0] + i (the GGUF legacy types' code - offset; (float)i + table[0] is
 * exact for small integers), or e4m3's magnitudes from code 0 (vLLM's fp8, e4m3_magnitude). */
enum { TABLE_GATHER, TABLE_RAMP, TABLE_E4M3 };

static int table_kind(const struct value_rule *r) {
    int ramp = fabsf(r->table[0]) + (float)r->size < 16777216.0f && r->table[0] == truncf(r->table[0]);
    int e4m3 = r->first_code == 0 && r->size == 127;
    for (int32_t i = 0; i < r->size; ++i) {
        ramp &= r->table[i] == r->table[0] + (float)i;
        e4m3 &= r->table[i] == e4m3_magnitude(i);
    }
    return ramp ? TABLE_RAMP : (e4m3 ? TABLE_E4M3 : TABLE_GATHER);
}

/* table[i] as `kind` reads it */
static inline float table_entry(const float *table, int32_t i, const int kind) {
    return kind == TABLE_RAMP ? (float)i + table[0] : (kind == TABLE_E4M3 ? e4m3_magnitude(i) : table[i]);
}

/* One run of rule_values within a scale group (scale s, shift m), elements [i, i + run) of the block; `kind` is a
 * constant at each call site, so each gets its own loop without a branch (a gather kept conditional does not
 * vectorize). */
static inline __attribute__((always_inline)) void rule_run(const float *table, int32_t first_code,
                                                           int32_t last, int32_t top, const int32_t *lower,
                                                           const int32_t *upper, const int32_t *nearest,
                                                           const float *sign, float s, float m, ptrdiff_t start,
                                                           int i, int run, float *restrict lo, float *restrict hi,
                                                           float *restrict near, float *restrict above,
                                                           const int kind) {
    for (int k = i; k < i + run; ++k) {
        const ptrdiff_t at = start + k;
        const int32_t c = nearest[at], next = c < top ? c + 1 : c - 1;
        int32_t il = lower[at] - first_code, ih = upper[at] - first_code, ia = next - first_code;
        il = il < 0 ? 0 : (il > last ? last : il);
        ih = ih < 0 ? 0 : (ih > last ? last : ih);
        ia = ia < 0 ? 0 : (ia > last ? last : ia);
        const float tl = table_entry(table, il, kind), th = table_entry(table, ih, kind);
        const float ta = table_entry(table, ia, kind);
        const float l = tl * sign[k] * s + m, h = th * sign[k] * s + m;
        lo[k] = l;
        hi[k] = h;
        near[k] = c == lower[at] ? l : h;
        above[k] = ta * sign[k] * s + m;
    }
}

/* The code values of one block of weights [start, start + n) from the rule (struct value_rule): lo, hi, near and
 * above of codes lower, upper, nearest and nearest's next interior code, run by run of one scale group; each is
 * (table[c - first_code] * sign) * s + m, one rounding per operation, as code_values. Written for the vectorizer:
 * the sign is a per-block array of +-1 (1 - 2 * negative), a missing shift is m = -0.0 (x + -0.0 is x for every x,
 * -0.0 included, where + 0.0 would turn -0.0 into +0.0), near is lo's or hi's value (a cell's nearest code is one
 * of its ends, RoundingCells; the same code gives the same value) and a table the code can compute is computed.
 * Codes outside the table (only a neighbour of an end code) are clamped to it. */
static void rule_values(const struct value_rule *r, int kind, const int32_t *lower, const int32_t *upper,
                        const int32_t *nearest, const struct tally_params *tp, ptrdiff_t start, int n,
                        float *restrict lo, float *restrict hi, float *restrict near, float *restrict above) {
    const int32_t first_code = r->first_code, last = r->size - 1, top = tp->top;
    const ptrdiff_t group = r->group, first = r->first;
    float sign[BLOCK];
    if (r->negative)
        for (int k = 0; k < n; ++k) sign[k] = 1.0f - 2.0f * (float)r->negative[start + k];
    else
        for (int k = 0; k < n; ++k) sign[k] = 1.0f;
    for (int i = 0; i < n;) {
        ptrdiff_t e = first + start + i, g = e / group;
        int run = (int)((g + 1) * group - e < n - i ? (g + 1) * group - e : n - i);
        const float s = r->scale[g], m = r->shift ? r->shift[g] : -0.0f;
#define RUN(k)                                                                                                        \
    rule_run(r->table, first_code, last, top, lower, upper, nearest, sign, s, m, start, i, run, lo, hi, near, above, k)
        if (kind == TABLE_RAMP)
            RUN(TABLE_RAMP);
        else if (kind == TABLE_E4M3)
            RUN(TABLE_E4M3);
        else
            RUN(TABLE_GATHER);
#undef RUN
        i += run;
    }
}

/* Two phases per block of weights: every per-weight quantity and every bin index in loops without branches (gcc
 * vectorizes them), then the histogram increments, which are scattered stores and stay scalar. Bins beyond
 * cdf_points: ON_CODE (a decoy on a code) and SPILL (not counted). */
VECTORIZED int cell_tally(const float *values, const float *position, const int32_t *lower, const int32_t *upper,
                          const int32_t *nearest, const float *lo, const float *hi, const float *near,
                          const float *above, const struct value_rule *rule, ptrdiff_t count,
                          const struct tally_params *tp, int64_t *live_counts, int64_t *decoy_counts,
                          int64_t *tally) {
    const int points = tp->cdf_points, on_code_bin = points + 1, spill = points + 2;
    const float resolution = 64.0f; /* DECOY_RESOLUTION */
    /* with a rule, the code values of each block come from it (in_cell: with above); without, from the arrays */
    const int in_cell = rule ? rule->above : above != NULL;
    const int kind = rule ? table_kind(rule) : TABLE_GATHER;
    int64_t t[TALLY_FIELDS] = {0};
    int64_t *live_hist = calloc((size_t)(2 * (points + 3)), sizeof(int64_t)), *decoy_hist = live_hist + points + 3;
    if (!live_hist) return -1;
    int32_t live_bin[BLOCK], is_source[BLOCK], decoy_bin[BLOCK];
    float source_p[BLOCK], source_shift[BLOCK], rule_lo[BLOCK], rule_hi[BLOCK], rule_near[BLOCK], rule_above[BLOCK];
    for (ptrdiff_t start = 0; start < count; start += BLOCK) {
        int n = count - start < BLOCK ? (int)(count - start) : BLOCK;
        const float *lo_b = rule_lo, *hi_b = rule_hi, *near_b = rule_near, *above_b = rule_above;
        if (rule) {
            rule_values(rule, kind, lower, upper, nearest, tp, start, n, rule_lo, rule_hi, rule_near, rule_above);
        } else {
            /* no near: lo stands in (v == lo is tested already, and the near-code count is not read); no above: no
             * pinned decoy sources (the live ones are computed and not counted) */
            lo_b = lo + start;
            hi_b = hi + start;
            near_b = (near ? near : lo) + start;
            above_b = above ? above + start : near_b;
        }
        int32_t on_grid_n = 0, interior_n = 0, near_n = 0, steerable_n = 0, live_n = 0, source_n = 0, zeros_n = 0;
        for (int i = 0; i < n; ++i) {
            ptrdiff_t e = start + i;
            float v = values[e], p = position[e], l = lo_b[i], h = hi_b[i], nv = near_b[i];
            int32_t steerable = lower[e] != upper[e];
            int32_t on_grid = (v == nv) | (v == l) | (v == h) | (p < tp->on_low) | (p > tp->on_high);
            int32_t live = steerable & !on_grid & (fabsf(h - l) > 0.0f);
            int32_t zero = on_grid & (v == 0.0f); /* a zero on a code: left out of every count but TALLY_ZEROS */
            on_grid &= !zero;
            int32_t interior = on_grid & (nearest[e] != tp->bottom) & (nearest[e] != tp->top);
            float ulp = storage_ulp(v, tp);
            /* in-cell decoys: from every live weight, and from every weight on an interior code (position 0 in
             * the cell toward `above`, the code next to it) */
            float pinned_step = above_b[i] - nv;
            int32_t source = live | (interior & (pinned_step != 0.0f));
            float step = live ? h - l : (source ? pinned_step : 1.0f);
            float spread = fabsf(step) / resolution;
            float spacing = spread > ulp ? spread : ulp; /* fmaxf (torch.maximum) without NaNs; fmaxf stays scalar */
            on_grid_n += on_grid;
            interior_n += interior;
            near_n += !zero & (on_grid | !steerable | (fabsf(v - nv) <= 0.5f * ulp));
            zeros_n += zero;
            steerable_n += steerable;
            live_n += live;
            source_n += source;
            live_bin[i] = live ? bin_of(p, points) : spill;
            is_source[i] = source;
            source_p[i] = live ? p : 0.0f;
            source_shift[i] = spacing / step;
        }
        t[TALLY_ON_GRID] += on_grid_n;
        t[TALLY_INTERIOR_ON_GRID] += interior_n;
        t[TALLY_NEAR_CODE] += near_n;
        t[TALLY_STEERABLE] += steerable_n;
        t[TALLY_LIVE] += live_n;
        t[TALLY_ZEROS] += zeros_n;
        for (int i = 0; i < n; ++i) live_hist[live_bin[i]] += 1;
        if (!in_cell) continue;
        t[TALLY_SOURCE] += source_n;
        for (int j = 0; j < tp->nshifts; ++j) {
            float k = (float)tp->shifts[j];
            for (int i = 0; i < n; ++i) {
                float a = source_p[i] + k * source_shift[i];
                float d = a - truncf(a); /* fmodf(a, 1.0f), exactly (a float's fractional part is a float) */
                d = d < 0.0f ? d + 1.0f : d;
                int32_t on = (d < tp->on_low) | (d > tp->on_high); /* within float32 noise of a code: on it */
                decoy_bin[i] = is_source[i] ? (on ? on_code_bin : bin_of(d, points)) : spill;
            }
            for (int i = 0; i < n; ++i) decoy_hist[decoy_bin[i]] += 1;
        }
    }
    for (int b = 0; b <= points; ++b) {
        live_counts[b] += live_hist[b];
        decoy_counts[b] += decoy_hist[b];
    }
    t[TALLY_DECOY_ON_CODE] += decoy_hist[on_code_bin];
    for (int k = 0; k < TALLY_FIELDS; ++k) tally[k] += t[k];
    free(live_hist);
    return 0;
}
