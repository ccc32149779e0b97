/* Entry points of the CUDA eigenvalue-corrected Shampoo kernels (cuda/soap_cuda.h), one pair
 * per op (name_f32 / name_f64), as soap_ops.c for the CPU and with its argument checks:
 * borrow and check every buffer (device buffers on one GPU; the table and batch plan also in
 * host memory), enqueue on the caller's stream, raise on a bad status. Part of the binding. */
#include "cuda_binding.h"

#include "../core/batch_plan.h"
#include "../core/block_table.h"
#include "../cuda/soap_cuda.h"

static PyObject *soap_direction(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        SHAMPOO_CUDA_WORKSPACE_ARGS,
        {"out", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        {"grads", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OPTIONAL | SHAMPOO_ARG_ALIAS_OK},
        {"moment_grads", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OPTIONAL | SHAMPOO_ARG_ALIAS_OK},
        {"bases", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, 0},
        {"corrected", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OUT},
        SHAMPOO_CUDA_TABLE_ARGS,
        SHAMPOO_CUDA_PLAN_ARGS,
        SHAMPOO_CUDA_ACTIVE_ARG,
    };
    PyObject *o[12];
    unsigned long long stream;
    shampoo_soap_params p;
    shampoo_call call = {0};
    shampoo_cuda_env env;
    shampoo_cuda_scope scope = {0};
    if (!PyArg_ParseTuple(args, "KOOOOOOOOOOOOddd", &stream, &o[0], &o[1], &o[2], &o[3], &o[4],
                          &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &o[11], &p.beta2,
                          &p.bias_correction, &p.epsilon))
        return NULL;
    if (!(p.beta2 >= 0.0 && p.beta2 <= 1.0))
        return PyErr_Format(PyExc_ValueError, "%s: argument 'beta2' must be in [0, 1], got %g", fn, p.beta2);
    if (!(p.bias_correction > 0.0 && p.bias_correction < INFINITY))
        return PyErr_Format(PyExc_ValueError, "%s: argument 'bias_correction' must be finite and "
                            "> 0, got %g", fn, p.bias_correction);
    if (!(p.epsilon >= 0.0))
        return PyErr_Format(PyExc_ValueError, "%s: argument 'epsilon' must be >= 0, got %g", fn, p.epsilon);
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, fn, specs, o, 12, bits) < 0 ||
        shampoo_cuda_check_plan(&call, 9, 10, 8) < 0)
        return shampoo_cuda_failed(m, &scope, &call);
    void *out = shampoo_arg(&call, 2), *grads = shampoo_arg(&call, 3), *mg = shampoo_arg(&call, 4);
    if (out == NULL && mg == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: at least one of 'out' and 'moment_grads' is required", fn);
        return shampoo_cuda_failed(m, &scope, &call);
    }
    if (out != NULL && grads == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'grads' is required with 'out'", fn);
        return shampoo_cuda_failed(m, &scope, &call);
    }
    if (shampoo_cuda_env_for(m, &call, stream, &call.views[0], &call.views[1], 1, &env, &scope) < 0)
        return shampoo_cuda_failed(m, &scope, &call);
    shampoo_status st = bits == 32
        ? shampoo_cuda_soap_direction_f32(&env, out, grads, mg, shampoo_arg(&call, 5),
                                          shampoo_arg(&call, 6), shampoo_arg(&call, 7),
                                          shampoo_arg(&call, 8), call.nblocks,
                                          shampoo_arg(&call, 9), shampoo_arg(&call, 10),
                                          shampoo_arg(&call, 11), &p)
        : shampoo_cuda_soap_direction_f64(&env, out, grads, mg, shampoo_arg(&call, 5),
                                          shampoo_arg(&call, 6), shampoo_arg(&call, 7),
                                          shampoo_arg(&call, 8), call.nblocks,
                                          shampoo_arg(&call, 9), shampoo_arg(&call, 10),
                                          shampoo_arg(&call, 11), &p);
    return shampoo_cuda_done(m, &scope, &call, st, Py_NewRef(Py_None));
}

static PyObject *eigenbasis(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        SHAMPOO_CUDA_WORKSPACE_ARGS,
        {"out", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, SHAMPOO_ARG_OUT},
        {"factors", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, 0},
        {"previous", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, SHAMPOO_ARG_OPTIONAL},
        SHAMPOO_CUDA_TABLE_ARGS,
        SHAMPOO_CUDA_ACTIVE_ARG,
        {"is_diagonal", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_FACTOR, SHAMPOO_ARG_OUT},
        {"status_out", SHAMPOO_ARG_INT32, SHAMPOO_LAYOUT_PER_FACTOR,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_HOST},
    };
    PyObject *o[10];
    unsigned long long stream;
    int method;
    long long max_iterations;
    shampoo_eigenbasis_config cfg;
    shampoo_call call = {0};
    shampoo_cuda_env env;
    shampoo_cuda_scope scope = {0};
    if (!PyArg_ParseTuple(args, "KOOOOOOOOOOipLd", &stream, &o[0], &o[1], &o[2], &o[3], &o[4],
                          &o[5], &o[6], &o[7], &o[8], &o[9], &method, &cfg.retry_double_precision,
                          &max_iterations, &cfg.tolerance))
        return NULL;
    if (method != SHAMPOO_EIGENBASIS_EIGH && method != SHAMPOO_EIGENBASIS_QR)
        return PyErr_Format(PyExc_ValueError, "%s: argument 'method' must be EIGENBASIS_EIGH or "
                            "EIGENBASIS_QR, got %d", fn, method);
    if (max_iterations < 0 || max_iterations > 1000)
        return PyErr_Format(PyExc_ValueError, "%s: argument 'max_iterations' must be in "
                            "[0, 1000], got %lld", fn, max_iterations);
    if (!(cfg.tolerance >= 0.0))
        return PyErr_Format(PyExc_ValueError, "%s: argument 'tolerance' must be >= 0, got %g", fn,
                            cfg.tolerance);
    cfg.method = (shampoo_eigenbasis_method)method;
    cfg.max_iterations = (int64_t)max_iterations;
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, fn, specs, o, 10, bits) < 0)
        return shampoo_cuda_failed(m, &scope, &call);
    if (method == SHAMPOO_EIGENBASIS_QR && shampoo_arg(&call, 4) == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'previous' is required for EIGENBASIS_QR", fn);
        return shampoo_cuda_failed(m, &scope, &call);
    }
    if (shampoo_cuda_env_for(m, &call, stream, &call.views[0], &call.views[1], 1, &env, &scope) < 0)
        return shampoo_cuda_failed(m, &scope, &call);
    shampoo_status st;
    Py_BEGIN_ALLOW_THREADS /* it waits for the device */
    st = bits == 32
        ? shampoo_cuda_eigenbasis_f32(&env, shampoo_arg(&call, 2), shampoo_arg(&call, 3),
                                      shampoo_arg(&call, 4), shampoo_arg(&call, 5),
                                      shampoo_arg(&call, 6), call.nblocks, shampoo_arg(&call, 7),
                                      &cfg, shampoo_arg(&call, 8), shampoo_arg(&call, 9))
        : shampoo_cuda_eigenbasis_f64(&env, shampoo_arg(&call, 2), shampoo_arg(&call, 3),
                                      shampoo_arg(&call, 4), shampoo_arg(&call, 5),
                                      shampoo_arg(&call, 6), call.nblocks, shampoo_arg(&call, 7),
                                      &cfg, shampoo_arg(&call, 8), shampoo_arg(&call, 9));
    Py_END_ALLOW_THREADS
    return shampoo_cuda_done(m, &scope, &call, st, Py_NewRef(Py_None));
}

/* eigenbasis_workspace_bytes(stream, device, table_host, bits, method) -> int: scratch bytes
 * of one eigenbasis call (asks cuSOLVER for buffer sizes, on that device and stream). */
static PyObject *eigenbasis_workspace_bytes(PyObject *m, PyObject *args)
{
    static const shampoo_arg_spec specs[] = {
        {"table_host", SHAMPOO_ARG_TABLE, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_HOST},
    };
    PyObject *o[1];
    unsigned long long stream;
    int device, bits, method;
    shampoo_call call = {0};
    shampoo_cuda_env env;
    shampoo_cuda_scope scope = {0};
    if (!PyArg_ParseTuple(args, "KiOii:eigenbasis_workspace_bytes", &stream, &device, &o[0],
                          &bits, &method))
        return NULL;
    if (bits != 32 && bits != 64)
        return PyErr_Format(PyExc_ValueError, "eigenbasis_workspace_bytes: bits must be 32 or 64");
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, "eigenbasis_workspace_bytes",
                          specs, o, 1, bits) < 0)
        return shampoo_cuda_failed(m, &scope, &call);
    call.device_id = device;
    if (shampoo_cuda_env_for(m, &call, stream, NULL, NULL, 1, &env, &scope) < 0)
        return shampoo_cuda_failed(m, &scope, &call);
    size_t bytes = 0;
    const shampoo_status st = shampoo_cuda_eigenbasis_workspace(
        &env, shampoo_arg(&call, 0), call.nblocks, bits / 8, method, &bytes);
    return shampoo_cuda_done(m, &scope, &call, st, PyLong_FromSize_t(bytes));
}

/* soap_workspace_bytes(table_host, plan_host, bits) -> int: scratch bytes of one
 * soap_direction call (no device work). */
static PyObject *soap_workspace_bytes(PyObject *m, PyObject *args)
{
    static const shampoo_arg_spec specs[] = {
        {"table_host", SHAMPOO_ARG_TABLE, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_HOST},
        {"plan_host", SHAMPOO_ARG_INT64, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_HOST},
    };
    PyObject *o[2];
    int bits;
    shampoo_call call = {0};
    if (!PyArg_ParseTuple(args, "OOi:soap_workspace_bytes", &o[0], &o[1], &bits))
        return NULL;
    if (bits != 32 && bits != 64)
        return PyErr_Format(PyExc_ValueError, "soap_workspace_bytes: bits must be 32 or 64");
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, "soap_workspace_bytes", specs,
                          o, 2, bits) < 0)
        return shampoo_call_failed(&call);
    const int64_t *table = shampoo_arg(&call, 0), *plan = shampoo_arg(&call, 1);
    if (shampoo_batch_plan_check(plan, call.views[1].numel, table, call.nblocks) != SHAMPOO_OK) {
        PyErr_SetString(PyExc_ValueError, "soap_workspace_bytes: argument 'plan_host' is not "
                        "the batch plan of the table");
        return shampoo_call_failed(&call);
    }
    const size_t bytes = shampoo_cuda_soap_direction_workspace(table, call.nblocks, plan, bits / 8);
    return shampoo_call_done(&call, SHAMPOO_OK, PyLong_FromSize_t(bytes), shampoo_cuda_raise_status);
}

SHAMPOO_TWINS(soap_direction)
SHAMPOO_TWINS(eigenbasis)

PyMethodDef shampoo_cuda_soap_methods[] = {
    SHAMPOO_TWIN_ENTRIES(soap_direction, "eigenvalue-corrected Shampoo: second moment, direction (CUDA)"),
    SHAMPOO_TWIN_ENTRIES(eigenbasis, "eigenbases of the factors (CUDA)"),
    {"eigenbasis_workspace_bytes", eigenbasis_workspace_bytes, METH_VARARGS,
     "eigenbasis_workspace_bytes(stream, device, table_host, bits, method) -> int"},
    {"soap_workspace_bytes", soap_workspace_bytes, METH_VARARGS,
     "soap_workspace_bytes(table_host, plan_host, bits) -> int"},
    {NULL, NULL, 0, NULL}
};
