/* Philox-4x32-10 uniforms on the global (row, col) grid: the native twin of hardening.rng.uniform_grid.
 *
 * Element (row, col) takes word col % 4 of Philox(key, (col / 4, row, stream, 0)), its top 24 bits times 2^-24 (exact
 * in float32); stochastic_codes draws with it, window by window, and picks each element's code. The rounds are
 * Philox-4x32's as Triton's tl.philox runs them (Salmon et al. 2011, 10 rounds, 64-bit key bumped by the Weyl
 * constants each round); the tests hold this file equal to the torch reference (every batch implementation), and the
 * torch reference equal to tl.philox. A batch of 32 adjacent counters (128 columns) runs in two AVX-512 or four AVX2
 * registers per word where the CPU has them: independent chains that hide the multiplies' latency, each product's
 * high and low words taken from the same two 32 x 32 -> 64-bit multiplies, and the words turned into uniforms and
 * transposed into column order in registers.
 */
#include "native.h"

#include <string.h>

#define ROUND_A 0xD2511F53u
#define ROUND_B 0xCD9E8D57u
#define KEY_A 0x9E3779B9u
#define KEY_B 0xBB67AE85u
#define ROUNDS 10
#define BATCH 32 /* counters per batch: groups g0 .. g0 + 31 of one row, columns 4 g0 .. 4 g0 + 127 */
#define UNIFORM 0x1p-24f /* a word's top 24 bits times this: exact in float32 */

/* out[4 b + lane] = the uniform of word `lane` of counter (g0 + b, row, stream, 0): columns 4 g0 .. 4 g0 + 127 */
typedef void (*philox_batch_fn)(uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, float *);

static void philox_batch_c(uint32_t k0, uint32_t k1, uint32_t g0, uint32_t row, uint32_t stream, float *out) {
    for (int b = 0; b < BATCH; ++b) {
        uint32_t c0 = g0 + (uint32_t)b, c1 = row, c2 = stream, c3 = 0, ka = k0, kb = k1;
        for (int r = 0; r < ROUNDS; ++r) {
            uint64_t pb = (uint64_t)ROUND_B * c2, pa = (uint64_t)ROUND_A * c0;
            uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ ka, n2 = (uint32_t)(pa >> 32) ^ c3 ^ kb;
            c1 = (uint32_t)pb;
            c3 = (uint32_t)pa;
            c0 = n0;
            c2 = n2;
            ka += KEY_A;
            kb += KEY_B;
        }
        const uint32_t words[4] = {c0, c1, c2, c3};
        for (int lane = 0; lane < 4; ++lane) out[4 * b + lane] = (float)(words[lane] >> 8) * UNIFORM;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* The eight 32 x 32 -> 64-bit products a * m: vpmuludq multiplies the even lanes, a 64-bit shift brings the odd ones
 * there; blends put each product's high and low words back in its own lane. (vpmulld for the low words costs two
 * micro-ops and ten cycles' latency; compilers do not vectorize this themselves.) */
__attribute__((target("avx2"))) static inline void mulhilo_avx2(__m256i a, __m256i m, __m256i *hi, __m256i *lo) {
    __m256i even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2"))) static inline __m256 uniforms_avx2(__m256i words) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(words, 8)), _mm256_set1_ps(UNIFORM));
}

/* philox_batch_c, eight counters per AVX2 register and four registers per word. */
__attribute__((target("avx2"))) static void philox_batch_avx2(uint32_t k0, uint32_t k1, uint32_t g0, uint32_t row,
                                                              uint32_t stream, float *out) {
    enum { SETS = BATCH / 8 };
    const __m256i ma = _mm256_set1_epi32((int)ROUND_A), mb = _mm256_set1_epi32((int)ROUND_B);
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i c0[SETS], c1[SETS], c2[SETS], c3[SETS];
    for (int s = 0; s < SETS; ++s) {
        c0[s] = _mm256_add_epi32(_mm256_set1_epi32((int)(g0 + 8u * (uint32_t)s)), lanes);
        c1[s] = _mm256_set1_epi32((int)row);
        c2[s] = _mm256_set1_epi32((int)stream);
        c3[s] = _mm256_setzero_si256();
    }
    for (int r = 0; r < ROUNDS; ++r) {
        const __m256i ka = _mm256_set1_epi32((int)k0), kb = _mm256_set1_epi32((int)k1);
        for (int s = 0; s < SETS; ++s) {
            __m256i hi_b, lo_b, hi_a, lo_a;
            mulhilo_avx2(c2[s], mb, &hi_b, &lo_b);
            mulhilo_avx2(c0[s], ma, &hi_a, &lo_a);
            c0[s] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[s]), ka);
            c2[s] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[s]), kb);
            c1[s] = lo_b;
            c3[s] = lo_a;
        }
        k0 += KEY_A;
        k1 += KEY_B;
    }
    for (int s = 0; s < SETS; ++s) {
        /* words (w0 .. w3) of counters 0 .. 7 -> columns: a 4 x 4 transpose in each 128-bit half, then the halves */
        __m256 w0 = uniforms_avx2(c0[s]), w1 = uniforms_avx2(c1[s]);
        __m256 w2 = uniforms_avx2(c2[s]), w3 = uniforms_avx2(c3[s]);
        __m256 t0 = _mm256_unpacklo_ps(w0, w1), t1 = _mm256_unpackhi_ps(w0, w1);
        __m256 t2 = _mm256_unpacklo_ps(w2, w3), t3 = _mm256_unpackhi_ps(w2, w3);
        __m256 n0 = _mm256_shuffle_ps(t0, t2, 0x44), n1 = _mm256_shuffle_ps(t0, t2, 0xEE); /* counters 0|4, 1|5 */
        __m256 n2 = _mm256_shuffle_ps(t1, t3, 0x44), n3 = _mm256_shuffle_ps(t1, t3, 0xEE); /* counters 2|6, 3|7 */
        float *o = out + 32 * s;
        _mm256_storeu_ps(o, _mm256_permute2f128_ps(n0, n1, 0x20));
        _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(n2, n3, 0x20));
        _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(n0, n1, 0x31));
        _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(n2, n3, 0x31));
    }
}

/* mulhilo_avx2 on sixteen lanes. */
__attribute__((target("avx512f"))) static inline void mulhilo_avx512(__m512i a, __m512i m, __m512i *hi, __m512i *lo) {
    __m512i even = _mm512_mul_epu32(a, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

__attribute__((target("avx512f"))) static inline __m512 uniforms_avx512(__m512i words) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(words, 8)), _mm512_set1_ps(UNIFORM));
}

/* philox_batch_c, sixteen counters per AVX-512 register and two registers per word. */
__attribute__((target("avx512f"))) static void philox_batch_avx512(uint32_t k0, uint32_t k1, uint32_t g0,
                                                                   uint32_t row, uint32_t stream, float *out) {
    enum { SETS = BATCH / 16 };
    const __m512i ma = _mm512_set1_epi32((int)ROUND_A), mb = _mm512_set1_epi32((int)ROUND_B);
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i c0[SETS], c1[SETS], c2[SETS], c3[SETS];
    for (int s = 0; s < SETS; ++s) {
        c0[s] = _mm512_add_epi32(_mm512_set1_epi32((int)(g0 + 16u * (uint32_t)s)), lanes);
        c1[s] = _mm512_set1_epi32((int)row);
        c2[s] = _mm512_set1_epi32((int)stream);
        c3[s] = _mm512_setzero_si512();
    }
    for (int r = 0; r < ROUNDS; ++r) {
        const __m512i ka = _mm512_set1_epi32((int)k0), kb = _mm512_set1_epi32((int)k1);
        for (int s = 0; s < SETS; ++s) {
            __m512i hi_b, lo_b, hi_a, lo_a;
            mulhilo_avx512(c2[s], mb, &hi_b, &lo_b);
            mulhilo_avx512(c0[s], ma, &hi_a, &lo_a);
            c0[s] = _mm512_xor_si512(_mm512_xor_si512(hi_b, c1[s]), ka);
            c2[s] = _mm512_xor_si512(_mm512_xor_si512(hi_a, c3[s]), kb);
            c1[s] = lo_b;
            c3[s] = lo_a;
        }
        k0 += KEY_A;
        k1 += KEY_B;
    }
    for (int s = 0; s < SETS; ++s) {
        /* words of counters 0 .. 15 -> columns: a 4 x 4 transpose in each 128-bit lane (counter 4k + j in lane k),
         * then a 4 x 4 transpose of the lanes */
        __m512 w0 = uniforms_avx512(c0[s]), w1 = uniforms_avx512(c1[s]);
        __m512 w2 = uniforms_avx512(c2[s]), w3 = uniforms_avx512(c3[s]);
        __m512 t0 = _mm512_unpacklo_ps(w0, w1), t1 = _mm512_unpackhi_ps(w0, w1);
        __m512 t2 = _mm512_unpacklo_ps(w2, w3), t3 = _mm512_unpackhi_ps(w2, w3);
        __m512 n0 = _mm512_shuffle_ps(t0, t2, 0x44), n1 = _mm512_shuffle_ps(t0, t2, 0xEE);
        __m512 n2 = _mm512_shuffle_ps(t1, t3, 0x44), n3 = _mm512_shuffle_ps(t1, t3, 0xEE);
        __m512 v0 = _mm512_shuffle_f32x4(n0, n1, 0x44), v1 = _mm512_shuffle_f32x4(n2, n3, 0x44); /* lanes 0, 1 */
        __m512 v2 = _mm512_shuffle_f32x4(n0, n1, 0xEE), v3 = _mm512_shuffle_f32x4(n2, n3, 0xEE); /* lanes 2, 3 */
        float *o = out + 64 * s;
        _mm512_storeu_ps(o, _mm512_shuffle_f32x4(v0, v1, 0x88));
        _mm512_storeu_ps(o + 16, _mm512_shuffle_f32x4(v0, v1, 0xDD));
        _mm512_storeu_ps(o + 32, _mm512_shuffle_f32x4(v2, v3, 0x88));
        _mm512_storeu_ps(o + 48, _mm512_shuffle_f32x4(v2, v3, 0xDD));
    }
}
#endif

static philox_batch_fn philox_batch = philox_batch_c;

int philox_init(int widest) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (widest >= PHILOX_AVX512 && __builtin_cpu_supports("avx512f")) {
        philox_batch = philox_batch_avx512;
        return PHILOX_AVX512;
    }
    if (widest >= PHILOX_AVX2 && __builtin_cpu_supports("avx2")) {
        philox_batch = philox_batch_avx2;
        return PHILOX_AVX2;
    }
#endif
    (void)widest;
    philox_batch = philox_batch_c;
    return PHILOX_PORTABLE;
}

void philox_uniform_grid(uint64_t key, uint32_t row_start, ptrdiff_t rows, uint64_t col_start, ptrdiff_t cols,
                         uint32_t stream, float *out) {
    const uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    const uint64_t first = col_start / 4, end = (col_start + (uint64_t)cols + 3) / 4;
    float edge[4 * BATCH];
    for (ptrdiff_t r = 0; r < rows; ++r) {
        float *row_out = out + r * cols;
        for (uint64_t g0 = first; g0 < end; g0 += BATCH) {
            const int64_t c0 = (int64_t)(4 * g0) - (int64_t)col_start; /* the batch's first column in the output */
            if (c0 >= 0 && c0 + 4 * BATCH <= cols) { /* the whole batch lies inside the row */
                philox_batch(k0, k1, (uint32_t)g0, row_start + (uint32_t)r, stream, row_out + c0);
                continue;
            }
            philox_batch(k0, k1, (uint32_t)g0, row_start + (uint32_t)r, stream, edge);
            const int64_t lo = c0 < 0 ? -c0 : 0, hi = cols - c0 < 4 * BATCH ? cols - c0 : 4 * BATCH;
            memcpy(row_out + c0 + lo, edge + lo, (size_t)(hi - lo) * sizeof(float));
        }
    }
}

/* harden.stochastic_codes: codes = upper where u < position, else lower, u the element's uniform above; a window of
 * WINDOW columns at a time keeps the uniforms in L1. */
#define WINDOW 1024

VECTORIZED void stochastic_codes(uint64_t key, uint32_t row_start, ptrdiff_t rows, uint64_t col_start, ptrdiff_t cols,
                      const float *position, const int32_t *lower, const int32_t *upper, int32_t *codes) {
    float u[WINDOW];
    for (ptrdiff_t r = 0; r < rows; ++r)
        for (ptrdiff_t c0 = 0; c0 < cols; c0 += WINDOW) {
            ptrdiff_t width = cols - c0 < WINDOW ? cols - c0 : WINDOW;
            philox_uniform_grid(key, row_start + (uint32_t)r, 1, col_start + (uint64_t)c0, width, 0, u);
            ptrdiff_t base = r * cols + c0;
            for (ptrdiff_t c = 0; c < width; ++c) {
                int32_t lo = lower[base + c], up = upper[base + c]; /* both loaded: a select, not a branch */
                codes[base + c] = u[c] < position[base + c] ? up : lo;
            }
        }
}
