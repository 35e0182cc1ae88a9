/* Philox-4x32-10 uniforms on the global (row, col) grid: the native twin of hardening.rng.uniform_grid.
 *
 * Element (row, col) takes word col % 4 of Philox(key, (col / 4, row, stream, 0)), its top 24 bits times 2^-24 (exact
 * in float32); stochastic_codes draws with it, window by window, and picks each element's code. The rounds are
 * Philox-4x32's as Triton's tl.philox runs them (Salmon et al. 2011, 10 rounds, 64-bit key bumped by the Weyl
 * constants each round); the tests hold this file equal to the torch reference (both batch implementations), and the
 * torch reference equal to tl.philox. A batch of 16 adjacent counters runs in one AVX-512 or two AVX2 registers where
 * the CPU has them.
 */
#include "native.h"

#define ROUND_A 0xD2511F53u
#define ROUND_B 0xCD9E8D57u
#define KEY_A 0x9E3779B9u
#define KEY_B 0xBB67AE85u
#define ROUNDS 10
#define BATCH 16 /* counters per batch: groups g0 .. g0 + 15 of one row */

typedef void (*philox_batch_fn)(uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t[4][BATCH]);

/* words[lane][b]: the four output words of counters (g0 + b, row, stream, 0); portable C */
static void philox_batch_c(uint32_t k0, uint32_t k1, uint32_t g0, uint32_t row, uint32_t stream,
                                    uint32_t words[4][BATCH]) {
    uint32_t c0[BATCH], c1[BATCH], c2[BATCH], c3[BATCH];
    for (int b = 0; b < BATCH; ++b) {
        c0[b] = g0 + (uint32_t)b;
        c1[b] = row;
        c2[b] = stream;
        c3[b] = 0;
    }
    for (int r = 0; r < ROUNDS; ++r) {
        for (int b = 0; b < BATCH; ++b) {
            uint64_t pb = (uint64_t)ROUND_B * c2[b];
            uint64_t pa = (uint64_t)ROUND_A * c0[b];
            uint32_t n0 = (uint32_t)(pb >> 32) ^ c1[b] ^ k0;
            uint32_t n2 = (uint32_t)(pa >> 32) ^ c3[b] ^ k1;
            c1[b] = (uint32_t)pb;
            c3[b] = (uint32_t)pa;
            c0[b] = n0;
            c2[b] = n2;
        }
        k0 += KEY_A;
        k1 += KEY_B;
    }
    for (int b = 0; b < BATCH; ++b) {
        words[0][b] = c0[b];
        words[1][b] = c1[b];
        words[2][b] = c2[b];
        words[3][b] = c3[b];
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* The high words of eight 32 x 32 -> 64-bit products: vpmuludq multiplies the even lanes, a 64-bit shift brings the
 * odd ones there; the blend puts each high word back in its own lane. (Compilers do not vectorize this themselves.) */
__attribute__((target("avx2"))) static inline __m256i mulhi_epu32(__m256i a, __m256i m) {
    __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(a, m), 32);
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    return _mm256_blend_epi32(even, odd, 0xAA);
}

/* philox_batch_c, eight counters per AVX2 register: the same rounds, the same words. */
__attribute__((target("avx2"))) static void philox_batch_avx2(uint32_t k0, uint32_t k1, uint32_t g0, uint32_t row,
                                                              uint32_t stream, uint32_t words[4][BATCH]) {
    const __m256i ma = _mm256_set1_epi32((int)ROUND_A), mb = _mm256_set1_epi32((int)ROUND_B);
    for (int h = 0; h < BATCH; h += 8) {
        __m256i c0 = _mm256_set1_epi32((int)(g0 + (uint32_t)h));
        c0 = _mm256_add_epi32(c0, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256i c1 = _mm256_set1_epi32((int)row), c2 = _mm256_set1_epi32((int)stream), c3 = _mm256_setzero_si256();
        uint32_t ka = k0, kb = k1;
        for (int r = 0; r < ROUNDS; ++r) {
            __m256i hi_b = mulhi_epu32(c2, mb), lo_b = _mm256_mullo_epi32(c2, mb);
            __m256i hi_a = mulhi_epu32(c0, ma), lo_a = _mm256_mullo_epi32(c0, ma);
            c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32((int)ka));
            c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32((int)kb));
            c1 = lo_b;
            c3 = lo_a;
            ka += KEY_A;
            kb += KEY_B;
        }
        _mm256_storeu_si256((__m256i *)&words[0][h], c0);
        _mm256_storeu_si256((__m256i *)&words[1][h], c1);
        _mm256_storeu_si256((__m256i *)&words[2][h], c2);
        _mm256_storeu_si256((__m256i *)&words[3][h], c3);
    }
}

/* mulhi_epu32 on sixteen lanes. */
__attribute__((target("avx512f"))) static inline __m512i mulhi_epu32_512(__m512i a, __m512i m) {
    __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(a, m), 32);
    __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    return _mm512_mask_blend_epi32(0xAAAA, even, odd);
}

/* philox_batch_c, the whole batch of sixteen counters in one AVX-512 register per word. */
__attribute__((target("avx512f"))) static void philox_batch_avx512(uint32_t k0, uint32_t k1, uint32_t g0,
                                                                   uint32_t row, uint32_t stream,
                                                                   uint32_t words[4][BATCH]) {
    const __m512i ma = _mm512_set1_epi32((int)ROUND_A), mb = _mm512_set1_epi32((int)ROUND_B);
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32((int)g0),
                                  _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    __m512i c1 = _mm512_set1_epi32((int)row), c2 = _mm512_set1_epi32((int)stream), c3 = _mm512_setzero_si512();
    for (int r = 0; r < ROUNDS; ++r) {
        __m512i hi_b = mulhi_epu32_512(c2, mb), lo_b = _mm512_mullo_epi32(c2, mb);
        __m512i hi_a = mulhi_epu32_512(c0, ma), lo_a = _mm512_mullo_epi32(c0, ma);
        c0 = _mm512_xor_si512(_mm512_xor_si512(hi_b, c1), _mm512_set1_epi32((int)k0));
        c2 = _mm512_xor_si512(_mm512_xor_si512(hi_a, c3), _mm512_set1_epi32((int)k1));
        c1 = lo_b;
        c3 = lo_a;
        k0 += KEY_A;
        k1 += KEY_B;
    }
    _mm512_storeu_si512(words[0], c0);
    _mm512_storeu_si512(words[1], c1);
    _mm512_storeu_si512(words[2], c2);
    _mm512_storeu_si512(words[3], c3);
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
    uint32_t words[4][BATCH];
    for (ptrdiff_t r = 0; r < rows; ++r) {
        float *row_out = out + r * cols;
        for (uint64_t g0 = first; g0 < end; g0 += BATCH) {
            philox_batch(k0, k1, (uint32_t)g0, row_start + (uint32_t)r, stream, words);
            int64_t c0 = (int64_t)(4 * g0) - (int64_t)col_start; /* the batch's first column in the output */
            if (c0 >= 0 && c0 + 4 * BATCH <= cols) { /* the whole batch lies inside the row */
                for (int b = 0; b < BATCH; ++b)
                    for (int lane = 0; lane < 4; ++lane)
                        row_out[c0 + 4 * b + lane] = (float)(words[lane][b] >> 8) * 0x1p-24f;
                continue;
            }
            for (int b = 0; b < BATCH; ++b)
                for (int lane = 0; lane < 4; ++lane) {
                    int64_t c = c0 + 4 * b + lane;
                    if (c >= 0 && c < cols) row_out[c] = (float)(words[lane][b] >> 8) * 0x1p-24f;
                }
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
