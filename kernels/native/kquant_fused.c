/* The symmetric k-quants (Q3_K, Q6_K) from weights to packed super-blocks in one pass per row: the native twin of
 * GgufKQuantSymmetric's encode (stages 1-3 in gguf_kquant_symmetric.py, whose docstring states ggml's rules), its
 * cells (formats.cells.integer_grid_cells), harden.stochastic_codes and its _fields packing. The row's scales,
 * codes and cells live in row-sized scratch (in cache) and are never materialised for the tensor.
 *
 * Per super-block of 256: stage 1 is qx_search / q3_search over its 16 sub-blocks of 16 (kquant_search.c); stage 2
 * quantizes the 16 sub-block scales against the first largest |scale| (iscale = -levels / max_scale, sc =
 * nearest_int(iscale * scale) as int8_t, clamped as each type does; d = fp16(1 / iscale)); stage 3 divides each weight
 * by sub_d = fp16(d) * sc and rounds it (nearest_int, clamped to [-h, h - 1], stored + h), except where sub_d is zero
 * (the search's codes stay) or, Q6_K, the whole super-block is below GROUP_MAX_EPS (written as zero bytes). Where C
 * did not round u, or nearest_int's trick does not hold, the cell collapses onto the written code. Every operation is
 * float32 with one rounding, as the reference (built with -ffp-contract=off). */
#include "native.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define QK_K 256
#define SUB 16                        /* weights per sub-block, both types */
#define NSUB (QK_K / SUB)             /* sub-blocks per super-block */
#define NEAREST_INT_LIMIT 4194303.0f /* nearest_int's trick is exact only up to here */

int kquant_sym_block_bytes(int bits) { return bits == 6 ? 128 + 64 + 16 + 2 : 32 + 64 + 12 + 2; }

/* The low `width` bits of (v >> shift) for n values, as formats.gguf_common.pack_bit_fields lays them out: groups
 * of k = 8 / width runs of `run` values; byte j of a group holds value j of run i at bits width * i. */
static uint8_t *pack_bits(const int32_t *v, int n, int width, int run, int shift, uint8_t *out) {
    const int k = 8 / width, mask = (1 << width) - 1;
    for (int g = 0; g < n; g += k * run)
        for (int j = 0; j < run; ++j) {
            unsigned byte = 0;
            for (int i = 0; i < k; ++i) byte |= (unsigned)((v[g + i * run + j] >> shift) & mask) << (width * i);
            *out++ = (uint8_t)byte;
        }
    return out;
}

/* One super-block's scales, as stage 2 writes them: sub_d per sub-block, the scale field's bytes (Q6_K: the 16 int8
 * sc; Q3_K: sc + 32 in 6 bits, packed by pack_bits) and d's half bits. Returns whether the block is written as zero
 * bytes (Q6_K below GROUP_MAX_EPS). */
struct block_scales {
    float sub_d[NSUB];
    int32_t field[NSUB]; /* Q6_K: sc; Q3_K: sc + 32 */
    uint16_t d;
    int zeroed;
};

static void quantize_scales(const float *scale, int bits, struct block_scales *out) {
    float amax = 0.0f, max_scale = 0.0f; /* the first largest |scale|, strict `>` from 0 */
    for (int j = 0; j < NSUB; ++j)
        if (fabsf(scale[j]) > amax) {
            amax = fabsf(scale[j]);
            max_scale = scale[j];
        }
    const float iscale = (bits == 6 ? -128.0f : -32.0f) / max_scale;
    int32_t sc[NSUB];
    if (bits == 6) {
        out->zeroed = amax < GROUP_MAX_EPS;
        for (int j = 0; j < NSUB; ++j) {
            int q = nearest_int(iscale * scale[j]);
            sc[j] = out->zeroed ? 0 : (int8_t)(q < 127 ? q : 127); /* C's int -> int8_t: modulo 256 */
            out->field[j] = sc[j];
        }
        out->d = half_bits(out->zeroed ? 0.0f : 1.0f / iscale);
    } else {
        const int has_scale = max_scale != 0.0f; /* else memset: every stored scale 0, sc = -32, d = +0 */
        out->zeroed = 0;
        for (int j = 0; j < NSUB; ++j) {
            int v = (int8_t)nearest_int(iscale * scale[j]);
            out->field[j] = has_scale ? (v < -32 ? -32 : (v > 31 ? 31 : v)) + 32 : 0;
            sc[j] = out->field[j] - 32;
        }
        out->d = half_bits(has_scale ? 1.0f / iscale : 0.0f);
    }
    const float d = half_to_float(out->d);
    for (int j = 0; j < NSUB; ++j) out->sub_d[j] = d * (float)sc[j];
}

/* Stage 3 for one super-block: written codes and grid coordinates u (collapsed onto the code where C did not round). */
static void round_block(const float *x, const int32_t *search, const struct block_scales *bs, int h, float *u,
                        int32_t *nearest) {
    for (int j = 0; j < NSUB; ++j) {
        const float sub_d = bs->sub_d[j];
        const int kept = bs->zeroed | (sub_d == 0.0f); /* a NaN sub_d is not skipped */
        for (int e = j * SUB; e < (j + 1) * SUB; ++e) {
            const float q = x[e] / sub_d;
            const int rounded = nearest_int(q);
            const int code = kept ? (bs->zeroed ? 0 : search[e])
                                  : (rounded < -h ? -h : (rounded > h - 1 ? h - 1 : rounded)) + h;
            const int degenerate = kept | !(fabsf(q) <= NEAREST_INT_LIMIT);
            nearest[e] = code;
            u[e] = degenerate ? (float)(code - h) : q;
        }
    }
}

/* One super-block in the file's layout (GgufKQuantSymmetric._fields): Q6_K ql, qh, 16 int8 scales, d; Q3_K hmask,
 * qs, the 12-byte scales, d. */
VECTORIZED static void pack_block(const int32_t *codes, const struct block_scales *bs, int bits, uint8_t *out) {
    if (bits == 6) {
        out = pack_bits(codes, QK_K, 4, 64, 0, out);
        out = pack_bits(codes, QK_K, 2, 32, 4, out);
        for (int j = 0; j < NSUB; ++j) *out++ = (uint8_t)bs->field[j];
    } else {
        out = pack_bits(codes, QK_K, 1, 32, 2, out);
        out = pack_bits(codes, QK_K, 2, 32, 0, out);
        out = pack_bits(bs->field, NSUB, 4, 8, 0, out);
        out = pack_bits(bs->field, NSUB, 2, 4, 4, out);
    }
    out[0] = (uint8_t)bs->d;
    out[1] = (uint8_t)(bs->d >> 8);
}

VECTORIZED int kquant_sym_quantize(const void *x, int dtype, ptrdiff_t rows, ptrdiff_t cols, int bits, int harden,
                                   uint64_t key, uint32_t row_start, uint64_t col_start, uint8_t *nearest_bytes,
                                   uint8_t *hardened_bytes, int64_t *changed) {
    const int h = bits == 6 ? 32 : 4;
    const ptrdiff_t nb = cols / QK_K, block_bytes = kquant_sym_block_bytes(bits), row_bytes = nb * block_bytes;
    /* per row: the widened row, u, sub-block scales (float); search codes, nearest, codes (int32); the blocks'
     * scales */
    float *scratch = malloc((size_t)(2 * cols + nb * NSUB) * sizeof(float) + (size_t)(3 * cols) * sizeof(int32_t));
    struct block_scales *scales = malloc((size_t)nb * sizeof *scales);
    if (!scratch || !scales) {
        free(scratch);
        free(scales);
        return -1;
    }
    float *wide = scratch, *u = wide + cols, *sub_scale = u + cols;
    int32_t *search = (int32_t *)(sub_scale + nb * NSUB), *nearest = search + cols, *codes = nearest + cols;
    int64_t differ = 0;
    for (ptrdiff_t row = 0; row < rows; ++row) {
        const float *xr = float_row(x, dtype, row, cols, wide);
        if (bits == 6)
            qx_search(xr, nb * NSUB, SUB, h, sub_scale, search);
        else
            q3_search(xr, nb * NSUB, SUB, h, sub_scale, search);
        uint8_t *near_out = nearest_bytes + row * row_bytes, *hard_out = hardened_bytes + row * row_bytes;
        for (ptrdiff_t b = 0; b < nb; ++b) {
            quantize_scales(sub_scale + b * NSUB, bits, &scales[b]);
            round_block(xr + b * QK_K, search + b * QK_K, &scales[b], h, u + b * QK_K, nearest + b * QK_K);
            pack_block(nearest + b * QK_K, &scales[b], bits, near_out + b * block_bytes);
        }
        if (!harden) continue;
        differ += grid_draw(key, row_start + (uint32_t)row, col_start, u, nearest, cols, -h, h - 1, h, codes);
        for (ptrdiff_t b = 0; b < nb; ++b) pack_block(codes + b * QK_K, &scales[b], bits, hard_out + b * block_bytes);
    }
    *changed += differ;
    free(scratch);
    free(scales);
    return 0;
}
