/* Entry points of the packed symmetric storage kernels on CUDA (csrc/cuda/sym_pack_cuda.cu),
 * as packed_ops.c for the CPU: borrow and check every buffer, the packed buffers' lengths and
 * the per-block packed offsets (host copy) against the host table, enqueue on the caller's
 * stream. Part of the binding. */
#include "cuda_binding.h"

#include "../core/block_table.h"
#include "../core/sym_pack.h"

#define PACKED_TABLE_ARGS                                                                    \
    SHAMPOO_CUDA_TABLE_ARGS,                                                                 \
    {"packed_offsets", SHAMPOO_ARG_INT64, SHAMPOO_LAYOUT_PER_BLOCK, 0},                      \
    {"packed_offsets_host", SHAMPOO_ARG_INT64, SHAMPOO_LAYOUT_PER_BLOCK, SHAMPOO_ARG_HOST}

/* Arguments 2..5 are the tables and offsets; `packed` lists the packed buffers' indices. */
static int check_packed(shampoo_call *call, const int *packed, int count)
{
    const int64_t *table = shampoo_arg(call, 3), *offsets = shampoo_arg(call, 5);
    const int64_t need = shampoo_packed_numel(table, call->nblocks);
    if (need < 0) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'table_host' is not a valid block table", call->fn);
        return -1;
    }
    int64_t at = 0;
    for (int64_t b = 0; b < call->nblocks; b++) {
        const int64_t *row = shampoo_table_row(table, b);
        if (offsets[b] != at) {
            PyErr_Format(PyExc_ValueError, "%s: argument 'packed_offsets_host' is not the "
                         "packed layout of the table (block %lld)", call->fn, (long long)b);
            return -1;
        }
        for (int64_t k = 0; k < row[SHAMPOO_BF_ORDER]; k++)
            at += row[SHAMPOO_BF_DIMS + k] * (row[SHAMPOO_BF_DIMS + k] + 1) / 2;
    }
    for (int i = 0; i < count; i++) {
        if (call->views[packed[i]].numel < need) {
            PyErr_Format(PyExc_ValueError, "%s: a packed argument has %lld elements, the packed "
                         "layout of the table needs %lld", call->fn,
                         (long long)call->views[packed[i]].numel, (long long)need);
            return -1;
        }
    }
    return 0;
}

/* A flag argument: a bool or an int, read as a truth value; TypeError for anything else (a
 * tensor's truth value would raise its own error). Returns 0/1, or -1 with an exception. */
static int flag_arg(const char *fn, const char *name, PyObject *obj)
{
    if (!PyBool_Check(obj) && !PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: argument '%s' must be a bool", fn, name);
        return -1;
    }
    return PyObject_IsTrue(obj);
}

typedef shampoo_status (*packed_fn)(const shampoo_cuda_env *, void *, void *, const int64_t *,
                                    const int64_t *, int64_t, const int64_t *, const uint8_t *,
                                    int);

/* One signature for the three ops (unpack and commit ignore `average`). */
#define SHAMPOO_NO_AVERAGE(op, sfx, real)                                                      \
    static shampoo_status op##_##sfx##_any(const shampoo_cuda_env *env, void *a, void *b,             \
                                     const int64_t *t, const int64_t *th, int64_t n,            \
                                     const int64_t *po, const uint8_t *mask, int average)       \
    {                                                                                          \
        (void)average;                                                                         \
        return shampoo_cuda_##op##_##sfx(env, (real *)a, (real *)b, t, th, n, po, mask);        \
    }
SHAMPOO_NO_AVERAGE(sym_unpack, f32, float)
SHAMPOO_NO_AVERAGE(sym_unpack, f64, double)
SHAMPOO_NO_AVERAGE(packed_commit, f32, float)
SHAMPOO_NO_AVERAGE(packed_commit, f64, double)
static shampoo_status sym_pack_f32_any(const shampoo_cuda_env *env, void *a, void *b,
                                       const int64_t *t, const int64_t *th, int64_t n,
                                       const int64_t *po, const uint8_t *mask, int average)
{
    return shampoo_cuda_sym_pack_f32(env, a, b, t, th, n, po, mask, average);
}
static shampoo_status sym_pack_f64_any(const shampoo_cuda_env *env, void *a, void *b,
                                       const int64_t *t, const int64_t *th, int64_t n,
                                       const int64_t *po, const uint8_t *mask, int average)
{
    return shampoo_cuda_sym_pack_f64(env, a, b, t, th, n, po, mask, average);
}

static PyObject *run(PyObject *m, PyObject *args, int bits, const char *fn,
                     const shampoo_arg_spec *specs, const int *packed, int npacked,
                     packed_fn f32, packed_fn f64)
{
    PyObject *o[7], *average_obj = Py_False;
    unsigned long long stream;
    shampoo_call call = {0};
    shampoo_cuda_env env;
    shampoo_cuda_scope scope = {0};
    if (!PyArg_ParseTuple(args, "KOOOOOOO|O", &stream, &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                          &o[6], &average_obj))
        return NULL;
    const int average = flag_arg(fn, "average", average_obj);
    if (average < 0)
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, fn, specs, o, 7, bits) < 0 ||
        check_packed(&call, packed, npacked) < 0 ||
        shampoo_cuda_env_for(m, &call, stream, NULL, NULL, 0, &env, &scope) < 0)
        return shampoo_cuda_failed(m, &scope, &call);
    shampoo_status st = (bits == 32 ? f32 : f64)(
        &env, shampoo_arg(&call, 0), shampoo_arg(&call, 1), shampoo_arg(&call, 2),
        shampoo_arg(&call, 3), call.nblocks, shampoo_arg(&call, 4), shampoo_arg(&call, 6),
        average);
    return shampoo_cuda_done(m, &scope, &call, st, Py_NewRef(Py_None));
}

static PyObject *sym_unpack(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"full", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, SHAMPOO_ARG_OUT},
        {"packed", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_NONE, 0},
        PACKED_TABLE_ARGS,
        {"active", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_BLOCK, 0},
    };
    static const int packed[] = {1};
    return run(m, args, bits, fn, specs, packed, 1, sym_unpack_f32_any, sym_unpack_f64_any);
}

static PyObject *sym_pack(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"packed", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_OUT},
        {"full", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, 0},
        PACKED_TABLE_ARGS,
        {"mask", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_FACTOR, SHAMPOO_ARG_OPTIONAL},
    };
    static const int packed[] = {0};
    return run(m, args, bits, fn, specs, packed, 1, sym_pack_f32_any, sym_pack_f64_any);
}

static PyObject *packed_commit(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"dst", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_OUT},
        {"src", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_OUT},
        PACKED_TABLE_ARGS,
        {"commit", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_FACTOR, 0},
    };
    static const int packed[] = {0, 1};
    return run(m, args, bits, fn, specs, packed, 2, packed_commit_f32_any, packed_commit_f64_any);
}

SHAMPOO_TWINS(sym_unpack)
SHAMPOO_TWINS(sym_pack)
SHAMPOO_TWINS(packed_commit)

PyMethodDef shampoo_cuda_packed_methods[] = {
    SHAMPOO_TWIN_ENTRIES(sym_unpack, "packed symmetric -> full factor layout (CUDA)"),
    SHAMPOO_TWIN_ENTRIES(sym_pack, "full factor layout -> packed upper triangles (CUDA)"),
    SHAMPOO_TWIN_ENTRIES(packed_commit, "inverse-root commit, packed layout (CUDA)"),
    {NULL, NULL, 0, NULL}
};
