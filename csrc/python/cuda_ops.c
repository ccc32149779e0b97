/* Entry points of the CUDA kernels, one pair per op (name_f32 / name_f64), as kernel_ops.c
 * for the CPU: borrow and check every buffer (device buffers on one GPU; the block table and
 * batch plan also in host memory, where the sizes are checked), enqueue on the stream the
 * caller passes (torch's current stream), raise on a bad status. Part of the binding. */
#include "cuda_binding.h"

#include "../core/batch_plan.h"
#include "../core/block_table.h"

static inline void *ptr(shampoo_call *call, int i)
{
    return shampoo_arg(call, i);
}

static PyObject *gather(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"grad_blocks", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OUT},
        {"param_blocks", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        {"grad_flat", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_PARAM, 0},
        {"param_flat", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_PARAM, SHAMPOO_ARG_OPTIONAL},
        SHAMPOO_CUDA_TABLE_ARGS,
        SHAMPOO_CUDA_ACTIVE_ARG,
        SHAMPOO_CUDA_FAIL_ARG(SHAMPOO_ARG_OUT),
        {"sq_norms", SHAMPOO_ARG_DOUBLE, SHAMPOO_LAYOUT_PER_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
    };
    PyObject *o[9] = {0};
    unsigned long long stream;
    double l2;
    long long step;
    shampoo_call call = {0};
    shampoo_cuda_env env;
    shampoo_cuda_scope scope = {0};
    o[8] = Py_None;
    if (!PyArg_ParseTuple(args, "KOOOOOOOOdL|O", &stream, &o[0], &o[1], &o[2], &o[3], &o[4],
                          &o[5], &o[6], &o[7], &l2, &step, &o[8]))
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, fn, specs, o, 9, bits) < 0 ||
        shampoo_cuda_check_fail(&call, 7) < 0 ||
        shampoo_cuda_env_for(m, &call, stream, NULL, NULL, 0, &env, &scope) < 0)
        return shampoo_cuda_failed(m, &scope, &call);
    if (ptr(&call, 3) == NULL && (ptr(&call, 1) != NULL || l2 != 0.0)) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'param_flat' is required when "
                     "param_blocks is given or l2_weight_decay != 0", fn);
        return shampoo_cuda_failed(m, &scope, &call);
    }
    shampoo_status st = bits == 32
        ? shampoo_cuda_gather_f32(&env, ptr(&call, 0), ptr(&call, 1), ptr(&call, 2),
                                  ptr(&call, 3), ptr(&call, 4), ptr(&call, 5), call.nblocks,
                                  ptr(&call, 6), l2, step, ptr(&call, 7), ptr(&call, 8))
        : shampoo_cuda_gather_f64(&env, ptr(&call, 0), ptr(&call, 1), ptr(&call, 2),
                                  ptr(&call, 3), ptr(&call, 4), ptr(&call, 5), call.nblocks,
                                  ptr(&call, 6), l2, step, ptr(&call, 7), ptr(&call, 8));
    return shampoo_cuda_done(m, &scope, &call, st, Py_NewRef(Py_None));
}

static PyObject *scatter(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"flat", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_PARAM, SHAMPOO_ARG_OUT},
        {"blocks", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, 0},
        SHAMPOO_CUDA_TABLE_ARGS,
        SHAMPOO_CUDA_ACTIVE_ARG,
    };
    PyObject *o[5];
    unsigned long long stream;
    shampoo_call call = {0};
    shampoo_cuda_env env;
    shampoo_cuda_scope scope = {0};
    if (!PyArg_ParseTuple(args, "KOOOOO", &stream, &o[0], &o[1], &o[2], &o[3], &o[4]))
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, fn, specs, o, 5, bits) < 0 ||
        shampoo_cuda_env_for(m, &call, stream, NULL, NULL, 0, &env, &scope) < 0)
        return shampoo_cuda_failed(m, &scope, &call);
    shampoo_status st = bits == 32
        ? shampoo_cuda_scatter_f32(&env, ptr(&call, 0), ptr(&call, 1), ptr(&call, 2),
                                   ptr(&call, 3), call.nblocks, ptr(&call, 4))
        : shampoo_cuda_scatter_f64(&env, ptr(&call, 0), ptr(&call, 1), ptr(&call, 2),
                                   ptr(&call, 3), call.nblocks, ptr(&call, 4));
    return shampoo_cuda_done(m, &scope, &call, st, Py_NewRef(Py_None));
}

static PyObject *moments(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"grads", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OUT},
        {"grafting_state", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        {"filtered_grad", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        SHAMPOO_CUDA_TABLE_ARGS,
        SHAMPOO_CUDA_ACTIVE_ARG,
        SHAMPOO_CUDA_FAIL_ARG(SHAMPOO_ARG_OPTIONAL),
    };
    PyObject *o[7];
    unsigned long long stream;
    shampoo_moments_params p;
    shampoo_call call = {0};
    shampoo_cuda_env env;
    shampoo_cuda_scope scope = {0};
    if (!PyArg_ParseTuple(args, "KOOOOOOOpdddd", &stream, &o[0], &o[1], &o[2], &o[3], &o[4],
                          &o[5], &o[6], &p.update_grafting_state, &p.grafting_beta2, &p.beta1,
                          &p.beta3, &p.bias_correction1))
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, fn, specs, o, 7, bits) < 0 ||
        shampoo_cuda_check_fail(&call, 6) < 0 ||
        shampoo_cuda_env_for(m, &call, stream, NULL, NULL, 0, &env, &scope) < 0)
        return shampoo_cuda_failed(m, &scope, &call);
    shampoo_status st = bits == 32
        ? shampoo_cuda_moments_f32(&env, ptr(&call, 0), ptr(&call, 1), ptr(&call, 2),
                                   ptr(&call, 3), ptr(&call, 4), call.nblocks, ptr(&call, 5), &p,
                                   ptr(&call, 6))
        : shampoo_cuda_moments_f64(&env, ptr(&call, 0), ptr(&call, 1), ptr(&call, 2),
                                   ptr(&call, 3), ptr(&call, 4), call.nblocks, ptr(&call, 5), &p,
                                   ptr(&call, 6));
    return shampoo_cuda_done(m, &scope, &call, st, Py_NewRef(Py_None));
}

static PyObject *finish(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"workspace", SHAMPOO_ARG_BYTES, SHAMPOO_LAYOUT_NONE,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        /* may be grads itself when the table writes the block layout (elementwise.h) */
        {"update_flat", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_PARAM,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_ALIAS_OK},
        {"grads", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_ALIAS_OK},
        {"shampoo_dir", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OPTIONAL},
        {"grafting_state", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OPTIONAL},
        {"param_blocks", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OPTIONAL},
        {"momentum_state", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        SHAMPOO_CUDA_TABLE_ARGS,
        SHAMPOO_CUDA_ACTIVE_ARG,
        SHAMPOO_CUDA_FAIL_ARG(SHAMPOO_ARG_OPTIONAL),
    };
    PyObject *o[11];
    unsigned long long stream;
    int graft;
    shampoo_finish_params p;
    shampoo_call call = {0};
    shampoo_cuda_env env;
    shampoo_cuda_scope scope = {0};
    if (!PyArg_ParseTuple(args, "KOOOOOOOOOOOipdddddpd", &stream, &o[0], &o[1], &o[2], &o[3],
                          &o[4], &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &graft,
                          &p.grafting_phase, &p.grafting_bias_correction, &p.grafting_epsilon,
                          &p.decoupled_weight_decay, &p.momentum, &p.dampening, &p.nesterov,
                          &p.lr))
        return NULL;
    p.graft = (shampoo_graft_kind)graft;
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, fn, specs, o, 11, bits) < 0 ||
        shampoo_cuda_check_fail(&call, 10) < 0 ||
        shampoo_check_finish_args(fn, &p, o[3] != Py_None, o[4] != Py_None, o[5] != Py_None,
                                  o[6] != Py_None) < 0 ||
        shampoo_cuda_env_for(m, &call, stream, &call.views[0], NULL, 0, &env, &scope) < 0)
        return shampoo_cuda_failed(m, &scope, &call);
    shampoo_status st = bits == 32
        ? shampoo_cuda_finish_f32(&env, ptr(&call, 1), ptr(&call, 2), ptr(&call, 3),
                                  ptr(&call, 4), ptr(&call, 5), ptr(&call, 6), ptr(&call, 7),
                                  ptr(&call, 8), call.nblocks, ptr(&call, 9), &p, ptr(&call, 10))
        : shampoo_cuda_finish_f64(&env, ptr(&call, 1), ptr(&call, 2), ptr(&call, 3),
                                  ptr(&call, 4), ptr(&call, 5), ptr(&call, 6), ptr(&call, 7),
                                  ptr(&call, 8), call.nblocks, ptr(&call, 9), &p,
                                  ptr(&call, 10));
    return shampoo_cuda_done(m, &scope, &call, st, Py_NewRef(Py_None));
}

static PyObject *factor_update(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        SHAMPOO_CUDA_WORKSPACE_ARGS,
        {"factors_out", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_ALIAS_OK},
        {"factors_in", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, SHAMPOO_ARG_ALIAS_OK},
        {"grads", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, 0},
        SHAMPOO_CUDA_TABLE_ARGS,
        SHAMPOO_CUDA_PLAN_ARGS,
        SHAMPOO_CUDA_ACTIVE_ARG,
        SHAMPOO_CUDA_FAIL_ARG(SHAMPOO_ARG_OPTIONAL),
    };
    PyObject *o[11];
    unsigned long long stream;
    double beta2;
    shampoo_call call = {0};
    shampoo_cuda_env env;
    shampoo_cuda_scope scope = {0};
    if (!PyArg_ParseTuple(args, "KOOOOOOOOOOOd", &stream, &o[0], &o[1], &o[2], &o[3], &o[4],
                          &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &beta2))
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, fn, specs, o, 11, bits) < 0 ||
        shampoo_cuda_check_fail(&call, 10) < 0 || shampoo_cuda_check_plan(&call, 7, 8, 6) < 0 ||
        shampoo_cuda_env_for(m, &call, stream, &call.views[0], &call.views[1], 1, &env, &scope) < 0)
        return shampoo_cuda_failed(m, &scope, &call);
    shampoo_status st = bits == 32
        ? shampoo_cuda_factor_update_f32(&env, ptr(&call, 2), ptr(&call, 3), ptr(&call, 4),
                                         ptr(&call, 5), ptr(&call, 6), call.nblocks,
                                         ptr(&call, 7), ptr(&call, 8), ptr(&call, 9), beta2,
                                         ptr(&call, 10))
        : shampoo_cuda_factor_update_f64(&env, ptr(&call, 2), ptr(&call, 3), ptr(&call, 4),
                                         ptr(&call, 5), ptr(&call, 6), call.nblocks,
                                         ptr(&call, 7), ptr(&call, 8), ptr(&call, 9), beta2,
                                         ptr(&call, 10));
    return shampoo_cuda_done(m, &scope, &call, st, Py_NewRef(Py_None));
}

static PyObject *precondition(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        SHAMPOO_CUDA_WORKSPACE_ARGS,
        {"out", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OUT},
        {"grads", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, 0},
        {"inv_roots", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, 0},
        SHAMPOO_CUDA_TABLE_ARGS,
        SHAMPOO_CUDA_PLAN_ARGS,
        SHAMPOO_CUDA_ACTIVE_ARG,
    };
    PyObject *o[10];
    unsigned long long stream;
    shampoo_call call = {0};
    shampoo_cuda_env env;
    shampoo_cuda_scope scope = {0};
    if (!PyArg_ParseTuple(args, "KOOOOOOOOOO", &stream, &o[0], &o[1], &o[2], &o[3], &o[4],
                          &o[5], &o[6], &o[7], &o[8], &o[9]))
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, fn, specs, o, 10, bits) < 0 ||
        shampoo_cuda_check_plan(&call, 7, 8, 6) < 0 ||
        shampoo_cuda_env_for(m, &call, stream, &call.views[0], &call.views[1], 1, &env, &scope) < 0)
        return shampoo_cuda_failed(m, &scope, &call);
    shampoo_status st = bits == 32
        ? shampoo_cuda_precondition_f32(&env, ptr(&call, 2), ptr(&call, 3), ptr(&call, 4),
                                        ptr(&call, 5), ptr(&call, 6), call.nblocks,
                                        ptr(&call, 7), ptr(&call, 8), ptr(&call, 9))
        : shampoo_cuda_precondition_f64(&env, ptr(&call, 2), ptr(&call, 3), ptr(&call, 4),
                                        ptr(&call, 5), ptr(&call, 6), call.nblocks,
                                        ptr(&call, 7), ptr(&call, 8), ptr(&call, 9));
    return shampoo_cuda_done(m, &scope, &call, st, Py_NewRef(Py_None));
}

static PyObject *root_inverse(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        SHAMPOO_CUDA_WORKSPACE_ARGS,
        {"out", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, SHAMPOO_ARG_OUT},
        {"factors", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_FACTOR, 0},
        SHAMPOO_CUDA_TABLE_ARGS,
        SHAMPOO_CUDA_ACTIVE_ARG,
        {"is_diagonal", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_FACTOR, SHAMPOO_ARG_OUT},
        {"status_out", SHAMPOO_ARG_INT32, SHAMPOO_LAYOUT_PER_FACTOR,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_HOST},
    };
    PyObject *o[9];
    unsigned long long stream;
    int method;
    long long max_iterations, order;
    shampoo_root_config cfg;
    shampoo_call call = {0};
    shampoo_cuda_env env;
    shampoo_cuda_scope scope = {0};
    if (!PyArg_ParseTuple(args, "KOOOOOOOOOidddppLdd" "L", &stream, &o[0], &o[1], &o[2], &o[3],
                          &o[4], &o[5], &o[6], &o[7], &o[8], &method, &cfg.epsilon,
                          &cfg.exponent_multiplier, &cfg.bias_correction,
                          &cfg.make_positive_semidefinite, &cfg.retry_double_precision,
                          &max_iterations, &cfg.tolerance, &cfg.rel_epsilon, &order))
        return NULL;
    cfg.method = (shampoo_root_method)method;
    cfg.max_iterations = max_iterations;
    cfg.order = order;
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, fn, specs, o, 9, bits) < 0 ||
        shampoo_cuda_env_for(m, &call, stream, &call.views[0], &call.views[1], 1, &env, &scope) < 0)
        return shampoo_cuda_failed(m, &scope, &call);
    shampoo_status st;
    Py_BEGIN_ALLOW_THREADS /* it waits for the device */
    st = bits == 32
        ? shampoo_cuda_root_inverse_f32(&env, ptr(&call, 2), ptr(&call, 3), ptr(&call, 4),
                                        ptr(&call, 5), call.nblocks, ptr(&call, 6), &cfg,
                                        ptr(&call, 7), ptr(&call, 8))
        : shampoo_cuda_root_inverse_f64(&env, ptr(&call, 2), ptr(&call, 3), ptr(&call, 4),
                                        ptr(&call, 5), call.nblocks, ptr(&call, 6), &cfg,
                                        ptr(&call, 7), ptr(&call, 8));
    Py_END_ALLOW_THREADS
    return shampoo_cuda_done(m, &scope, &call, st, Py_NewRef(Py_None));
}

/* workspace_bytes(op, stream, device, table_host, plan_host, bits) -> int: scratch bytes
 * of one call of op ("factor_update", "precondition", "finish", "root_inverse"). */
static PyObject *workspace_bytes(PyObject *m, PyObject *args)
{
    static const shampoo_arg_spec specs[] = {
        {"table_host", SHAMPOO_ARG_TABLE, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_HOST},
        {"plan_host", SHAMPOO_ARG_INT64, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_HOST},
    };
    const char *op;
    PyObject *o[2];
    unsigned long long stream;
    int device, bits;
    shampoo_call call = {0};
    shampoo_cuda_scope scope = {0};
    if (!PyArg_ParseTuple(args, "sKiOOi:workspace_bytes", &op, &stream, &device, &o[0], &o[1],
                          &bits))
        return NULL;
    if (bits != 32 && bits != 64)
        return PyErr_Format(PyExc_ValueError, "workspace_bytes: bits must be 32 or 64");
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, "workspace_bytes", specs, o, 2,
                          bits) < 0)
        return shampoo_cuda_failed(m, &scope, &call);
    const int64_t *table = ptr(&call, 0), *plan = ptr(&call, 1);
    if (shampoo_batch_plan_check(plan, call.views[1].numel, table, call.nblocks) != SHAMPOO_OK) {
        PyErr_SetString(PyExc_ValueError, "workspace_bytes: argument 'plan_host' is not the "
                        "batch plan of the table");
        return shampoo_cuda_failed(m, &scope, &call);
    }
    size_t bytes = 0;
    shampoo_status st = SHAMPOO_OK;
    if (strcmp(op, "factor_update") == 0) {
        bytes = shampoo_cuda_factor_update_workspace(table, call.nblocks, plan, bits / 8);
    } else if (strcmp(op, "precondition") == 0) {
        bytes = shampoo_cuda_precondition_workspace(table, call.nblocks, plan, bits / 8);
    } else if (strcmp(op, "finish") == 0) {
        bytes = shampoo_cuda_finish_workspace(call.nblocks);
    } else if (strcmp(op, "root_inverse") == 0) {
        shampoo_cuda_env env;
        call.device_id = device;
        if (shampoo_cuda_env_for(m, &call, stream, NULL, NULL, 1, &env, &scope) < 0)
            return shampoo_cuda_failed(m, &scope, &call);
        st = shampoo_cuda_root_inverse_workspace(&env, table, call.nblocks, bits / 8, &bytes);
    } else {
        PyErr_Format(PyExc_ValueError, "workspace_bytes: unknown op '%s'", op);
        return shampoo_cuda_failed(m, &scope, &call);
    }
    return shampoo_cuda_done(m, &scope, &call, st, PyLong_FromSize_t(bytes));
}

SHAMPOO_TWINS(gather)
SHAMPOO_TWINS(scatter)
SHAMPOO_TWINS(moments)
SHAMPOO_TWINS(finish)
SHAMPOO_TWINS(factor_update)
SHAMPOO_TWINS(precondition)
SHAMPOO_TWINS(root_inverse)

PyMethodDef shampoo_cuda_kernel_methods[] = {
    SHAMPOO_TWIN_ENTRIES(gather, "gather (CUDA)"),
    SHAMPOO_TWIN_ENTRIES(scatter, "scatter (CUDA)"),
    SHAMPOO_TWIN_ENTRIES(moments, "moments (CUDA)"),
    SHAMPOO_TWIN_ENTRIES(finish, "finish (CUDA)"),
    SHAMPOO_TWIN_ENTRIES(factor_update, "factor update (CUDA)"),
    SHAMPOO_TWIN_ENTRIES(precondition, "preconditioning (CUDA)"),
    SHAMPOO_TWIN_ENTRIES(root_inverse, "inverse roots (CUDA)"),
    {"workspace_bytes", workspace_bytes, METH_VARARGS,
     "workspace_bytes(op, stream, device, table_host, plan_host, bits) -> int"},
    {NULL, NULL, 0, NULL}
};
