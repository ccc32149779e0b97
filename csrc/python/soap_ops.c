/* Entry points of the eigenvalue-corrected Shampoo kernels (core/soap.h), one pair per op
 * (name_f32 / name_f64): parse, borrow and check every buffer against the block table
 * (tensor_args.c), run without the GIL, raise on a bad status. Part of the binding. */
#include "binding.h"

#include "../core/block_table.h"
#include "../core/soap.h"

#define TABLE_ARG {"table", SHAMPOO_ARG_TABLE, SHAMPOO_LAYOUT_NONE, 0}
#define ACTIVE_ARG {"active", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_BLOCK, 0}

static PyObject *done(shampoo_call *call, shampoo_status st)
{
    return shampoo_call_done(call, st, Py_NewRef(Py_None), shampoo_raise_status);
}

static PyObject *soap_direction(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"out", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        {"grads", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OPTIONAL | SHAMPOO_ARG_ALIAS_OK},
        {"moment_grads", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OPTIONAL | SHAMPOO_ARG_ALIAS_OK},
        {"bases", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, 0},
        {"corrected", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OUT},
        TABLE_ARG,
        ACTIVE_ARG,
    };
    PyObject *o[7];
    shampoo_soap_params p;
    int num_threads;
    shampoo_call call = {0};
    if (!PyArg_ParseTuple(args, "OOOOOOOdddi", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                          &p.beta2, &p.bias_correction, &p.epsilon, &num_threads))
        return NULL;
    if (shampoo_check_num_threads(fn, num_threads) < 0)
        return NULL;
    if (!(p.beta2 >= 0.0 && p.beta2 <= 1.0))
        return PyErr_Format(PyExc_ValueError, "%s: argument 'beta2' must be in [0, 1], got %g", fn, p.beta2);
    if (!(p.bias_correction > 0.0 && p.bias_correction < INFINITY))
        return PyErr_Format(PyExc_ValueError, "%s: argument 'bias_correction' must be finite and "
                            "> 0, got %g", fn, p.bias_correction);
    if (!(p.epsilon >= 0.0))
        return PyErr_Format(PyExc_ValueError, "%s: argument 'epsilon' must be >= 0, got %g", fn, p.epsilon);
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 7, bits) < 0)
        return shampoo_call_failed(&call);
    void *out = shampoo_arg(&call, 0), *grads = shampoo_arg(&call, 1), *mg = shampoo_arg(&call, 2);
    if (out == NULL && mg == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: at least one of 'out' and 'moment_grads' is required", fn);
        return shampoo_call_failed(&call);
    }
    if (out != NULL && grads == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'grads' is required with 'out'", fn);
        return shampoo_call_failed(&call);
    }
    const shampoo_module_state *ms = shampoo_get_state(m);
    shampoo_status st;
    Py_BEGIN_ALLOW_THREADS
    st = bits == 32
        ? shampoo_soap_direction_f32(&ms->la, out, grads, mg, shampoo_arg(&call, 3),
                                     shampoo_arg(&call, 4), shampoo_arg(&call, 5), call.nblocks,
                                     shampoo_arg(&call, 6), &p, num_threads)
        : shampoo_soap_direction_f64(&ms->la, out, grads, mg, shampoo_arg(&call, 3),
                                     shampoo_arg(&call, 4), shampoo_arg(&call, 5), call.nblocks,
                                     shampoo_arg(&call, 6), &p, num_threads);
    Py_END_ALLOW_THREADS
    return done(&call, st);
}

static PyObject *eigenbasis(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"out", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, SHAMPOO_ARG_OUT},
        {"factors", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, 0},
        {"previous", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, SHAMPOO_ARG_OPTIONAL},
        TABLE_ARG,
        ACTIVE_ARG,
        {"is_diagonal", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_FACTOR, SHAMPOO_ARG_OUT},
        {"status_out", SHAMPOO_ARG_INT32, SHAMPOO_LAYOUT_PER_FACTOR, SHAMPOO_ARG_OUT},
    };
    PyObject *o[7];
    shampoo_eigenbasis_config cfg;
    int method, num_threads;
    long long max_iterations;
    shampoo_call call = {0};
    if (!PyArg_ParseTuple(args, "OOOOOOOipLdi", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                          &method, &cfg.retry_double_precision, &max_iterations, &cfg.tolerance,
                          &num_threads))
        return NULL;
    if (shampoo_check_num_threads(fn, num_threads) < 0)
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
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 7, bits) < 0)
        return shampoo_call_failed(&call);
    if (method == SHAMPOO_EIGENBASIS_QR && shampoo_arg(&call, 2) == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'previous' is required for EIGENBASIS_QR", fn);
        return shampoo_call_failed(&call);
    }
    const shampoo_module_state *ms = shampoo_get_state(m);
    shampoo_status st;
    Py_BEGIN_ALLOW_THREADS
    st = bits == 32
        ? shampoo_eigenbasis_f32(&ms->la, shampoo_arg(&call, 0), shampoo_arg(&call, 1),
                                 shampoo_arg(&call, 2), shampoo_arg(&call, 3), call.nblocks,
                                 shampoo_arg(&call, 4), &cfg, shampoo_arg(&call, 5),
                                 shampoo_arg(&call, 6), num_threads)
        : shampoo_eigenbasis_f64(&ms->la, shampoo_arg(&call, 0), shampoo_arg(&call, 1),
                                 shampoo_arg(&call, 2), shampoo_arg(&call, 3), call.nblocks,
                                 shampoo_arg(&call, 4), &cfg, shampoo_arg(&call, 5),
                                 shampoo_arg(&call, 6), num_threads);
    Py_END_ALLOW_THREADS
    return done(&call, st);
}

SHAMPOO_TWINS(soap_direction)
SHAMPOO_TWINS(eigenbasis)

PyMethodDef shampoo_soap_methods[] = {
    SHAMPOO_TWIN_ENTRIES(soap_direction, "eigenvalue-corrected Shampoo: second moment, direction"),
    SHAMPOO_TWIN_ENTRIES(eigenbasis, "eigenbases of the factors"),
    {NULL, NULL, 0, NULL}
};
