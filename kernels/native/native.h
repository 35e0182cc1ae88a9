/* The native twins of qcbguard's plain-torch references (see __init__.py): plain C on raw float32/int32 buffers. */
#ifndef QCBGUARD_NATIVE_H
#define QCBGUARD_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#define MAX_SUB_BLOCK 32 /* the longest k-quant sub-block (Q4_K, Q5_K) */
#define GROUP_MAX_EPS 1e-15f /* ggml's: a (sub-)block whose largest |x| is below this is all zero */

/* e4m3fn's non-negative magnitude of code c in [0, 126] from its bits (a gather would keep loops scalar):
 * (1 + m/8) * 2**(e - 7) for e = c >> 3 >= 1, an exponent field of e + 120; m * 2**-9 for e = 0. Exact, equal to
 * formats.fp8.e4m3_magnitudes(). */
static inline float e4m3_magnitude(int32_t c) {
    int32_t e = c >> 3, m = c & 7, bits = ((e + 120) << 23) | (m << 20);
    float normal;
    __builtin_memcpy(&normal, &bits, sizeof normal);
    return e == 0 ? (float)m * 0x1p-9f : normal;
}

/* ggml's nearest_int: 1.5 * 2^23 added, the low mantissa bits then hold round-half-even(fval); reproduced as is for
 * huge and non-finite arguments */
static inline int nearest_int(float fval) {
    float val = fval + 12582912.f;
    int32_t i;
    __builtin_memcpy(&i, &val, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

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
void legacy_encode(const float *restrict x, ptrdiff_t nblocks, int bits, int affine, float *restrict d,
                   float *restrict m, float *restrict u, int32_t *restrict nearest);
/* legacy.c: bytes per block of that type (fp16 d and m, qh, codes) */
int legacy_block_bytes(int bits, int affine);
/* legacy.c: the packed blocks of rows x cols weights (cols a multiple of 32), round-to-nearest and (harden)
 * stochastic at global (row_start, col_start), in one pass that keeps no cells; 0, or -1 when out of memory */
int legacy_quantize(const void *x, int dtype, ptrdiff_t rows, ptrdiff_t cols, int bits, int affine, int harden,
                    uint64_t key, uint32_t row_start, uint64_t col_start, uint8_t *nearest_bytes,
                    uint8_t *hardened_bytes, int64_t *changed);

/* widen.c: the fused passes' weight rows: float32, bfloat16 or float16, read as they are; float_row returns row
 * `row` of x (rows of `cols`) as float32: x's own row, or (16-bit dtypes) `scratch` holding it widened, exactly */
enum { WEIGHTS_F32, WEIGHTS_BF16, WEIGHTS_F16 };
const float *float_row(const void *x, int dtype, ptrdiff_t row, ptrdiff_t cols, float *restrict scratch);
/* widen.c: widen_init picks float16 rows' widening up to `widest` (F16C where the CPU has it, at import; tests pick
 * each); returns the one picked */
enum { WIDEN_PORTABLE, WIDEN_F16C };
int widen_init(int widest);
/* widen.c: IEEE half bits of f rounded to nearest even (torch's and ggml's float -> half), and a half widened */
uint16_t half_bits(float f);
float half_to_float(uint16_t h);

/* kquant_fused.c: GgufKQuantSymmetric's packed super-blocks (Q3_K: bits 3, Q6_K: bits 6) of rows x cols weights
 * (float32, bfloat16 or float16; cols a multiple of 256), round-to-nearest and (harden) stochastic at global
 * (row_start, col_start), in one pass per row that keeps no cells; 0, or -1 when out of memory */
int kquant_sym_quantize(const void *x, int dtype, ptrdiff_t rows, ptrdiff_t cols, int bits, int harden, uint64_t key,
                        uint32_t row_start, uint64_t col_start, uint8_t *nearest_bytes, uint8_t *hardened_bytes,
                        int64_t *changed);
int kquant_sym_block_bytes(int bits);

/* grid_cells.c: formats.cells.integer_grid_cells for `count` elements (codes stored as grid index + offset) */
void grid_cells(const float *u, const int32_t *nearest, ptrdiff_t count, int qmin, int qmax, int offset,
                int32_t *lower, int32_t *upper, float *position);
/* grid_cells.c: the hardened codes of those cells placed at (row, col_start) (stochastic_codes' pick, Philox stream
 * 0) without keeping the cells; returns how many differ from nearest */
int64_t grid_draw(uint64_t key, uint32_t row, uint64_t col_start, const float *u, const int32_t *nearest,
                  ptrdiff_t count, int qmin, int qmax, int offset, int32_t *codes);

/* fp8_cells.c: formats.fp8.fp8_cells for rows x cols values r (the buffers must not overlap): r = x (FP8_AS_IS),
 * x / factor[row] (FP8_DIVIDE_ROW) or x * factor[0] (FP8_MULTIPLY), never NaN; clamped to +-448 or not, the same */
enum { FP8_AS_IS, FP8_DIVIDE_ROW, FP8_MULTIPLY, FP8_ROW_SCALE };
void fp8_cells(const float *restrict x, ptrdiff_t rows, ptrdiff_t cols, const float *restrict factor, int rule,
               int32_t *restrict lower, int32_t *restrict upper, float *restrict position, int32_t *restrict nearest,
               uint8_t *restrict negative);
/* fp8_cells.c: the e4m3 bytes of those rows, round-to-nearest and (harden) stochastic at global (row_start,
 * col_start), in one pass without the cells; FP8_ROW_SCALE also computes vLLM's per-channel scale of each row and
 * writes it to factor[row] (then used as FP8_DIVIDE_ROW's); 0, or -1 when out of memory */
int fp8_quantize(const void *x, int dtype, ptrdiff_t rows, ptrdiff_t cols, float *factor, int rule, int harden,
                 uint64_t key, uint32_t row_start, uint64_t col_start, uint8_t *nearest_bytes, uint8_t *hardened_bytes,
                 int64_t *changed);

/* histogram.c: the detector's counting pass over `count` weights (detection.cell_statistic._tally_reference): live
 * weights' boundary histogram, in-cell decoys' histogram when `above` is given (both cdf_points + 1 bins) and the
 * TALLY_FIELDS counts; every output accumulates. `near` may be NULL (then lo stands in for it). Returns 0, or -1
 * when its scratch memory could not be allocated (nothing counted). */
struct tally_params {
    int32_t bottom, top;    /* the tensor's lowest and highest nearest codes (its grid's end codes) */
    int mantissa_bits;      /* of the checkpoint's dtype, and its smallest normal: the storage lattice */
    float tiny;
    const int32_t *shifts;  /* decoy shifts, in lattice steps */
    int nshifts;
    float on_low, on_high;  /* positions outside (on_low, on_high) sit on a code */
    int cdf_points;
};
enum { TALLY_ON_GRID, TALLY_INTERIOR_ON_GRID, TALLY_NEAR_CODE, TALLY_STEERABLE, TALLY_LIVE, TALLY_SOURCE,
       TALLY_DECOY_ON_CODE, TALLY_ZEROS, TALLY_FIELDS };
/* formats.base.CodeValueRule: code c of element e (flat index, counted from `first`) is worth
 * (table[c - first_code] * (negative[e] ? -1 : 1)) * scale[e / group] (+ shift[e / group]); `above`: the in-cell
 * decoys are asked for (the value of nearest's next interior code is computed) */
struct value_rule {
    const float *table;
    int32_t first_code, size;
    const uint8_t *negative; /* NULL: no sign */
    const float *scale, *shift; /* shift NULL: none */
    ptrdiff_t group, first;
    int above;
};
/* the code values come from the arrays lo, hi, near, above, or (rule not NULL, the arrays NULL) from the rule */
int cell_tally(const float *values, const float *position, const int32_t *lower, const int32_t *upper,
               const int32_t *nearest, const float *lo, const float *hi, const float *near, const float *above,
               const struct value_rule *rule, ptrdiff_t count, const struct tally_params *tp, int64_t *live_counts,
               int64_t *decoy_counts, int64_t *tally);

/* feedback.c: calibrated hardening's draws and in-block feedback for columns [start, end) of rows [row0, row0 +
 * count), arrays transposed to (cols, ld) in rounding order and starting at row0 (hardening.feedback.feedback_codes) */
void feedback_block(const struct value_rule *rule, const int64_t *order, ptrdiff_t cols, ptrdiff_t row0,
                    ptrdiff_t count, ptrdiff_t ld, ptrdiff_t start, ptrdiff_t end, const double *factor, double *work,
                    const float *u, const int32_t *nearest, int32_t *index, double *errors);

/* philox.c: philox_init picks the widest Philox batch the CPU runs up to `widest` (at import: all of them; tests pick
 * each); returns the one picked */
enum { PHILOX_PORTABLE, PHILOX_AVX2, PHILOX_AVX512 };
int philox_init(int widest);
/* philox.c: out (rows, cols) = rng.uniform_grid(key, row_start, rows, col_start, cols, stream) */
void philox_uniform_grid(uint64_t key, uint32_t row_start, ptrdiff_t rows, uint64_t col_start, ptrdiff_t cols,
                         uint32_t stream, float *out);
/* philox.c: harden.stochastic_codes for (rows, cols) cells placed at (row_start, col_start), stream 0 */
void stochastic_codes(uint64_t key, uint32_t row_start, ptrdiff_t rows, uint64_t col_start, ptrdiff_t cols,
                      const float *position, const int32_t *lower, const int32_t *upper, int32_t *codes);

#endif
