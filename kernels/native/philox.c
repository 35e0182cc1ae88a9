/* Philox-4x32-10 uniforms on the global (row, col) grid: the native twin of qcbguard_kernels.hardening.rng.uniform_grid.
 *
 * Element (row, col) takes word col % 4 of Philox(key, (col / 4, row, stream, 0)), its top 24 bits times 2^-24 (exact
 * in float32). stochastic_codes draws with it, window by window, and picks each element's code. The rounds are Philox-4x32's as Triton's tl.philox runs them (Salmon et al. 2011, 10 rounds, 64-bit
 * key bumped by the Weyl constants each round); the tests hold this file equal to the torch reference, and the torch
 * reference equal to tl.philox. A batch of adjacent counters runs in SIMD lanes.
 */
#include "native.h"

#define ROUND_A 0xD2511F53u
#define ROUND_B 0xCD9E8D57u
#define KEY_A 0x9E3779B9u
#define KEY_B 0xBB67AE85u
#define ROUNDS 10
#define BATCH 16 /* counters per batch: groups g0 .. g0 + 15 of one row */

/* words[lane][b]: the four output words of counters (g0 + b, row, stream, 0) */
VECTORIZED static void philox_batch(uint32_t k0, uint32_t k1, uint32_t g0, uint32_t row, uint32_t stream,
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

void stochastic_codes(uint64_t key, uint32_t row_start, ptrdiff_t rows, uint64_t col_start, ptrdiff_t cols,
                      const float *position, const int32_t *lower, const int32_t *upper, int32_t *codes) {
    float u[WINDOW];
    for (ptrdiff_t r = 0; r < rows; ++r)
        for (ptrdiff_t c0 = 0; c0 < cols; c0 += WINDOW) {
            ptrdiff_t width = cols - c0 < WINDOW ? cols - c0 : WINDOW;
            philox_uniform_grid(key, row_start + (uint32_t)r, 1, col_start + (uint64_t)c0, width, 0, u);
            ptrdiff_t base = r * cols + c0;
            for (ptrdiff_t c = 0; c < width; ++c)
                codes[base + c] = u[c] < position[base + c] ? upper[base + c] : lower[base + c];
        }
}
