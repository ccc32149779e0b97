/* The Python module distributed_shampoo._C: module state, constants, import-time set-up and
 * the integer planning functions (merging, blocking, table checks). The float kernels' entry
 * points live in kernel_ops.c; tensors are borrowed through DLPack in tensor_args.c. */
#include "binding.h"

#include "../core/batch_plan.h"
#include "../core/block_table.h"
#include "../core/blocking.h"
#include "../core/elementwise.h"
#include "../core/matrix_root.h"
#include "../core/parallel.h"
#include "../core/soap.h"

/* A sequence of non-negative ints into a new int64 array of max(len, 1) entries. */
static int64_t *parse_shape(PyObject *seq, const char *fn, int64_t *ndim)
{
    Py_ssize_t n = PySequence_Check(seq) ? PySequence_Size(seq) : -1;
    if (n < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: argument 'shape' must be a sequence of ints", fn);
        return NULL;
    }
    int64_t *shape = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    if (shape == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_GetItem(seq, i);
        PyObject *index = item != NULL ? PyNumber_Index(item) : NULL;
        long long v = index != NULL ? PyLong_AsLongLong(index) : -1;
        Py_XDECREF(item);
        Py_XDECREF(index);
        if (v < 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s: argument 'shape' must hold non-negative ints; "
                         "entry %zd is not", fn, i);
            PyMem_Free(shape);
            return NULL;
        }
        shape[i] = (int64_t)v;
    }
    *ndim = (int64_t)n;
    return shape;
}

static PyObject *merge_small_dims(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *seq, *result = NULL;
    long long threshold;
    int64_t ndim = 0, out_ndim = 0;
    if (!PyArg_ParseTuple(args, "OL:merge_small_dims", &seq, &threshold))
        return NULL;
    if (threshold < 1)
        return PyErr_Format(PyExc_ValueError, "merge_small_dims: argument 'threshold' must be "
                            ">= 1, got %lld", threshold);
    int64_t *shape = parse_shape(seq, "merge_small_dims", &ndim);
    int64_t *out = shape != NULL ? PyMem_Malloc((size_t)(ndim > 0 ? ndim : 1) * 8) : NULL;
    if (shape == NULL)
        return NULL;
    if (out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    shampoo_status st = shampoo_merge_small_dims(shape, ndim, threshold, out, &out_ndim);
    if (st != SHAMPOO_OK) {
        shampoo_raise_status("merge_small_dims", st);
        goto done;
    }
    result = PyTuple_New((Py_ssize_t)out_ndim);
    for (int64_t i = 0; result != NULL && i < out_ndim; i++) {
        PyObject *v = PyLong_FromLongLong(out[i]);
        if (v == NULL || PyTuple_SetItem(result, (Py_ssize_t)i, v) < 0)
            Py_CLEAR(result);
    }
done:
    PyMem_Free(shape);
    PyMem_Free(out);
    return result;
}

/* shape argument of the blocking functions: at most SHAMPOO_MAX_ORDER dims, max_dim >= 1. */
static int64_t *parse_block_shape(PyObject *seq, long long max_dim, const char *fn,
                                  int64_t *ndim)
{
    if (max_dim < 1) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'max_dim' must be >= 1, got %lld", fn,
                     max_dim);
        return NULL;
    }
    int64_t *shape = parse_shape(seq, fn, ndim);
    if (shape != NULL && *ndim > SHAMPOO_MAX_ORDER) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'shape' has %lld dims; at most %d are "
                     "supported", fn, (long long)*ndim, SHAMPOO_MAX_ORDER);
        PyMem_Free(shape);
        return NULL;
    }
    return shape;
}

static PyObject *block_count(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *seq;
    long long max_dim;
    int64_t ndim = 0, count = 0;
    if (!PyArg_ParseTuple(args, "OL:block_count", &seq, &max_dim))
        return NULL;
    int64_t *shape = parse_block_shape(seq, max_dim, "block_count", &ndim);
    if (shape == NULL)
        return NULL;
    shampoo_status st = shampoo_block_count(shape, ndim, max_dim, &count);
    PyMem_Free(shape);
    if (st != SHAMPOO_OK)
        return shampoo_raise_status("block_count", st);
    return PyLong_FromLongLong(count);
}

static PyObject *block_plan(PyObject *module, PyObject *args)
{
    PyObject *seq, *obj, *result = NULL;
    long long max_dim;
    int64_t ndim = 0, count = 0;
    shampoo_view table = {0};
    if (!PyArg_ParseTuple(args, "OLO:block_plan", &seq, &max_dim, &obj))
        return NULL;
    int64_t *shape = parse_block_shape(seq, max_dim, "block_plan", &ndim);
    if (shape == NULL)
        return NULL;
    shampoo_status st = shampoo_block_count(shape, ndim, max_dim, &count);
    if (st != SHAMPOO_OK) {
        shampoo_raise_status("block_plan", st);
        goto done;
    }
    if (shampoo_view_table(&table, &shampoo_get_state(module)->dl, "block_plan", "table", obj, 1) < 0)
        goto done;
    if (table.rows != count) {
        PyErr_Format(PyExc_ValueError, "block_plan: argument 'table' has %lld rows; the plan "
                     "has %lld blocks", (long long)table.rows, (long long)count);
        goto done;
    }
    st = shampoo_block_plan(shape, ndim, max_dim, table.data, count);
    if (st != SHAMPOO_OK) {
        shampoo_raise_status("block_plan", st);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    shampoo_view_release(&table);
    PyMem_Free(shape);
    return result;
}

static PyObject *table_validate(PyObject *module, PyObject *args)
{
    PyObject *obj, *result = NULL;
    long long block_numel, factor_numel, factor_count, param_numel;
    shampoo_view table = {0};
    if (!PyArg_ParseTuple(args, "OLLLL:table_validate", &obj, &block_numel, &factor_numel,
                          &factor_count, &param_numel))
        return NULL;
    if (shampoo_view_table(&table, &shampoo_get_state(module)->dl, "table_validate", "table", obj, 0) < 0)
        goto done;
    if (shampoo_table_validate(table.data, table.rows, block_numel, factor_numel,
                               factor_count, param_numel) != SHAMPOO_OK) {
        PyErr_SetString(PyExc_ValueError, "table_validate: argument 'table' is malformed or "
                        "addresses elements beyond the given buffer sizes");
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    shampoo_view_release(&table);
    return result;
}

/* batch_plan(table) -> bytes: the batch plan (batch_plan.h) as native int64s, for Python
 * to wrap without a copy (numpy.frombuffer) and send to the GPU once. */
static PyObject *batch_plan(PyObject *module, PyObject *args)
{
    PyObject *obj, *result = NULL;
    shampoo_view table = {0};
    if (!PyArg_ParseTuple(args, "O:batch_plan", &obj))
        return NULL;
    if (shampoo_view_table(&table, &shampoo_get_state(module)->dl, "batch_plan", "table", obj,
                           0) < 0)
        goto done;
    if (shampoo_table_validate(table.data, table.rows, -1, -1, -1, -1) != SHAMPOO_OK) {
        PyErr_SetString(PyExc_ValueError, "batch_plan: argument 'table' is malformed");
        goto done;
    }
    int64_t length = shampoo_batch_plan_length(table.data, table.rows);
    if (length < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(length * (int64_t)sizeof(int64_t)));
    if (result == NULL)
        goto done;
    shampoo_status st = shampoo_batch_plan_build(table.data, table.rows,
                                                 (int64_t *)PyBytes_AsString(result), length);
    if (st != SHAMPOO_OK) {
        Py_CLEAR(result);
        shampoo_raise_status("batch_plan", st);
    }
done:
    shampoo_view_release(&table);
    return result;
}

static PyMethodDef shampoo_methods[] = {
    {"batch_plan", batch_plan, METH_VARARGS,
     "batch_plan(table) -> bytes: the table's blocks grouped by shape (int64s, batch_plan.h)"},
    {"merge_small_dims", merge_small_dims, METH_VARARGS,
     "merge_small_dims(shape, threshold) -> tuple: SPEC B §2.1"},
    {"block_count", block_count, METH_VARARGS,
     "block_count(shape, max_dim) -> int: number of blocks of SPEC B §2.2"},
    {"block_plan", block_plan, METH_VARARGS,
     "block_plan(shape, max_dim, table) -> None: fills an int64 (count, BF_COUNT) table"},
    {"table_validate", table_validate, METH_VARARGS,
     "table_validate(table, block_numel, factor_numel, factor_count, param_numel) -> None"},
    {NULL, NULL, 0, NULL}
};

static int add_constants(PyObject *m)
{
    static const struct {
        const char *name;
        long value;
    } constants[] = {
        {"BF_ORDER", SHAMPOO_BF_ORDER}, {"BF_NUMEL", SHAMPOO_BF_NUMEL},
        {"BF_BLOCK_OFFSET", SHAMPOO_BF_BLOCK_OFFSET},
        {"BF_FACTOR_OFFSET", SHAMPOO_BF_FACTOR_OFFSET},
        {"BF_FACTOR_INDEX", SHAMPOO_BF_FACTOR_INDEX},
        {"BF_PARAM_OFFSET", SHAMPOO_BF_PARAM_OFFSET}, {"BF_ROOT", SHAMPOO_BF_ROOT},
        {"BF_DIMS", SHAMPOO_BF_DIMS}, {"BF_STRIDES", SHAMPOO_BF_STRIDES},
        {"BF_COUNT", SHAMPOO_BF_COUNT}, {"MAX_ORDER", SHAMPOO_MAX_ORDER},
        {"PLAN_HEADER", SHAMPOO_PLAN_HEADER},
        {"PLAN_GROUP_FIELDS", SHAMPOO_PLAN_GROUP_FIELDS}, {"PG_ORDER", SHAMPOO_PG_ORDER},
        {"PG_COUNT", SHAMPOO_PG_COUNT}, {"PG_FIRST", SHAMPOO_PG_FIRST},
        {"PG_NUMEL", SHAMPOO_PG_NUMEL}, {"PG_DIMS", SHAMPOO_PG_DIMS},
        {"ROOT_OK", SHAMPOO_ROOT_OK}, {"ROOT_INACTIVE", SHAMPOO_ROOT_INACTIVE},
        {"ROOT_FACTOR_NAN", SHAMPOO_ROOT_FACTOR_NAN},
        {"ROOT_FACTOR_INF", SHAMPOO_ROOT_FACTOR_INF}, {"ROOT_FAILED", SHAMPOO_ROOT_FAILED},
        {"ROOT_NONFINITE", SHAMPOO_ROOT_NONFINITE},
        {"ROOT_MAX_ITERS", SHAMPOO_ROOT_MAX_ITERS},
        {"ROOT_RETRIED_DOUBLE", SHAMPOO_ROOT_RETRIED_DOUBLE},
        {"ROOT_EIGEN", SHAMPOO_ROOT_EIGEN}, {"ROOT_NEWTON", SHAMPOO_ROOT_NEWTON},
        {"ROOT_HIGHER_ORDER", SHAMPOO_ROOT_HIGHER_ORDER},
        {"GRAFT_NONE", SHAMPOO_GRAFT_NONE}, {"GRAFT_SGD", SHAMPOO_GRAFT_SGD},
        {"GRAFT_DIAGONAL", SHAMPOO_GRAFT_DIAGONAL},
        {"PARALLEL_MIN_COST", SHAMPOO_PARALLEL_MIN_COST},
        {"PARALLEL_MAX_THREADS", SHAMPOO_PARALLEL_MAX_THREADS},
        {"ROOT_MAX_ITERATIONS", SHAMPOO_ROOT_MAX_ITERATIONS},
        {"ROOT_MAX_TAYLOR_ORDER", SHAMPOO_ROOT_MAX_TAYLOR_ORDER},
        {"EIGENBASIS_EIGH", SHAMPOO_EIGENBASIS_EIGH}, {"EIGENBASIS_QR", SHAMPOO_EIGENBASIS_QR},
    };
    for (size_t i = 0; i < sizeof(constants) / sizeof(constants[0]); i++)
        if (PyModule_AddIntConstant(m, constants[i].name, constants[i].value) < 0)
            return -1;
    return 0;
}

static int shampoo_exec(PyObject *m)
{
    shampoo_module_state *st = shampoo_get_state(m);
    if (add_constants(m) < 0 || PyModule_AddFunctions(m, shampoo_kernel_methods) < 0 ||
        PyModule_AddFunctions(m, shampoo_packed_methods) < 0 ||
        PyModule_AddFunctions(m, shampoo_param_io_methods) < 0 ||
        PyModule_AddFunctions(m, shampoo_soap_methods) < 0 ||
        shampoo_linalg_load(st) < 0)
        return -1;
    return shampoo_dlpack_state_init(&st->dl, 1 /* CPU */);
}

static int shampoo_traverse(PyObject *m, visitproc visit, void *arg)
{
    shampoo_module_state *st = shampoo_get_state(m);
    if (st == NULL)
        return 0;
    Py_VISIT(st->blas_capi);
    Py_VISIT(st->lapack_capi);
    return shampoo_dlpack_state_traverse(&st->dl, visit, arg);
}

static int shampoo_clear(PyObject *m)
{
    shampoo_module_state *st = shampoo_get_state(m);
    if (st == NULL)
        return 0;
    Py_CLEAR(st->blas_capi);
    Py_CLEAR(st->lapack_capi);
    shampoo_dlpack_state_clear(&st->dl);
    return 0;
}

static void shampoo_free(void *m)
{
    shampoo_clear((PyObject *)m);
}

static PyModuleDef_Slot shampoo_slots[] = {
    {Py_mod_exec, shampoo_exec},
    {0, NULL}
};

static struct PyModuleDef shampoo_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "distributed_shampoo._C",
    .m_doc = "C kernels of distributed_shampoo (CPU). Called only by distributed_shampoo._backend.",
    .m_size = sizeof(shampoo_module_state),
    .m_methods = shampoo_methods,
    .m_slots = shampoo_slots,
    .m_traverse = shampoo_traverse,
    .m_clear = shampoo_clear,
    .m_free = shampoo_free,
};

PyMODINIT_FUNC PyInit__C(void)
{
    return PyModuleDef_Init(&shampoo_module);
}
