/* The CPython module qcbguard_kernels.native._native: thin bindings over native.h.
 *
 * Every parallel function takes a list of jobs, one argument tuple per range of rows or weights (the Python wrapper
 * in __init__.py owns, types and sizes the tensors, and cuts the ranges). The bindings parse every job first, then
 * release the GIL and run the jobs in one OpenMP parallel region. Built with -fopenmp against libgomp.so.1, the
 * extension shares the runtime torch has already loaded (same soname), so the jobs run on torch's own intra-op
 * threads: a second thread pool would compete with torch's threads, which spin for a while after each of torch's
 * parallel operations (measured: the detector's pass 2x slower on 2 cores). GNU OpenMP is not fork-safe: a child
 * forked after its parent ran a parallel region (vLLM forks its workers) would wait forever on threads it did not
 * inherit, so a forked child runs its jobs on plain threads started per call instead.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

#define ADDR(type, p) ((type *)(uintptr_t)(p))

static int check_len(int n) {
    if (n < 1 || n > MAX_SUB_BLOCK) {
        PyErr_Format(PyExc_ValueError, "sub-block length %d outside [1, %d]", n, MAX_SUB_BLOCK);
        return 0;
    }
    return 1;
}

/* FP8_ROW_SCALE (scales computed and written) only where the pass quantizes */
static int check_rule(int rule, int quantizing) {
    if (rule == FP8_AS_IS || rule == FP8_DIVIDE_ROW || rule == FP8_MULTIPLY || (quantizing && rule == FP8_ROW_SCALE))
        return 1;
    PyErr_Format(PyExc_ValueError, "unknown fp8 scale rule %d", rule);
    return 0;
}

static int check_dtype(int dtype) {
    if (dtype == WEIGHTS_F32 || dtype == WEIGHTS_BF16 || dtype == WEIGHTS_F16) return 1;
    PyErr_Format(PyExc_ValueError, "unknown weight dtype code %d", dtype);
    return 0;
}

static int check_bits(int bits) {
    if (bits == 4 || bits == 5 || bits == 8) return 1;
    PyErr_Format(PyExc_ValueError, "legacy blocks have 4, 5 or 8 bits, not %d", bits);
    return 0;
}

/* A job's arguments parsed into `job` (a struct of job_size bytes); 0 with a Python error set when they are bad. */
typedef int (*parse_fn)(PyObject *args, void *job);
/* Runs one parsed job without the GIL: 0, or -1 when it ran out of memory. */
typedef int (*run_fn)(const void *job);

static volatile int forked_child = 0; /* set in the child of every fork (pthread_atfork, at import) */

static void mark_forked_child(void) { forked_child = 1; }

struct thread_job {
    const void *job;
    run_fn run;
    int rc;
};

static void *thread_main(void *arg) {
    struct thread_job *t = arg;
    t->rc = t->run(t->job);
    return NULL;
}

/* The jobs on plain threads, one per job, the calling thread taking the first (a thread that cannot be started runs
 * its job on the calling thread): nonzero when one failed. */
static int run_on_threads(const char *parsed, Py_ssize_t n, size_t job_size, run_fn run) {
    struct thread_job *jobs = calloc(n > 0 ? (size_t)n : 1, sizeof *jobs);
    pthread_t *threads = calloc(n > 0 ? (size_t)n : 1, sizeof *threads);
    char *started = calloc(n > 0 ? (size_t)n : 1, 1);
    int failed = !jobs || !threads || !started;
    for (Py_ssize_t i = 0; i < n && !failed; ++i) {
        jobs[i] = (struct thread_job){parsed + (size_t)i * job_size, run, 0};
        started[i] = i > 0 && pthread_create(&threads[i], NULL, thread_main, &jobs[i]) == 0;
    }
    for (Py_ssize_t i = 0; i < n && !failed; ++i)
        if (!started[i]) thread_main(&jobs[i]);
    for (Py_ssize_t i = 0; i < n && !failed; ++i)
        if (started[i]) pthread_join(threads[i], NULL);
    for (Py_ssize_t i = 0; i < n && !failed; ++i) failed |= jobs[i].rc != 0;
    free(jobs);
    free(threads);
    free(started);
    return failed;
}

static PyObject *run_jobs(PyObject *args, size_t job_size, parse_fn parse, run_fn run) {
    PyObject *jobs;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &jobs)) return NULL;
    const Py_ssize_t n = PyList_GET_SIZE(jobs);
    char *parsed = PyMem_Calloc(n > 0 ? (size_t)n : 1, job_size);
    if (!parsed) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject *item = PyList_GET_ITEM(jobs, i);
        if (!PyTuple_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "every job is a tuple of arguments");
            PyMem_Free(parsed);
            return NULL;
        }
        if (!parse(item, parsed + (size_t)i * job_size)) {
            PyMem_Free(parsed);
            return NULL;
        }
    }
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    if (forked_child) {
        failed = run_on_threads(parsed, n, job_size, run);
    } else {
#pragma omp parallel for num_threads((int)(n > 0 ? n : 1)) schedule(static, 1) reduction(| : failed)
        for (Py_ssize_t i = 0; i < n; ++i) failed |= run(parsed + (size_t)i * job_size) != 0;
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(parsed);
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* One binding per parallel function: `py_<name>(jobs)` parses each job with parse_<name> into a struct <name>_job
 * and runs it with run_<name>. */
#define JOB_BINDING(name)                                                                                           \
    static PyObject *py_##name(PyObject *self, PyObject *args) {                                                    \
        (void)self;                                                                                                 \
        return run_jobs(args, sizeof(struct name##_job), parse_##name, run_##name);                                 \
    }

struct qkx2_job {
    unsigned long long x, scale, min, codes;
    Py_ssize_t count;
    int n, nmax, nstep, use_mad, rms_weights;
    float rmin, rdelta;
};

static int parse_qkx2(PyObject *args, void *job) {
    struct qkx2_job *j = job;
    return PyArg_ParseTuple(args, "KniiffippKKK", &j->x, &j->count, &j->n, &j->nmax, &j->rmin, &j->rdelta, &j->nstep,
                            &j->use_mad, &j->rms_weights, &j->scale, &j->min, &j->codes) &&
           check_len(j->n);
}

static int run_qkx2(const void *job) {
    const struct qkx2_job *j = job;
    qkx2_search(ADDR(const float, j->x), j->count, j->n, j->nmax, j->rmin, j->rdelta, j->nstep, j->use_mad,
                j->rms_weights, ADDR(float, j->scale), ADDR(float, j->min), ADDR(int, j->codes));
    return 0;
}
JOB_BINDING(qkx2)

/* qx and q3: the symmetric searches share one argument list */
struct symmetric_job {
    unsigned long long x, scale, codes;
    Py_ssize_t count;
    int n, nmax;
};

static int parse_symmetric(PyObject *args, struct symmetric_job *j) {
    return PyArg_ParseTuple(args, "KniiKK", &j->x, &j->count, &j->n, &j->nmax, &j->scale, &j->codes) &&
           check_len(j->n);
}

static int parse_qx(PyObject *args, void *job) { return parse_symmetric(args, job); }
static int parse_q3(PyObject *args, void *job) { return parse_symmetric(args, job); }

static int run_qx(const void *job) {
    const struct symmetric_job *j = job;
    qx_search(ADDR(const float, j->x), j->count, j->n, j->nmax, ADDR(float, j->scale), ADDR(int, j->codes));
    return 0;
}

static int run_q3(const void *job) {
    const struct symmetric_job *j = job;
    q3_search(ADDR(const float, j->x), j->count, j->n, j->nmax, ADDR(float, j->scale), ADDR(int, j->codes));
    return 0;
}

static PyObject *py_qx(PyObject *self, PyObject *args) {
    (void)self;
    return run_jobs(args, sizeof(struct symmetric_job), parse_qx, run_qx);
}

static PyObject *py_q3(PyObject *self, PyObject *args) {
    (void)self;
    return run_jobs(args, sizeof(struct symmetric_job), parse_q3, run_q3);
}

struct philox_job {
    unsigned long long key, col_start, out;
    unsigned int row_start, stream;
    Py_ssize_t rows, cols;
};

static int parse_philox(PyObject *args, void *job) {
    struct philox_job *j = job;
    return PyArg_ParseTuple(args, "KInKnIK", &j->key, &j->row_start, &j->rows, &j->col_start, &j->cols, &j->stream,
                            &j->out);
}

static int run_philox(const void *job) {
    const struct philox_job *j = job;
    philox_uniform_grid(j->key, j->row_start, j->rows, j->col_start, j->cols, j->stream, ADDR(float, j->out));
    return 0;
}
JOB_BINDING(philox)

struct legacy_job {
    unsigned long long x, d, m, u, nearest;
    Py_ssize_t nblocks;
    int bits, affine;
};

static int parse_legacy(PyObject *args, void *job) {
    struct legacy_job *j = job;
    return PyArg_ParseTuple(args, "KnipKKKK", &j->x, &j->nblocks, &j->bits, &j->affine, &j->d, &j->m, &j->u,
                            &j->nearest) &&
           check_bits(j->bits);
}

static int run_legacy(const void *job) {
    const struct legacy_job *j = job;
    legacy_encode(ADDR(const float, j->x), j->nblocks, j->bits, j->affine, ADDR(float, j->d), ADDR(float, j->m),
                  ADDR(float, j->u), ADDR(int32_t, j->nearest));
    return 0;
}
JOB_BINDING(legacy)

static PyObject *py_legacy_block_bytes(PyObject *self, PyObject *args) {
    int bits, affine;
    (void)self;
    if (!PyArg_ParseTuple(args, "ip", &bits, &affine) || !check_bits(bits)) return NULL;
    return PyLong_FromLong(legacy_block_bytes(bits, affine));
}

struct legacy_quantize_job {
    unsigned long long x, key, col_start, nearest, hardened, changed;
    Py_ssize_t rows, cols;
    int dtype, bits, affine, harden;
    unsigned int row_start;
};

static int parse_legacy_quantize(PyObject *args, void *job) {
    struct legacy_quantize_job *j = job;
    if (!PyArg_ParseTuple(args, "KinnippKIKKKK", &j->x, &j->dtype, &j->rows, &j->cols, &j->bits, &j->affine,
                          &j->harden, &j->key, &j->row_start, &j->col_start, &j->nearest, &j->hardened,
                          &j->changed) ||
        !check_dtype(j->dtype) || !check_bits(j->bits))
        return 0;
    if (j->cols % 32) {
        PyErr_Format(PyExc_ValueError, "legacy rows hold whole blocks of 32, not %zd weights", j->cols);
        return 0;
    }
    return 1;
}

static int run_legacy_quantize(const void *job) {
    const struct legacy_quantize_job *j = job;
    return legacy_quantize(ADDR(const void, j->x), j->dtype, j->rows, j->cols, j->bits, j->affine, j->harden, j->key,
                           j->row_start, j->col_start, ADDR(uint8_t, j->nearest), ADDR(uint8_t, j->hardened),
                           ADDR(int64_t, j->changed));
}
JOB_BINDING(legacy_quantize)

static int check_kquant_bits(int bits) {
    if (bits == 3 || bits == 6) return 1;
    PyErr_Format(PyExc_ValueError, "symmetric k-quants have 3 (Q3_K) or 6 (Q6_K) bits, not %d", bits);
    return 0;
}

static PyObject *py_kquant_sym_block_bytes(PyObject *self, PyObject *args) {
    int bits;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &bits) || !check_kquant_bits(bits)) return NULL;
    return PyLong_FromLong(kquant_sym_block_bytes(bits));
}

struct kquant_sym_quantize_job {
    unsigned long long x, key, col_start, nearest, hardened, changed;
    Py_ssize_t rows, cols;
    int dtype, bits, harden;
    unsigned int row_start;
};

static int parse_kquant_sym_quantize(PyObject *args, void *job) {
    struct kquant_sym_quantize_job *j = job;
    if (!PyArg_ParseTuple(args, "KinnipKIKKKK", &j->x, &j->dtype, &j->rows, &j->cols, &j->bits, &j->harden, &j->key,
                          &j->row_start, &j->col_start, &j->nearest, &j->hardened, &j->changed) ||
        !check_dtype(j->dtype) || !check_kquant_bits(j->bits))
        return 0;
    if (j->cols % 256) {
        PyErr_Format(PyExc_ValueError, "k-quant rows hold whole super-blocks of 256, not %zd weights", j->cols);
        return 0;
    }
    return 1;
}

static int run_kquant_sym_quantize(const void *job) {
    const struct kquant_sym_quantize_job *j = job;
    return kquant_sym_quantize(ADDR(const void, j->x), j->dtype, j->rows, j->cols, j->bits, j->harden, j->key,
                               j->row_start, j->col_start, ADDR(uint8_t, j->nearest), ADDR(uint8_t, j->hardened),
                               ADDR(int64_t, j->changed));
}
JOB_BINDING(kquant_sym_quantize)

struct fp8_cells_job {
    unsigned long long x, factor, lower, upper, position, nearest, negative;
    Py_ssize_t rows, cols;
    int rule;
};

static int parse_fp8_cells(PyObject *args, void *job) {
    struct fp8_cells_job *j = job;
    return PyArg_ParseTuple(args, "KnnKiKKKKK", &j->x, &j->rows, &j->cols, &j->factor, &j->rule, &j->lower, &j->upper,
                            &j->position, &j->nearest, &j->negative) &&
           check_rule(j->rule, 0);
}

static int run_fp8_cells(const void *job) {
    const struct fp8_cells_job *j = job;
    fp8_cells(ADDR(const float, j->x), j->rows, j->cols, ADDR(const float, j->factor), j->rule, ADDR(int32_t, j->lower),
              ADDR(int32_t, j->upper), ADDR(float, j->position), ADDR(int32_t, j->nearest),
              ADDR(uint8_t, j->negative));
    return 0;
}
JOB_BINDING(fp8_cells)

struct fp8_quantize_job {
    unsigned long long x, factor, key, col_start, nearest, hardened, changed;
    Py_ssize_t rows, cols;
    int dtype, rule, harden;
    unsigned int row_start;
};

static int parse_fp8_quantize(PyObject *args, void *job) {
    struct fp8_quantize_job *j = job;
    return PyArg_ParseTuple(args, "KinnKipKIKKKK", &j->x, &j->dtype, &j->rows, &j->cols, &j->factor, &j->rule,
                            &j->harden, &j->key, &j->row_start, &j->col_start, &j->nearest, &j->hardened,
                            &j->changed) &&
           check_dtype(j->dtype) && check_rule(j->rule, 1);
}

static int run_fp8_quantize(const void *job) {
    const struct fp8_quantize_job *j = job;
    return fp8_quantize(ADDR(const void, j->x), j->dtype, j->rows, j->cols, ADDR(float, j->factor), j->rule, j->harden,
                        j->key, j->row_start, j->col_start, ADDR(uint8_t, j->nearest), ADDR(uint8_t, j->hardened),
                        ADDR(int64_t, j->changed));
}
JOB_BINDING(fp8_quantize)

struct cell_tally_job {
    unsigned long long values, position, lower, upper, nearest, lo, hi, near, above, live, decoy, tally;
    Py_ssize_t count;
    struct tally_params tp;
    struct value_rule rule;
    int has_rule;
};

static int parse_cell_tally(PyObject *args, void *job) {
    struct cell_tally_job *j = job;
    unsigned long long table, negative, scale, shift, shifts;
    Py_ssize_t group, first;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKKiiKKKnnpniiifKiffiKKK", &j->values, &j->position, &j->lower, &j->upper,
                          &j->nearest, &j->lo, &j->hi, &j->near, &j->above, &table, &j->rule.first_code,
                          &j->rule.size, &negative, &scale, &shift, &group, &first, &j->rule.above, &j->count,
                          &j->tp.bottom, &j->tp.top, &j->tp.mantissa_bits, &j->tp.tiny, &shifts, &j->tp.nshifts,
                          &j->tp.on_low, &j->tp.on_high, &j->tp.cdf_points, &j->live, &j->decoy, &j->tally))
        return 0;
    if (table && (j->rule.size < 1 || group < 1 || !scale)) {
        PyErr_SetString(PyExc_ValueError, "a code-value rule needs a table, a scale and a group of at least 1");
        return 0;
    }
    j->has_rule = table != 0;
    j->rule.table = ADDR(const float, table);
    j->rule.negative = ADDR(const uint8_t, negative);
    j->rule.scale = ADDR(const float, scale);
    j->rule.shift = ADDR(const float, shift);
    j->rule.group = group;
    j->rule.first = first;
    j->tp.shifts = ADDR(const int32_t, shifts);
    return 1;
}

static int run_cell_tally(const void *job) {
    const struct cell_tally_job *j = job;
    return cell_tally(ADDR(const float, j->values), ADDR(const float, j->position), ADDR(const int32_t, j->lower),
                      ADDR(const int32_t, j->upper), ADDR(const int32_t, j->nearest), ADDR(const float, j->lo),
                      ADDR(const float, j->hi), ADDR(const float, j->near), ADDR(const float, j->above),
                      j->has_rule ? &j->rule : NULL, j->count, &j->tp, ADDR(int64_t, j->live),
                      ADDR(int64_t, j->decoy), ADDR(int64_t, j->tally));
}
JOB_BINDING(cell_tally)

struct grid_cells_job {
    unsigned long long u, nearest, lower, upper, position;
    Py_ssize_t count;
    int qmin, qmax, offset;
};

static int parse_grid_cells(PyObject *args, void *job) {
    struct grid_cells_job *j = job;
    return PyArg_ParseTuple(args, "KKniiiKKK", &j->u, &j->nearest, &j->count, &j->qmin, &j->qmax, &j->offset,
                            &j->lower, &j->upper, &j->position);
}

static int run_grid_cells(const void *job) {
    const struct grid_cells_job *j = job;
    grid_cells(ADDR(const float, j->u), ADDR(const int32_t, j->nearest), j->count, j->qmin, j->qmax, j->offset,
               ADDR(int32_t, j->lower), ADDR(int32_t, j->upper), ADDR(float, j->position));
    return 0;
}
JOB_BINDING(grid_cells)

struct stochastic_codes_job {
    unsigned long long key, col_start, position, lower, upper, codes;
    unsigned int row_start;
    Py_ssize_t rows, cols;
};

static int parse_stochastic_codes(PyObject *args, void *job) {
    struct stochastic_codes_job *j = job;
    return PyArg_ParseTuple(args, "KInKnKKKK", &j->key, &j->row_start, &j->rows, &j->col_start, &j->cols,
                            &j->position, &j->lower, &j->upper, &j->codes);
}

static int run_stochastic_codes(const void *job) {
    const struct stochastic_codes_job *j = job;
    stochastic_codes(j->key, j->row_start, j->rows, j->col_start, j->cols, ADDR(const float, j->position),
                     ADDR(const int32_t, j->lower), ADDR(const int32_t, j->upper), ADDR(int32_t, j->codes));
    return 0;
}
JOB_BINDING(stochastic_codes)

struct feedback_job {
    struct value_rule rule;
    unsigned long long order, factor, work, u, nearest, index, errors;
    Py_ssize_t cols, row0, count, ld, start, end;
};

static int parse_feedback(PyObject *args, void *job) {
    struct feedback_job *j = job;
    unsigned long long table, negative, scale, shift;
    if (!PyArg_ParseTuple(args, "KiKKKnKnnnnnnKKKKKK", &table, &j->rule.size, &negative, &scale, &shift,
                          &j->rule.group, &j->order, &j->cols, &j->row0, &j->count, &j->ld, &j->start, &j->end,
                          &j->factor, &j->work, &j->u, &j->nearest, &j->index, &j->errors))
        return 0;
    if (!table || !scale || j->rule.size < 1 || j->rule.size > 256 || j->rule.group < 1) {
        PyErr_SetString(PyExc_ValueError, "feedback needs a table of 1 to 256 codes, a scale and a group of at least 1");
        return 0;
    }
    if (j->start < 0 || j->start > j->end || j->end > j->cols || j->row0 < 0 || j->count < 0 || j->ld < j->count) {
        PyErr_SetString(PyExc_ValueError, "feedback block outside the weight");
        return 0;
    }
    j->rule.table = ADDR(const float, table);
    j->rule.negative = ADDR(const uint8_t, negative);
    j->rule.scale = ADDR(const float, scale);
    j->rule.shift = ADDR(const float, shift);
    return 1;
}

static int run_feedback(const void *job) {
    const struct feedback_job *j = job;
    feedback_block(&j->rule, ADDR(const int64_t, j->order), j->cols, j->row0, j->count, j->ld, j->start, j->end,
                   ADDR(const double, j->factor), ADDR(double, j->work), ADDR(const float, j->u),
                   ADDR(const int32_t, j->nearest), ADDR(int32_t, j->index), ADDR(double, j->errors));
    return 0;
}
JOB_BINDING(feedback)

/* The tests' switch between a pass's variants: the widest of `names` (ordered narrowest first) up to the one named
 * that the CPU runs, picked by `init`; returns its name. */
static PyObject *pick_variant(PyObject *args, const char *const *names, int count, int (*init)(int), const char *what) {
    const char *widest;
    if (!PyArg_ParseTuple(args, "s", &widest)) return NULL;
    for (int isa = 0; isa < count; ++isa)
        if (strcmp(widest, names[isa]) == 0) return PyUnicode_FromString(names[init(isa)]);
    PyErr_Format(PyExc_ValueError, "unknown %s %s", what, widest);
    return NULL;
}

static PyObject *py_philox_isa(PyObject *self, PyObject *args) {
    static const char *const names[] = {"portable", "avx2", "avx512"}; /* PHILOX_PORTABLE .. PHILOX_AVX512 */
    (void)self;
    return pick_variant(args, names, 3, philox_init, "Philox batch (portable, avx2 or avx512):");
}

static PyObject *py_widen_isa(PyObject *self, PyObject *args) {
    static const char *const names[] = {"portable", "f16c"}; /* WIDEN_PORTABLE, WIDEN_F16C */
    (void)self;
    return pick_variant(args, names, 2, widen_init, "float16 widening (portable or f16c):");
}

struct widen_job {
    unsigned long long x, out;
    Py_ssize_t rows, cols;
    int dtype;
};

static int parse_widen(PyObject *args, void *job) {
    struct widen_job *j = job;
    return PyArg_ParseTuple(args, "KinnK", &j->x, &j->dtype, &j->rows, &j->cols, &j->out) && check_dtype(j->dtype);
}

static int run_widen(const void *job) {
    const struct widen_job *j = job;
    float *out = ADDR(float, j->out);
    for (Py_ssize_t r = 0; r < j->rows; ++r) {
        float *row = out + r * j->cols;
        const float *wide = float_row(ADDR(const void, j->x), j->dtype, r, j->cols, row);
        if (wide != row) memcpy(row, wide, (size_t)j->cols * sizeof(float));
    }
    return 0;
}
JOB_BINDING(widen)

static PyObject *py_threads(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
#ifdef _OPENMP
    return PyUnicode_FromString(forked_child ? "threads" : "openmp");
#else
    return PyUnicode_FromString("serial");
#endif
}

/* Each parallel function takes a list of jobs; the docstrings give one job's argument tuple. */
static PyMethodDef methods[] = {
    {"qkx2", py_qkx2, METH_VARARGS,
     "qkx2(x, count, n, nmax, rmin, rdelta, nstep, use_mad, rms_weights, scale, min, codes): make_qkx2_quants"},
    {"qx", py_qx, METH_VARARGS, "qx(x, count, n, nmax, scale, codes): make_qx_quants, rmse_type 1"},
    {"q3", py_q3, METH_VARARGS, "q3(x, count, n, nmax, scale, codes): make_q3_quants, do_rmse"},
    {"legacy", py_legacy, METH_VARARGS, "legacy(x, nblocks, bits, affine, d, m, u, nearest): GgufLegacy encoding"},
    {"legacy_block_bytes", py_legacy_block_bytes, METH_VARARGS, "legacy_block_bytes(bits, affine): bytes per block"},
    {"legacy_quantize", py_legacy_quantize, METH_VARARGS,
     "legacy_quantize(x, dtype, rows, cols, bits, affine, harden, key, row_start, col_start, nearest, hardened, "
     "changed)"},
    {"kquant_sym_block_bytes", py_kquant_sym_block_bytes, METH_VARARGS,
     "kquant_sym_block_bytes(bits): bytes per Q3_K / Q6_K super-block"},
    {"kquant_sym_quantize", py_kquant_sym_quantize, METH_VARARGS,
     "kquant_sym_quantize(x, dtype, rows, cols, bits, harden, key, row_start, col_start, nearest, hardened, changed)"},
    {"fp8_cells", py_fp8_cells, METH_VARARGS,
     "fp8_cells(x, rows, cols, factor, rule, lower, upper, position, nearest, negative): formats.fp8.fp8_cells"},
    {"fp8_quantize", py_fp8_quantize, METH_VARARGS,
     "fp8_quantize(x, dtype, rows, cols, factor, rule, harden, key, row_start, col_start, nearest, hardened, "
     "changed)"},
    {"cell_tally", py_cell_tally, METH_VARARGS,
     "cell_tally(values, position, lower, upper, nearest, lo, hi, near, above, table, first_code, size, negative, "
     "scale, shift, group, first, rule_above, count, bottom, top, mantissa_bits, tiny, shifts, nshifts, on_low, "
     "on_high, cdf_points, live_counts, decoy_counts, tally): the detector's pass"},
    {"grid_cells", py_grid_cells, METH_VARARGS,
     "grid_cells(u, nearest, count, qmin, qmax, offset, lower, upper, position): integer_grid_cells"},
    {"stochastic_codes", py_stochastic_codes, METH_VARARGS,
     "stochastic_codes(key, row_start, rows, col_start, cols, position, lower, upper, codes): harden.stochastic_codes"},
    {"feedback", py_feedback, METH_VARARGS,
     "feedback(table, size, negative, scale, shift, group, order, cols, row0, count, ld, start, end, factor, work, u, "
     "nearest, index, errors): feedback_codes' columns [start, end)"},
    {"philox_isa", py_philox_isa, METH_VARARGS,
     "philox_isa(widest): use the widest Philox batch the CPU runs up to 'avx512', 'avx2' or 'portable' (C); returns "
     "the one it picked"},
    {"widen_isa", py_widen_isa, METH_VARARGS,
     "widen_isa(widest): widen float16 rows with F16C up to 'f16c' where the CPU has it, or 'portable' (C); returns "
     "the one it picked"},
    {"widen", py_widen, METH_VARARGS, "widen(x, dtype, rows, cols, out): the fused passes' float32 rows of x"},
    {"philox", py_philox, METH_VARARGS, "philox(key, row_start, rows, col_start, cols, stream, out): uniform_grid"},
    {"threads", py_threads, METH_NOARGS,
     "threads(): how jobs run: 'openmp' (torch's threads), 'threads' (a forked child), 'serial' (no OpenMP)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    philox_init(PHILOX_AVX512);
    widen_init(WIDEN_F16C);
    pthread_atfork(NULL, NULL, mark_forked_child);
    return PyModule_Create(&module);
}
