/* Entry points of the float kernels, one pair per op (name_f32 / name_f64): parse, borrow and
 * check every buffer against the block table (tensor_args.c), run the kernel without the GIL,
 * raise on a bad status. Part of the binding; the dtype picks the C twin here and nowhere else. */
#include "binding.h"

#include "../core/block_table.h"
#include "../core/elementwise.h"
#include "../core/factor_update.h"
#include "../core/matrix_root.h"
#include "../core/precondition.h"

#define TABLE_ARG {"table", SHAMPOO_ARG_TABLE, SHAMPOO_LAYOUT_NONE, 0}
#define ACTIVE_ARG {"active", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_BLOCK, 0}

static inline void *ptr(shampoo_call *call, int i)
{
    return shampoo_arg(call, i);
}

static inline int is_none(shampoo_call *call, int i)
{
    return call->views[i].data == NULL;
}

static PyObject *finish_call(shampoo_call *call, shampoo_status st, PyObject *ok)
{
    return shampoo_call_done(call, st, ok, shampoo_raise_status);
}

static PyObject *gather(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"grad_blocks", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OUT},
        {"param_blocks", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        {"grad_flat", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_PARAM, 0},
        {"param_flat", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_PARAM, SHAMPOO_ARG_OPTIONAL},
        TABLE_ARG,
        ACTIVE_ARG,
        {"sq_norms", SHAMPOO_ARG_DOUBLE, SHAMPOO_LAYOUT_PER_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
    };
    PyObject *o[7] = {0};
    double l2;
    shampoo_call call = {0};
    o[6] = Py_None;
    if (!PyArg_ParseTuple(args, "OOOOOOd|O", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &l2,
                          &o[6]))
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 7, bits) < 0)
        return shampoo_call_failed(&call);
    if (is_none(&call, 3) && (!is_none(&call, 1) || l2 != 0.0)) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'param_flat' is required when "
                     "param_blocks is given or l2_weight_decay != 0", fn);
        return shampoo_call_failed(&call);
    }
    int64_t first = -1;
    shampoo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (bits == 32)
        st = shampoo_gather_f32(ptr(&call, 0), ptr(&call, 1), ptr(&call, 2), ptr(&call, 3),
                                ptr(&call, 4), call.nblocks, ptr(&call, 5), l2, &first,
                                ptr(&call, 6));
    else
        st = shampoo_gather_f64(ptr(&call, 0), ptr(&call, 1), ptr(&call, 2), ptr(&call, 3),
                                ptr(&call, 4), call.nblocks, ptr(&call, 5), l2, &first,
                                ptr(&call, 6));
    Py_END_ALLOW_THREADS
    return finish_call(&call, st, PyLong_FromLongLong(first));
}

static PyObject *scatter(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"flat", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_PARAM, SHAMPOO_ARG_OUT},
        {"blocks", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, 0},
        TABLE_ARG,
        ACTIVE_ARG,
    };
    PyObject *o[4];
    shampoo_call call = {0};
    if (!PyArg_ParseTuple(args, "OOOO", &o[0], &o[1], &o[2], &o[3]))
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 4, bits) < 0)
        return shampoo_call_failed(&call);
    shampoo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (bits == 32)
        st = shampoo_scatter_f32(ptr(&call, 0), ptr(&call, 1), ptr(&call, 2), call.nblocks,
                                 ptr(&call, 3));
    else
        st = shampoo_scatter_f64(ptr(&call, 0), ptr(&call, 1), ptr(&call, 2), call.nblocks,
                                 ptr(&call, 3));
    Py_END_ALLOW_THREADS
    return finish_call(&call, st, Py_NewRef(Py_None));
}

static PyObject *factor_update(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"factors_out", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_ALIAS_OK},
        {"factors_in", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, SHAMPOO_ARG_ALIAS_OK},
        {"grads", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, 0},
        TABLE_ARG,
        ACTIVE_ARG,
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
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 5, bits) < 0)
        return shampoo_call_failed(&call);
    const shampoo_module_state *ms = shampoo_get_state(m);
    shampoo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (bits == 32)
        st = shampoo_factor_update_f32(&ms->la, ptr(&call, 0), ptr(&call, 1), ptr(&call, 2),
                                       ptr(&call, 3), call.nblocks, ptr(&call, 4), beta2,
                                       num_threads);
    else
        st = shampoo_factor_update_f64(&ms->la, ptr(&call, 0), ptr(&call, 1), ptr(&call, 2),
                                       ptr(&call, 3), call.nblocks, ptr(&call, 4), beta2,
                                       num_threads);
    Py_END_ALLOW_THREADS
    return finish_call(&call, st, Py_NewRef(Py_None));
}

static PyObject *precondition(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"out", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OUT},
        {"grads", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, 0},
        {"inv_roots", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, 0},
        TABLE_ARG,
        ACTIVE_ARG,
    };
    PyObject *o[5];
    int num_threads;
    shampoo_call call = {0};
    if (!PyArg_ParseTuple(args, "OOOOOi", &o[0], &o[1], &o[2], &o[3], &o[4], &num_threads))
        return NULL;
    if (shampoo_check_num_threads(fn, num_threads) < 0)
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 5, bits) < 0)
        return shampoo_call_failed(&call);
    const shampoo_module_state *ms = shampoo_get_state(m);
    shampoo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (bits == 32)
        st = shampoo_precondition_f32(&ms->la, ptr(&call, 0), ptr(&call, 1), ptr(&call, 2),
                                      ptr(&call, 3), call.nblocks, ptr(&call, 4), num_threads);
    else
        st = shampoo_precondition_f64(&ms->la, ptr(&call, 0), ptr(&call, 1), ptr(&call, 2),
                                      ptr(&call, 3), call.nblocks, ptr(&call, 4), num_threads);
    Py_END_ALLOW_THREADS
    return finish_call(&call, st, Py_NewRef(Py_None));
}

static PyObject *moments(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"grads", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OUT},
        {"grafting_state", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        {"filtered_grad", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        TABLE_ARG,
        ACTIVE_ARG,
    };
    PyObject *o[5];
    shampoo_moments_params p;
    shampoo_call call = {0};
    if (!PyArg_ParseTuple(args, "OOOOOpdddd", &o[0], &o[1], &o[2], &o[3], &o[4],
                          &p.update_grafting_state, &p.grafting_beta2, &p.beta1, &p.beta3,
                          &p.bias_correction1))
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 5, bits) < 0)
        return shampoo_call_failed(&call);
    if (p.update_grafting_state && is_none(&call, 1)) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'grafting_state' is required when "
                     "update_grafting_state is true", fn);
        return shampoo_call_failed(&call);
    }
    if ((p.beta1 != 0.0) != !is_none(&call, 2)) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'filtered_grad' must be given exactly "
                     "when beta1 != 0 (beta1 = %g)", fn, p.beta1);
        return shampoo_call_failed(&call);
    }
    shampoo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (bits == 32)
        st = shampoo_moments_f32(ptr(&call, 0), ptr(&call, 1), ptr(&call, 2), ptr(&call, 3),
                                 call.nblocks, ptr(&call, 4), &p);
    else
        st = shampoo_moments_f64(ptr(&call, 0), ptr(&call, 1), ptr(&call, 2), ptr(&call, 3),
                                 call.nblocks, ptr(&call, 4), &p);
    Py_END_ALLOW_THREADS
    return finish_call(&call, st, Py_NewRef(Py_None));
}

/* The finish parameters that need a companion buffer; names the first one missing. */
static int finish_args_ok(shampoo_call *call, const shampoo_finish_params *p)
{
    return shampoo_check_finish_args(call->fn, p, !is_none(call, 2), !is_none(call, 3),
                                     !is_none(call, 4), !is_none(call, 5));
}

static PyObject *finish(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        /* may be grads itself when the table writes the block layout (elementwise.h) */
        {"update_flat", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_PARAM,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_ALIAS_OK},
        {"grads", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_ALIAS_OK},
        {"shampoo_dir", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OPTIONAL},
        {"grafting_state", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OPTIONAL},
        {"param_blocks", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OPTIONAL},
        {"momentum_state", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        TABLE_ARG,
        ACTIVE_ARG,
    };
    PyObject *o[8];
    shampoo_finish_params p;
    int graft;
    shampoo_call call = {0};
    if (!PyArg_ParseTuple(args, "OOOOOOOOipdddddpd", &o[0], &o[1], &o[2], &o[3], &o[4],
                          &o[5], &o[6], &o[7], &graft, &p.grafting_phase,
                          &p.grafting_bias_correction, &p.grafting_epsilon,
                          &p.decoupled_weight_decay, &p.momentum, &p.dampening, &p.nesterov,
                          &p.lr))
        return NULL;
    p.graft = (shampoo_graft_kind)graft;
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 8, bits) < 0 ||
        finish_args_ok(&call, &p) < 0)
        return shampoo_call_failed(&call);
    shampoo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (bits == 32)
        st = shampoo_finish_f32(ptr(&call, 0), ptr(&call, 1), ptr(&call, 2), ptr(&call, 3),
                                ptr(&call, 4), ptr(&call, 5), ptr(&call, 6), call.nblocks,
                                ptr(&call, 7), &p);
    else
        st = shampoo_finish_f64(ptr(&call, 0), ptr(&call, 1), ptr(&call, 2), ptr(&call, 3),
                                ptr(&call, 4), ptr(&call, 5), ptr(&call, 6), call.nblocks,
                                ptr(&call, 7), &p);
    Py_END_ALLOW_THREADS
    return finish_call(&call, st, Py_NewRef(Py_None));
}

static PyObject *root_inverse(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"out", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, SHAMPOO_ARG_OUT},
        {"factors", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, 0},
        TABLE_ARG,
        ACTIVE_ARG,
        {"is_diagonal", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_FACTOR, SHAMPOO_ARG_OUT},
        {"status_out", SHAMPOO_ARG_INT32, SHAMPOO_LAYOUT_PER_FACTOR, SHAMPOO_ARG_OUT},
    };
    PyObject *o[6];
    shampoo_root_config cfg;
    int method;
    long long max_iterations, order;
    int num_threads;
    shampoo_call call = {0};
    if (!PyArg_ParseTuple(args, "OOOOOOidddppLddLi", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                          &method, &cfg.epsilon, &cfg.exponent_multiplier,
                          &cfg.bias_correction, &cfg.make_positive_semidefinite,
                          &cfg.retry_double_precision, &max_iterations, &cfg.tolerance,
                          &cfg.rel_epsilon, &order, &num_threads))
        return NULL;
    if (method != SHAMPOO_ROOT_EIGEN && method != SHAMPOO_ROOT_NEWTON &&
        method != SHAMPOO_ROOT_HIGHER_ORDER)
        return PyErr_Format(PyExc_ValueError, "%s: argument 'method' must be ROOT_EIGEN, "
                            "ROOT_NEWTON or ROOT_HIGHER_ORDER, got %d", fn, method);
    cfg.method = (shampoo_root_method)method;
    cfg.max_iterations = max_iterations;
    cfg.order = order;
    if (shampoo_check_root_config(fn, &cfg) < 0 || shampoo_check_num_threads(fn, num_threads) < 0)
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 6, bits) < 0)
        return shampoo_call_failed(&call);
    const shampoo_module_state *ms = shampoo_get_state(m);
    shampoo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (bits == 32)
        st = shampoo_root_inverse_f32(&ms->la, ptr(&call, 0), ptr(&call, 1), ptr(&call, 2),
                                      call.nblocks, ptr(&call, 3), &cfg, ptr(&call, 4),
                                      ptr(&call, 5), num_threads);
    else
        st = shampoo_root_inverse_f64(&ms->la, ptr(&call, 0), ptr(&call, 1), ptr(&call, 2),
                                      call.nblocks, ptr(&call, 3), &cfg, ptr(&call, 4),
                                      ptr(&call, 5), num_threads);
    Py_END_ALLOW_THREADS
    return finish_call(&call, st, Py_NewRef(Py_None));
}

SHAMPOO_TWINS(gather)
SHAMPOO_TWINS(scatter)
SHAMPOO_TWINS(factor_update)
SHAMPOO_TWINS(precondition)
SHAMPOO_TWINS(moments)
SHAMPOO_TWINS(finish)
SHAMPOO_TWINS(root_inverse)

PyMethodDef shampoo_kernel_methods[] = {
    SHAMPOO_TWIN_ENTRIES(gather, "gather (elementwise.h)"),
    SHAMPOO_TWIN_ENTRIES(scatter, "scatter (elementwise.h)"),
    SHAMPOO_TWIN_ENTRIES(factor_update, "factor update"),
    SHAMPOO_TWIN_ENTRIES(precondition, "preconditioning"),
    SHAMPOO_TWIN_ENTRIES(moments, "moments (elementwise.h)"),
    SHAMPOO_TWIN_ENTRIES(finish, "finish (elementwise.h)"),
    SHAMPOO_TWIN_ENTRIES(root_inverse, "inverse roots"),
    {NULL, NULL, 0, NULL}
};
