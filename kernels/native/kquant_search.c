/* The GGUF k-quant sub-block scale searches, natively: the sequential part of Q2_K..Q6_K encoding.
 *
 * Each function here is the float32 twin of a plain-torch reference in qcbguard_kernels.formats
 * (make_qkx2_quants in gguf_kquant_affine.py, make_qx_quants and make_q3_quants in gguf_kquant_symmetric.py); the
 * references' docstrings state the rules, which follow ggml's quantize_row_q*_K_ref without an importance matrix.
 * The torch versions vectorize across sub-blocks and pay one tensor op per element of a sub-block and per
 * candidate; here Q2_K/Q4_K/Q5_K and Q6_K run 16 sub-blocks at once, one per SIMD lane, in registers (Q3_K's
 * coordinate descent, fast already, one sub-block at a time). The tests hold the two equal bit for bit.
 *
 * Numerics that must not change: every operation is float32 with one rounding (built with -ffp-contract=off and
 * without -ffast-math: no FMA, no reassociation); sums start from +0.0f and run in element order; minima and maxima
 * are strict first hits; nearest_int is ggml's 1.5 * 2^23 bit trick, reproduced as is for huge and non-finite
 * arguments. Layout: x is (S, n) row-major, one sub-block per row; codes are int32 (S, n).
 *
 * Entry points (native.h) take `count` sub-blocks; module.c binds them to Python.
 */
#include "native.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#define Q3_SWEEPS 5

static inline int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* ------------------------------------------------------------------ make_qkx2_quants (Q2_K, Q4_K, Q5_K) */

/* make_qkx2_quants for LANES sub-blocks at once, one per SIMD lane: per lane, the reference's operations in its order
 * (so its bits), with branches turned into selects, which the compiler vectorizes across lanes. Lanes never mix: a
 * lane's sums stay sequential over its own elements. The weights are |x| (Q2_K) or sqrtf(sum x^2 / n) + |x|. */
#define LANES 16 /* 16 independent sum chains per loop: fastest measured (8: latency-bound, 24 no better, 32 slower) */


VECTORIZED static void qkx2_lanes(const float *x, int n, int nmax, float rmin, float rdelta, int nstep, int use_mad,
                       int rms_weights, float *scale_out, float *min_out, int *L_out) {
    float xt[MAX_SUB_BLOCK][LANES], w[MAX_SUB_BLOCK][LANES];
    int L[MAX_SUB_BLOCK][LANES], Laux[MAX_SUB_BLOCK][LANES];
    float min0[LANES], max[LANES], cur_min[LANES], sum_w[LANES], sum_x[LANES], scale[LANES], best_error[LANES];
    float iscale[LANES], sum_l[LANES], sum_l2[LANES], sum_xl[LANES], this_scale[LANES], this_min[LANES];
    float cur_error[LANES], D[LANES];
    int better[LANES];
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < LANES; ++k) xt[i][k] = x[k * n + i];
    if (rms_weights) {
        float sum_x2[LANES] = {0};
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < LANES; ++k) sum_x2[k] += xt[i][k] * xt[i][k];
        for (int k = 0; k < LANES; ++k) sum_x2[k] = sqrtf(sum_x2[k] / (float)n); /* av_x */
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < LANES; ++k) w[i][k] = sum_x2[k] + fabsf(xt[i][k]);
    } else {
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < LANES; ++k) w[i][k] = fabsf(xt[i][k]);
    }
    for (int k = 0; k < LANES; ++k) {
        min0[k] = max[k] = xt[0][k];
        sum_w[k] = w[0][k];
        sum_x[k] = sum_w[k] * xt[0][k];
    }
    for (int i = 1; i < n; ++i)
        for (int k = 0; k < LANES; ++k) {
            min0[k] = xt[i][k] < min0[k] ? xt[i][k] : min0[k];
            max[k] = xt[i][k] > max[k] ? xt[i][k] : max[k];
            sum_w[k] += w[i][k];
            sum_x[k] += w[i][k] * xt[i][k];
        }
    for (int k = 0; k < LANES; ++k) {
        min0[k] = min0[k] > 0 ? 0.0f : min0[k];
        cur_min[k] = min0[k];
        iscale[k] = (float)nmax / (max[k] - min0[k]);
        scale[k] = 1.0f / iscale[k];
        best_error[k] = 0.0f;
    }
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < LANES; ++k) {
            L[i][k] = clamp_int(nearest_int(iscale[k] * (xt[i][k] - min0[k])), 0, nmax);
            float diff = scale[k] * (float)L[i][k] + min0[k] - xt[i][k];
            diff = use_mad ? fabsf(diff) : diff * diff;
            best_error[k] += w[i][k] * diff;
        }
    for (int is = 0; is <= nstep; ++is) {
        float factor = rmin + rdelta * (float)is + (float)nmax;
        for (int k = 0; k < LANES; ++k) {
            iscale[k] = factor / (max[k] - cur_min[k]);
            sum_l[k] = sum_l2[k] = sum_xl[k] = cur_error[k] = 0.0f;
        }
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < LANES; ++k) {
                int l = clamp_int(nearest_int(iscale[k] * (xt[i][k] - cur_min[k])), 0, nmax);
                Laux[i][k] = l;
                float w_l = w[i][k] * (float)l;
                sum_l[k] += w_l;
                sum_l2[k] += w_l * (float)l;
                sum_xl[k] += w_l * xt[i][k];
            }
        for (int k = 0; k < LANES; ++k) {
            D[k] = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k];
            float s = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / D[k];
            float m = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / D[k];
            int clamped = m > 0;
            this_min[k] = clamped ? 0.0f : m;
            this_scale[k] = clamped ? sum_xl[k] / sum_l2[k] : s;
        }
        if (use_mad) {
            for (int i = 0; i < n; ++i)
                for (int k = 0; k < LANES; ++k)
                    cur_error[k] += w[i][k] * fabsf(this_scale[k] * (float)Laux[i][k] + this_min[k] - xt[i][k]);
        } else {
            for (int i = 0; i < n; ++i)
                for (int k = 0; k < LANES; ++k) {
                    float diff = this_scale[k] * (float)Laux[i][k] + this_min[k] - xt[i][k];
                    cur_error[k] += w[i][k] * (diff * diff);
                }
        }
        for (int k = 0; k < LANES; ++k) {
            better[k] = (D[k] > 0) & (cur_error[k] < best_error[k]);
            best_error[k] = better[k] ? cur_error[k] : best_error[k];
            scale[k] = better[k] ? this_scale[k] : scale[k];
            cur_min[k] = better[k] ? this_min[k] : cur_min[k];
        }
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < LANES; ++k) L[i][k] = (Laux[i][k] & -better[k]) | (L[i][k] & (better[k] - 1));
    }
    for (int k = 0; k < LANES; ++k) {
        int flat = max[k] == min0[k]; /* the reference's early exit: scale 0, codes 0 */
        scale_out[k] = flat ? 0.0f : scale[k];
        min_out[k] = flat ? -min0[k] : -cur_min[k];
        for (int i = 0; i < n; ++i) L_out[k * n + i] = flat ? 0 : L[i][k];
    }
}

/* ------------------------------------------------------------------ make_qx_quants / make_q3_quants (Q6_K, Q3_K) */

/* The first element of largest |x| (strict `>` from 0: zeros and NaN never win); returns it, sets *amax. */
static float first_abs_max(const float *x, int n, float *amax) {
    float a = 0.0f, m = 0.0f;
    for (int i = 0; i < n; ++i) {
        float ax = fabsf(x[i]);
        if (ax > a) {
            a = ax;
            m = x[i];
        }
    }
    *amax = a;
    return m;
}

/* make_qx_quants (rmse_type 1, no importance: weights x^2, 18 candidates around iscale = -nmax / max) for LANES
 * sub-blocks at once (see qkx2_lanes). */
VECTORIZED static void qx_lanes(const float *x, int n, int nmax, float *scale_out, int *L_out) {
    float xt[MAX_SUB_BLOCK][LANES], w[MAX_SUB_BLOCK][LANES];
    int L[MAX_SUB_BLOCK][LANES], Laux[MAX_SUB_BLOCK][LANES], better[LANES];
    float amax[LANES], max[LANES], iscale[LANES], sumlx[LANES], suml2[LANES], scale[LANES], best[LANES];
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < LANES; ++k) xt[i][k] = x[k * n + i];
    for (int k = 0; k < LANES; ++k) amax[k] = max[k] = sumlx[k] = suml2[k] = 0.0f;
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < LANES; ++k) {
            float ax = fabsf(xt[i][k]);
            int hit = ax > amax[k];
            amax[k] = hit ? ax : amax[k];
            max[k] = hit ? xt[i][k] : max[k];
            w[i][k] = xt[i][k] * xt[i][k];
        }
    for (int k = 0; k < LANES; ++k) iscale[k] = -(float)nmax / max[k];
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < LANES; ++k) {
            int l = clamp_int(nearest_int(iscale[k] * xt[i][k]), -nmax, nmax - 1);
            L[i][k] = l + nmax;
            sumlx[k] += w[i][k] * xt[i][k] * (float)l;
            suml2[k] += w[i][k] * (float)l * (float)l;
        }
    for (int k = 0; k < LANES; ++k) {
        scale[k] = suml2[k] != 0.0f ? sumlx[k] / suml2[k] : 0.0f;
        best[k] = scale[k] * sumlx[k];
    }
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        float factor = -((float)nmax + 0.1f * (float)is);
        for (int k = 0; k < LANES; ++k) {
            iscale[k] = factor / max[k];
            sumlx[k] = suml2[k] = 0.0f;
        }
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < LANES; ++k) {
                int l = clamp_int(nearest_int(iscale[k] * xt[i][k]), -nmax, nmax - 1);
                Laux[i][k] = l + nmax;
                sumlx[k] += w[i][k] * xt[i][k] * (float)l;
                suml2[k] += w[i][k] * (float)l * (float)l;
            }
        for (int k = 0; k < LANES; ++k) {
            better[k] = (suml2[k] > 0) & (sumlx[k] * sumlx[k] > best[k] * suml2[k]);
            scale[k] = better[k] ? sumlx[k] / suml2[k] : scale[k];
            best[k] = better[k] ? scale[k] * sumlx[k] : best[k];
        }
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < LANES; ++k) L[i][k] = (Laux[i][k] & -better[k]) | (L[i][k] & (better[k] - 1));
    }
    for (int k = 0; k < LANES; ++k) {
        int zero = amax[k] < GROUP_MAX_EPS; /* the reference's early exit: scale 0, codes 0 */
        scale_out[k] = zero ? 0.0f : scale[k];
        for (int i = 0; i < n; ++i) L_out[k * n + i] = zero ? 0 : L[i][k];
    }
}

/* make_q3_quants with do_rmse: iscale = -nmax / max, then coordinate descent, element by element, in 5 sweeps. */
static void q3_one(const float *x, int n, int nmax, float *scale_out, int *L) {
    float amax;
    float max = first_abs_max(x, n, &amax);
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *scale_out = 0.0f;
        return;
    }
    float iscale = -(float)nmax / max;
    int l[MAX_SUB_BLOCK];
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; ++i) {
        l[i] = clamp_int(nearest_int(iscale * x[i]), -nmax, nmax - 1);
        float w = x[i] * x[i];
        sumlx += w * x[i] * (float)l[i];
        suml2 += w * (float)l[i] * (float)l[i];
    }
    for (int sweep = 0; sweep < Q3_SWEEPS; ++sweep) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * (float)l[i];
            if (!(slx > 0)) continue;
            float sl2 = suml2 - w * (float)l[i] * (float)l[i];
            int new_l = clamp_int(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1);
            if (new_l == l[i]) continue;
            slx += w * x[i] * (float)new_l;
            sl2 += w * (float)new_l * (float)new_l;
            if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                l[i] = new_l;
                sumlx = slx;
                suml2 = sl2;
                changed = 1;
            }
        }
        if (!changed) break; /* a sweep that changed nothing leaves the state fixed */
    }
    for (int i = 0; i < n; ++i) L[i] = l[i] + nmax;
    *scale_out = suml2 > 0 ? sumlx / suml2 : 0.0f;
}

/* ------------------------------------------------------------------ entry points */

void qkx2_search(const float *x, ptrdiff_t count, int n, int nmax, float rmin, float rdelta, int nstep, int use_mad,
                 int rms_weights, float *scale, float *min, int *L) {
    ptrdiff_t s = 0;
    for (; s + LANES <= count; s += LANES)
        qkx2_lanes(x + s * n, n, nmax, rmin, rdelta, nstep, use_mad, rms_weights, scale + s, min + s, L + s * n);
    if (s < count) { /* the tail: a zero-padded group (lanes are independent; the padding changes nothing else) */
        float xpad[LANES * MAX_SUB_BLOCK] = {0}, spad[LANES], mpad[LANES];
        int Lpad[LANES * MAX_SUB_BLOCK];
        size_t rest = (size_t)(count - s);
        memcpy(xpad, x + s * n, rest * (size_t)n * sizeof *xpad);
        qkx2_lanes(xpad, n, nmax, rmin, rdelta, nstep, use_mad, rms_weights, spad, mpad, Lpad);
        memcpy(scale + s, spad, rest * sizeof *spad);
        memcpy(min + s, mpad, rest * sizeof *mpad);
        memcpy(L + s * n, Lpad, rest * (size_t)n * sizeof *Lpad);
    }
}

void qx_search(const float *x, ptrdiff_t count, int n, int nmax, float *scale, int *L) {
    ptrdiff_t s = 0;
    for (; s + LANES <= count; s += LANES) qx_lanes(x + s * n, n, nmax, scale + s, L + s * n);
    if (s < count) { /* the tail, as in qkx2_search */
        float xpad[LANES * MAX_SUB_BLOCK] = {0}, spad[LANES];
        int Lpad[LANES * MAX_SUB_BLOCK];
        size_t rest = (size_t)(count - s);
        memcpy(xpad, x + s * n, rest * (size_t)n * sizeof *xpad);
        qx_lanes(xpad, n, nmax, spad, Lpad);
        memcpy(scale + s, spad, rest * sizeof *spad);
        memcpy(L + s * n, Lpad, rest * (size_t)n * sizeof *Lpad);
    }
}

void q3_search(const float *x, ptrdiff_t count, int n, int nmax, float *scale, int *L) {
    for (ptrdiff_t s = 0; s < count; ++s) q3_one(x + s * n, n, nmax, scale + s, L + s * n); /* sweeps stop early */
}
