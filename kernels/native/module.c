/* The CPython module qcbguard_kernels.native._native: thin bindings over native.h.
 *
 * Every function takes raw buffer addresses (the Python wrapper in __init__.py owns, types and sizes the tensors)
 * and releases the GIL while it runs, so the wrapper's threads work on disjoint ranges in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "native.h"

static int check_len(int n) {
    if (n < 1 || n > MAX_SUB_BLOCK) {
        PyErr_Format(PyExc_ValueError, "sub-block length %d outside [1, %d]", n, MAX_SUB_BLOCK);
        return 0;
    }
    return 1;
}

#define ADDR(type, p) ((type *)(uintptr_t)(p))

static int check_rule(int rule) {
    if (rule == FP8_AS_IS || rule == FP8_DIVIDE_ROW || rule == FP8_MULTIPLY) return 1;
    PyErr_Format(PyExc_ValueError, "unknown fp8 scale rule %d", rule);
    return 0;
}

static int check_bits(int bits) {
    if (bits == 4 || bits == 5 || bits == 8) return 1;
    PyErr_Format(PyExc_ValueError, "legacy blocks have 4, 5 or 8 bits, not %d", bits);
    return 0;
}

static PyObject *py_qkx2(PyObject *self, PyObject *args) {
    unsigned long long px, pscale, pmin, pL;
    Py_ssize_t count;
    int n, nmax, nstep, use_mad, rms_weights;
    float rmin, rdelta;
    (void)self;
    if (!PyArg_ParseTuple(args, "KniiffippKKK", &px, &count, &n, &nmax, &rmin, &rdelta, &nstep, &use_mad,
                          &rms_weights, &pscale, &pmin, &pL) ||
        !check_len(n))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    qkx2_search(ADDR(const float, px), count, n, nmax, rmin, rdelta, nstep, use_mad, rms_weights, ADDR(float, pscale),
                ADDR(float, pmin), ADDR(int, pL));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *symmetric(PyObject *args, void (*search)(const float *, ptrdiff_t, int, int, float *, int *)) {
    unsigned long long px, pscale, pL;
    Py_ssize_t count;
    int n, nmax;
    if (!PyArg_ParseTuple(args, "KniiKK", &px, &count, &n, &nmax, &pscale, &pL) || !check_len(n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    search(ADDR(const float, px), count, n, nmax, ADDR(float, pscale), ADDR(int, pL));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_qx(PyObject *self, PyObject *args) {
    (void)self;
    return symmetric(args, qx_search);
}

static PyObject *py_q3(PyObject *self, PyObject *args) {
    (void)self;
    return symmetric(args, q3_search);
}

static PyObject *py_philox(PyObject *self, PyObject *args) {
    unsigned long long key, col_start, pout;
    unsigned int row_start, stream;
    Py_ssize_t rows, cols;
    (void)self;
    if (!PyArg_ParseTuple(args, "KInKnIK", &key, &row_start, &rows, &col_start, &cols, &stream, &pout)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    philox_uniform_grid(key, row_start, rows, col_start, cols, stream, ADDR(float, pout));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_legacy(PyObject *self, PyObject *args) {
    unsigned long long px, pd, pm, pu, pnearest;
    Py_ssize_t nblocks;
    int bits, affine;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnipKKKK", &px, &nblocks, &bits, &affine, &pd, &pm, &pu, &pnearest) ||
        !check_bits(bits))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    legacy_encode(ADDR(const float, px), nblocks, bits, affine, ADDR(float, pd), ADDR(float, pm), ADDR(float, pu),
                  ADDR(int32_t, pnearest));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_legacy_block_bytes(PyObject *self, PyObject *args) {
    int bits, affine;
    (void)self;
    if (!PyArg_ParseTuple(args, "ip", &bits, &affine) || !check_bits(bits)) return NULL;
    return PyLong_FromLong(legacy_block_bytes(bits, affine));
}

static PyObject *py_legacy_quantize(PyObject *self, PyObject *args) {
    unsigned long long px, key, col_start, pnearest, phardened, pchanged;
    Py_ssize_t rows, cols;
    int bits, affine, harden;
    unsigned int row_start;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnnippKIKKKK", &px, &rows, &cols, &bits, &affine, &harden, &key, &row_start,
                          &col_start, &pnearest, &phardened, &pchanged) ||
        !check_bits(bits))
        return NULL;
    if (cols % 32) {
        PyErr_Format(PyExc_ValueError, "legacy rows hold whole blocks of 32, not %zd weights", cols);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = legacy_quantize(ADDR(const float, px), rows, cols, bits, affine, harden, key, row_start, col_start,
                         ADDR(uint8_t, pnearest), ADDR(uint8_t, phardened), ADDR(int64_t, pchanged));
    Py_END_ALLOW_THREADS
    if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_fp8_cells(PyObject *self, PyObject *args) {
    unsigned long long px, pfactor, plower, pupper, pposition, pnearest, pnegative;
    Py_ssize_t rows, cols;
    int rule;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnnKiKKKKK", &px, &rows, &cols, &pfactor, &rule, &plower, &pupper, &pposition,
                          &pnearest, &pnegative) ||
        !check_rule(rule))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    fp8_cells(ADDR(const float, px), rows, cols, ADDR(const float, pfactor), rule, ADDR(int32_t, plower),
              ADDR(int32_t, pupper), ADDR(float, pposition), ADDR(int32_t, pnearest), ADDR(uint8_t, pnegative));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_fp8_quantize(PyObject *self, PyObject *args) {
    unsigned long long px, pfactor, key, col_start, pnearest, phardened, pchanged;
    Py_ssize_t rows, cols;
    int rule, harden;
    unsigned int row_start;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnnKipKIKKKK", &px, &rows, &cols, &pfactor, &rule, &harden, &key, &row_start,
                          &col_start, &pnearest, &phardened, &pchanged) ||
        !check_rule(rule))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fp8_quantize(ADDR(const float, px), rows, cols, ADDR(const float, pfactor), rule, harden, key, row_start,
                      col_start, ADDR(uint8_t, pnearest), ADDR(uint8_t, phardened), ADDR(int64_t, pchanged));
    Py_END_ALLOW_THREADS
    if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_cell_tally(PyObject *self, PyObject *args) {
    unsigned long long pvalues, pposition, plower, pupper, pnearest, plo, phi, pnear, pabove, ptable, pnegative, pscale,
        pshift, pshifts, plive, pdecoy, ptally;
    Py_ssize_t count, group, first;
    struct tally_params tp;
    struct value_rule rule;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKKiiKKKnnpniiifKiffiKKK", &pvalues, &pposition, &plower, &pupper, &pnearest,
                          &plo, &phi, &pnear, &pabove, &ptable, &rule.first_code, &rule.size, &pnegative, &pscale,
                          &pshift, &group, &first, &rule.above, &count, &tp.bottom, &tp.top, &tp.mantissa_bits,
                          &tp.tiny, &pshifts, &tp.nshifts, &tp.on_low, &tp.on_high, &tp.cdf_points, &plive, &pdecoy,
                          &ptally))
        return NULL;
    if (ptable && (rule.size < 1 || group < 1 || !pscale)) {
        PyErr_SetString(PyExc_ValueError, "a code-value rule needs a table, a scale and a group of at least 1");
        return NULL;
    }
    rule.table = ADDR(const float, ptable);
    rule.negative = ADDR(const uint8_t, pnegative);
    rule.scale = ADDR(const float, pscale);
    rule.shift = ADDR(const float, pshift);
    rule.group = group;
    rule.first = first;
    tp.shifts = ADDR(const int32_t, pshifts);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = cell_tally(ADDR(const float, pvalues), ADDR(const float, pposition), ADDR(const int32_t, plower),
                    ADDR(const int32_t, pupper), ADDR(const int32_t, pnearest), ADDR(const float, plo),
                    ADDR(const float, phi), ADDR(const float, pnear), ADDR(const float, pabove),
                    ptable ? &rule : NULL, count, &tp, ADDR(int64_t, plive), ADDR(int64_t, pdecoy),
                    ADDR(int64_t, ptally));
    Py_END_ALLOW_THREADS
    if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_grid_cells(PyObject *self, PyObject *args) {
    unsigned long long pu, pnearest, plower, pupper, pposition;
    Py_ssize_t count;
    int qmin, qmax, offset;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKniiiKKK", &pu, &pnearest, &count, &qmin, &qmax, &offset, &plower, &pupper,
                          &pposition))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    grid_cells(ADDR(const float, pu), ADDR(const int32_t, pnearest), count, qmin, qmax, offset, ADDR(int32_t, plower),
               ADDR(int32_t, pupper), ADDR(float, pposition));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_stochastic_codes(PyObject *self, PyObject *args) {
    unsigned long long key, col_start, pposition, plower, pupper, pcodes;
    unsigned int row_start;
    Py_ssize_t rows, cols;
    (void)self;
    if (!PyArg_ParseTuple(args, "KInKnKKKK", &key, &row_start, &rows, &col_start, &cols, &pposition, &plower, &pupper,
                          &pcodes))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    stochastic_codes(key, row_start, rows, col_start, cols, ADDR(const float, pposition), ADDR(const int32_t, plower),
                     ADDR(const int32_t, pupper), ADDR(int32_t, pcodes));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_philox_isa(PyObject *self, PyObject *args) {
    int portable;
    (void)self;
    if (!PyArg_ParseTuple(args, "p", &portable)) return NULL;
    return PyUnicode_FromString(philox_init(portable) ? "avx2" : "portable");
}

static PyMethodDef methods[] = {
    {"qkx2", py_qkx2, METH_VARARGS,
     "qkx2(x, count, n, nmax, rmin, rdelta, nstep, use_mad, rms_weights, scale, min, codes): make_qkx2_quants"},
    {"qx", py_qx, METH_VARARGS, "qx(x, count, n, nmax, scale, codes): make_qx_quants, rmse_type 1"},
    {"q3", py_q3, METH_VARARGS, "q3(x, count, n, nmax, scale, codes): make_q3_quants, do_rmse"},
    {"legacy", py_legacy, METH_VARARGS, "legacy(x, nblocks, bits, affine, d, m, u, nearest): GgufLegacy encoding"},
    {"legacy_block_bytes", py_legacy_block_bytes, METH_VARARGS, "legacy_block_bytes(bits, affine): bytes per block"},
    {"legacy_quantize", py_legacy_quantize, METH_VARARGS,
     "legacy_quantize(x, rows, cols, bits, affine, harden, key, row_start, col_start, nearest, hardened, changed)"},
    {"fp8_cells", py_fp8_cells, METH_VARARGS,
     "fp8_cells(x, rows, cols, factor, rule, lower, upper, position, nearest, negative): formats.fp8.fp8_cells"},
    {"fp8_quantize", py_fp8_quantize, METH_VARARGS,
     "fp8_quantize(x, rows, cols, factor, rule, harden, key, row_start, col_start, nearest, hardened, changed)"},
    {"cell_tally", py_cell_tally, METH_VARARGS,
     "cell_tally(values, position, lower, upper, nearest, lo, hi, near, above, table, first_code, size, negative, "
     "scale, shift, group, first, rule_above, count, bottom, top, mantissa_bits, tiny, shifts, nshifts, on_low, "
     "on_high, cdf_points, live_counts, decoy_counts, tally): the detector's pass"},
    {"grid_cells", py_grid_cells, METH_VARARGS,
     "grid_cells(u, nearest, count, qmin, qmax, offset, lower, upper, position): integer_grid_cells"},
    {"stochastic_codes", py_stochastic_codes, METH_VARARGS,
     "stochastic_codes(key, row_start, rows, col_start, cols, position, lower, upper, codes): harden.stochastic_codes"},
    {"philox_isa", py_philox_isa, METH_VARARGS,
     "philox_isa(portable): pick the Philox batch (the widest the CPU runs, or portable C); returns its name"},
    {"philox", py_philox, METH_VARARGS, "philox(key, row_start, rows, col_start, cols, stream, out): uniform_grid"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    philox_init(0);
    return PyModule_Create(&module);
}
