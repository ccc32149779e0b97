/* Entry points of the packed symmetric storage kernels (core/sym_pack.h), one pair per op
 * (name_f32 / name_f64). Packed buffers have no layout of the binding's own (LAYOUT_NONE): their
 * length is checked here against the packed layout of the table. Part of the binding. */
#include "binding.h"

#include "../core/block_table.h"
#include "../core/factor_update.h"
#include "../core/sym_pack.h"

#define TABLE_ARG {"table", SHAMPOO_ARG_TABLE, SHAMPOO_LAYOUT_NONE, 0}

/* ValueError unless argument i holds at least the table's packed layout. */
static int check_packed(shampoo_call *call, int i, const char *name, int table_arg)
{
    const int64_t need = shampoo_packed_numel(shampoo_arg(call, table_arg), call->nblocks);
    if (need < 0) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'table' is not a valid block table", call->fn);
        return -1;
    }
    if (call->views[i].numel < need) {
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' has %lld elements, the packed layout "
                     "of the table needs %lld", call->fn, name, (long long)call->views[i].numel,
                     (long long)need);
        return -1;
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

static PyObject *finish_call(shampoo_call *call, shampoo_status st)
{
    return shampoo_call_done(call, st, Py_NewRef(Py_None), shampoo_raise_status);
}

static PyObject *sym_unpack(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"full", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, SHAMPOO_ARG_OUT},
        {"packed", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_NONE, 0},
        TABLE_ARG,
        {"active", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_BLOCK, 0},
    };
    PyObject *o[4];
    shampoo_call call = {0};
    if (!PyArg_ParseTuple(args, "OOOO", &o[0], &o[1], &o[2], &o[3]))
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 4, bits) < 0 ||
        check_packed(&call, 1, "packed", 2) < 0)
        return shampoo_call_failed(&call);
    shampoo_status st;
    void *full = shampoo_arg(&call, 0), *packed = shampoo_arg(&call, 1);
    const int64_t *table = shampoo_arg(&call, 2);
    const uint8_t *active = shampoo_arg(&call, 3);
    Py_BEGIN_ALLOW_THREADS
    st = bits == 32 ? shampoo_sym_unpack_f32(full, packed, table, call.nblocks, active)
                    : shampoo_sym_unpack_f64(full, packed, table, call.nblocks, active);
    Py_END_ALLOW_THREADS
    return finish_call(&call, st);
}

static PyObject *sym_pack(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"packed", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_OUT},
        {"full", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, 0},
        TABLE_ARG,
        {"mask", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_FACTOR, SHAMPOO_ARG_OPTIONAL},
    };
    PyObject *o[4], *average_obj;
    shampoo_call call = {0};
    if (!PyArg_ParseTuple(args, "OOOOO", &o[0], &o[1], &o[2], &o[3], &average_obj))
        return NULL;
    const int average = flag_arg(fn, "average", average_obj);
    if (average < 0)
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 4, bits) < 0 ||
        check_packed(&call, 0, "packed", 2) < 0)
        return shampoo_call_failed(&call);
    shampoo_status st;
    void *packed = shampoo_arg(&call, 0), *full = shampoo_arg(&call, 1);
    const int64_t *table = shampoo_arg(&call, 2);
    const uint8_t *mask = shampoo_arg(&call, 3);
    Py_BEGIN_ALLOW_THREADS
    st = bits == 32 ? shampoo_sym_pack_f32(packed, full, table, call.nblocks, mask, average)
                    : shampoo_sym_pack_f64(packed, full, table, call.nblocks, mask, average);
    Py_END_ALLOW_THREADS
    return finish_call(&call, st);
}

static PyObject *packed_commit(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"dst", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_OUT},
        {"src", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_OUT},
        TABLE_ARG,
        {"commit", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_FACTOR, 0},
    };
    PyObject *o[4];
    shampoo_call call = {0};
    if (!PyArg_ParseTuple(args, "OOOO", &o[0], &o[1], &o[2], &o[3]))
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 4, bits) < 0 ||
        check_packed(&call, 0, "dst", 2) < 0 || check_packed(&call, 1, "src", 2) < 0)
        return shampoo_call_failed(&call);
    shampoo_status st;
    void *dst = shampoo_arg(&call, 0), *src = shampoo_arg(&call, 1);
    const int64_t *table = shampoo_arg(&call, 2);
    const uint8_t *commit = shampoo_arg(&call, 3);
    Py_BEGIN_ALLOW_THREADS
    st = bits == 32 ? shampoo_packed_commit_f32(dst, src, table, call.nblocks, commit)
                    : shampoo_packed_commit_f64(dst, src, table, call.nblocks, commit);
    Py_END_ALLOW_THREADS
    return finish_call(&call, st);
}

static PyObject *packed_select(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"compact", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_OUT},
        {"packed", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_OUT},
        TABLE_ARG,
        {"select", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_FACTOR, 0},
        {"write", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_FACTOR, SHAMPOO_ARG_OPTIONAL},
    };
    PyObject *o[5], *to_packed_obj;
    shampoo_call call = {0};
    if (!PyArg_ParseTuple(args, "OOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &to_packed_obj))
        return NULL;
    const int to_packed = flag_arg(fn, "to_packed", to_packed_obj);
    if (to_packed < 0)
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 5, bits) < 0 ||
        check_packed(&call, 1, "packed", 2) < 0)
        return shampoo_call_failed(&call);
    const int64_t *table = shampoo_arg(&call, 2);
    const uint8_t *select = shampoo_arg(&call, 3), *write = shampoo_arg(&call, 4);
    const int64_t need = shampoo_packed_select_numel(table, call.nblocks, select);
    if (call.views[0].numel < need) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'compact' has %lld elements, the selected "
                     "factors need %lld", fn, (long long)call.views[0].numel, (long long)need);
        return shampoo_call_failed(&call);
    }
    shampoo_status st;
    void *compact = shampoo_arg(&call, 0), *packed = shampoo_arg(&call, 1);
    Py_BEGIN_ALLOW_THREADS
    st = bits == 32 ? shampoo_packed_select_f32(compact, packed, table, call.nblocks, select, write, to_packed)
                    : shampoo_packed_select_f64(compact, packed, table, call.nblocks, select, write, to_packed);
    Py_END_ALLOW_THREADS
    return finish_call(&call, st);
}

static PyObject *factor_update_packed(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"factors_out", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_NONE,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_ALIAS_OK},
        {"factors_in", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_ALIAS_OK},
        {"grads", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, 0},
        TABLE_ARG,
        {"active", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_BLOCK, 0},
    };
    PyObject *o[5];
    double beta2;
    int num_threads;
    shampoo_call call = {0};
    if (!PyArg_ParseTuple(args, "OOOOOdi", &o[0], &o[1], &o[2], &o[3], &o[4], &beta2,
                          &num_threads))
        return NULL;
    if (shampoo_check_num_threads(fn, num_threads) < 0)
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 5, bits) < 0 ||
        check_packed(&call, 0, "factors_out", 3) < 0 ||
        check_packed(&call, 1, "factors_in", 3) < 0)
        return shampoo_call_failed(&call);
    const shampoo_module_state *ms = shampoo_get_state(m);
    void *out = shampoo_arg(&call, 0), *in = shampoo_arg(&call, 1), *grads = shampoo_arg(&call, 2);
    const int64_t *table = shampoo_arg(&call, 3);
    const uint8_t *active = shampoo_arg(&call, 4);
    shampoo_status st;
    Py_BEGIN_ALLOW_THREADS
    st = bits == 32
        ? shampoo_factor_update_packed_f32(&ms->la, out, in, grads, table, call.nblocks, active,
                                           beta2, num_threads)
        : shampoo_factor_update_packed_f64(&ms->la, out, in, grads, table, call.nblocks, active,
                                           beta2, num_threads);
    Py_END_ALLOW_THREADS
    return finish_call(&call, st);
}

static PyObject *packed_numel(PyObject *m, PyObject *args)
{
    PyObject *obj;
    shampoo_view v = {0};
    (void)m;
    if (!PyArg_ParseTuple(args, "O", &obj))
        return NULL;
    if (shampoo_view_table(&v, &shampoo_get_state(m)->dl, "packed_numel", "table", obj, 0) < 0)
        return NULL;
    const int64_t n = shampoo_packed_numel(v.data, v.rows);
    shampoo_view_release(&v);
    if (n < 0)
        return PyErr_Format(PyExc_ValueError, "packed_numel: argument 'table' is not a valid block table");
    return PyLong_FromLongLong((long long)n);
}

SHAMPOO_TWINS(sym_unpack)
SHAMPOO_TWINS(sym_pack)
SHAMPOO_TWINS(packed_commit)
SHAMPOO_TWINS(packed_select)
SHAMPOO_TWINS(factor_update_packed)

PyMethodDef shampoo_packed_methods[] = {
    SHAMPOO_TWIN_ENTRIES(sym_unpack, "packed symmetric -> full factor layout"),
    SHAMPOO_TWIN_ENTRIES(sym_pack, "full factor layout -> packed upper triangles"),
    SHAMPOO_TWIN_ENTRIES(packed_commit, "inverse-root commit, packed layout"),
    SHAMPOO_TWIN_ENTRIES(packed_select, "packed layout <-> compact selected factors"),
    SHAMPOO_TWIN_ENTRIES(factor_update_packed, "factor update, packed layout"),
    {"packed_numel", packed_numel, METH_VARARGS, "elements of a table's packed layout"},
    {NULL, NULL, 0, NULL}
};
