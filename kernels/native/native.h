/* The native twins of qcbguard's plain-torch references (see __init__.py): plain C on raw float32/int32 buffers. */
#ifndef QCBGUARD_NATIVE_H
#define QCBGUARD_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#define MAX_SUB_BLOCK 32 /* the longest k-quant sub-block (Q4_K, Q5_K) */

/* x86-64: an AVX2 clone chosen at load time, SSE2 otherwise (AVX2 alone brings no FMA; -ffp-contract=off anyway). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTORIZED __attribute__((target_clones("avx2", "default")))
#else
#define VECTORIZED
#endif

/* kquant_search.c: stage 1 of the k-quants for `count` sub-blocks of n weights, x (count, n) row-major */
void qkx2_search(const float *x, ptrdiff_t count, int n, int nmax, float rmin, float rdelta, int nstep, int use_mad,
                 int rms_weights, float *scale, float *min, int *L);
void qx_search(const float *x, ptrdiff_t count, int n, int nmax, float *scale, int *L);
void q3_search(const float *x, ptrdiff_t count, int n, int nmax, float *scale, int *L);

/* legacy.c: GgufLegacy's encoding of `nblocks` blocks of 32: d (and m when affine), u and the written codes */
void legacy_encode(const float *x, ptrdiff_t nblocks, int bits, int affine, float *d, float *m, float *u,
                   int32_t *nearest);

/* grid_cells.c: formats.cells.integer_grid_cells for `count` elements (codes stored as grid index + offset) */
void grid_cells(const float *u, const int32_t *nearest, ptrdiff_t count, int qmin, int qmax, int offset,
                int32_t *lower, int32_t *upper, float *position);

/* fp8_cells.c: formats.fp8.fp8_cells for `count` values (fp8_cells_init fills the grid once, at import) */
void fp8_cells_init(void);
void fp8_cells(const float *r, ptrdiff_t count, int32_t *lower, int32_t *upper, float *position, int32_t *nearest,
               uint8_t *negative);

/* histogram.c: the detector's counting passes (counts has cdf_points + 1 bins and accumulates) */
void boundary_histogram(const float *position, const uint8_t *keep, ptrdiff_t count, int cdf_points,
                        int64_t *counts);
void decoy_histogram(const float *position, const float *shift, const uint8_t *source, ptrdiff_t count,
                     const int32_t *shifts, int nshifts, float on_low, float on_high, int cdf_points, int64_t *counts,
                     int64_t *on_code);

/* philox.c: philox_init picks the widest Philox batch the CPU runs (at import), or the portable C one (tests);
 * returns 1 for AVX2 */
int philox_init(int portable);
/* philox.c: out (rows, cols) = rng.uniform_grid(key, row_start, rows, col_start, cols, stream) */
void philox_uniform_grid(uint64_t key, uint32_t row_start, ptrdiff_t rows, uint64_t col_start, ptrdiff_t cols,
                         uint32_t stream, float *out);
/* philox.c: harden.stochastic_codes for (rows, cols) cells placed at (row_start, col_start), stream 0 */
void stochastic_codes(uint64_t key, uint32_t row_start, ptrdiff_t rows, uint64_t col_start, ptrdiff_t cols,
                      const float *position, const int32_t *lower, const int32_t *upper, int32_t *codes);

#endif
