/* Entry points of the CUDA pointer-table kernels (csrc/cuda/param_io_cuda.h): gradients read
 * and parameters written where they are on the GPU. As param_io_ops.c for the CPU, the
 * tensor lists are borrowed for one call (tensor_list.c) and every active block is proved
 * inside its tensor before anything is enqueued; here every tensor must also be on the
 * call's GPU. The per-block pointer tables are built on the host from those lists, from the
 * HOST copy of the active mask (the host cannot read a device mask without waiting for the
 * GPU), and the kernels copy them to the device on the call's stream. Part of the binding. */
#include "cuda_binding.h"

#include "../core/block_table.h"
#include "../cuda/param_io_cuda.h"
#include "tensor_list.h"

#define WORKSPACE_ARG {"workspace", SHAMPOO_ARG_BYTES, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_OUT}
#define OFFSETS_ARG {"tensor_offsets", SHAMPOO_ARG_INT64, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_HOST}
#define BLOCK_TENSOR_ARG                                                                     \
    {"block_tensor", SHAMPOO_ARG_INT64, SHAMPOO_LAYOUT_PER_BLOCK, SHAMPOO_ARG_HOST}
#define ACTIVE_HOST_ARG                                                                      \
    {"active_host", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_BLOCK, SHAMPOO_ARG_HOST}

/* Which views of the call the lists are located by. */
typedef struct io_indices {
    int offsets, block_tensor, table_host, active_host;
} io_indices;

/* Borrows the lists (None entries of `seqs` skipped), checks that every tensor is on the
 * call's GPU and that no written buffer overlaps another; -1 with an exception set. */
static int bind_lists(shampoo_call *call, const shampoo_arg_spec *specs, PyObject *m,
                      shampoo_tensor_list *lists, PyObject *const *seqs, const int *written,
                      const char *const *names, int nlists, io_indices ix)
{
    shampoo_dlpack_state *st = &shampoo_cuda_get_state(m)->dl;
    for (int i = 0; i < nlists; i++) {
        if (seqs[i] == Py_None)
            continue;
        if (shampoo_list_bind(&lists[i], st, call->fn, names[i], seqs[i], written[i],
                              call->real_bits, call->views[ix.table_host].data, call->nblocks,
                              call->views[ix.active_host].data, call->views[ix.offsets].data,
                              call->views[ix.offsets].numel,
                              call->views[ix.block_tensor].data) < 0)
            return -1;
        for (Py_ssize_t j = 0; j < lists[i].n; j++) {
            const shampoo_view *v = &lists[i].views[j];
            if (v->data != NULL && v->device_id != call->device_id) {
                PyErr_Format(PyExc_ValueError, "%s: entry %zd of '%s' is on GPU %d, the "
                             "other buffers of the call on GPU %d", call->fn, j, names[i],
                             v->device_id, call->device_id);
                return -1;
            }
        }
    }
    return shampoo_list_check_overlaps(call->fn, lists, nlists, call, specs);
}

/* shampoo_cuda_done / shampoo_cuda_failed, then the borrowed lists released. */
static PyObject *done(PyObject *m, shampoo_cuda_scope *scope, shampoo_call *call,
                      shampoo_tensor_list *lists, int nlists, shampoo_status st)
{
    PyObject *r = shampoo_cuda_done(m, scope, call, st, Py_NewRef(Py_None));
    for (int i = 0; i < nlists; i++)
        shampoo_list_release(&lists[i]);
    return r;
}

static PyObject *failed(PyObject *m, shampoo_cuda_scope *scope, shampoo_call *call,
                        shampoo_tensor_list *lists, int nlists)
{
    PyObject *r = shampoo_cuda_failed(m, scope, call);
    for (int i = 0; i < nlists; i++)
        shampoo_list_release(&lists[i]);
    return r;
}

/* gather_io_*(stream, workspace, grad_blocks, param_blocks, grads, params, tensor_offsets,
 * block_tensor, table, table_host, active_host, l2_weight_decay, step, fail, sq_norms) */
static PyObject *gather_io(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        WORKSPACE_ARG,
        {"grad_blocks", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        {"param_blocks", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        OFFSETS_ARG,
        BLOCK_TENSOR_ARG,
        SHAMPOO_CUDA_TABLE_ARGS,
        ACTIVE_HOST_ARG,
        SHAMPOO_CUDA_FAIL_ARG(SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL),
        {"sq_norms", SHAMPOO_ARG_DOUBLE, SHAMPOO_LAYOUT_PER_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
    };
    static const char *const names[2] = {"grads", "params"};
    static const int written[2] = {0, 0};
    PyObject *o[10], *seqs[2];
    unsigned long long stream;
    double l2;
    long long step;
    shampoo_call call = {0};
    shampoo_cuda_env env;
    shampoo_cuda_scope scope = {0};
    shampoo_tensor_list lists[2] = {{0}};
    if (!PyArg_ParseTuple(args, "KOOOOOOOOOOdLOO", &stream, &o[0], &o[1], &o[2], &seqs[0],
                          &seqs[1], &o[3], &o[4], &o[5], &o[6], &o[7], &l2, &step, &o[8],
                          &o[9]))
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, fn, specs, o, 10, bits) < 0 ||
        shampoo_cuda_check_fail(&call, 8) < 0)
        return failed(m, &scope, &call, lists, 2);
    if (seqs[0] == Py_None || (seqs[1] == Py_None && (o[2] != Py_None || l2 != 0.0))) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'grads' is required, and 'params' when "
                     "param_blocks is given or l2_weight_decay != 0", fn);
        return failed(m, &scope, &call, lists, 2);
    }
    const io_indices ix = {3, 4, 6, 7};
    if (bind_lists(&call, specs, m, lists, seqs, written, names, 2, ix) < 0)
        return failed(m, &scope, &call, lists, 2);
    if (seqs[1] != Py_None && lists[1].bf16 != lists[0].bf16) {
        PyErr_Format(PyExc_TypeError, "%s: 'grads' and 'params' must share one dtype", fn);
        return failed(m, &scope, &call, lists, 2);
    }
    if (shampoo_cuda_env_for(m, &call, stream, &call.views[0], NULL, 0, &env, &scope) < 0)
        return failed(m, &scope, &call, lists, 2);
    const shampoo_io_dtype dt = lists[0].bf16 ? SHAMPOO_IO_BF16 : SHAMPOO_IO_REAL;
    const void *const *g = (const void *const *)lists[0].ptrs;
    const void *const *w = seqs[1] != Py_None ? (const void *const *)lists[1].ptrs : NULL;
    void *a[10];
    for (int i = 0; i < 10; i++)
        a[i] = shampoo_arg(&call, i);
    shampoo_status st = bits == 32
        ? shampoo_cuda_gather_io_f32(&env, a[1], a[2], g, w, dt, a[5], a[6], call.nblocks,
                                     a[7], l2, step, a[8], a[9])
        : shampoo_cuda_gather_io_f64(&env, a[1], a[2], g, w, dt, a[5], a[6], call.nblocks,
                                     a[7], l2, step, a[8], a[9]);
    return done(m, &scope, &call, lists, 2, st);
}

/* finish_io_*(stream, workspace, params, tensor_offsets, block_tensor, grads, shampoo_dir,
 * grafting_state, momentum_state, table, table_host, active_host, fail, graft, ...scalars) */
static PyObject *finish_io(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        WORKSPACE_ARG,
        OFFSETS_ARG,
        BLOCK_TENSOR_ARG,
        {"grads", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, 0},
        {"shampoo_dir", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OPTIONAL},
        {"grafting_state", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OPTIONAL},
        {"momentum_state", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        SHAMPOO_CUDA_TABLE_ARGS,
        ACTIVE_HOST_ARG,
        SHAMPOO_CUDA_FAIL_ARG(SHAMPOO_ARG_OPTIONAL),
    };
    static const char *const names[1] = {"params"};
    static const int written[1] = {1};
    PyObject *o[11], *seqs[1];
    unsigned long long stream;
    shampoo_finish_params p;
    int graft;
    shampoo_call call = {0};
    shampoo_cuda_env env;
    shampoo_cuda_scope scope = {0};
    shampoo_tensor_list lists[1] = {{0}};
    if (!PyArg_ParseTuple(args, "KOOOOOOOOOOOOipdddddpd", &stream, &o[0], &seqs[0], &o[1],
                          &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8], &o[9], &o[10],
                          &graft, &p.grafting_phase, &p.grafting_bias_correction,
                          &p.grafting_epsilon, &p.decoupled_weight_decay, &p.momentum,
                          &p.dampening, &p.nesterov, &p.lr))
        return NULL;
    p.graft = (shampoo_graft_kind)graft;
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, fn, specs, o, 11, bits) < 0 ||
        shampoo_cuda_check_fail(&call, 10) < 0)
        return failed(m, &scope, &call, lists, 1);
    if (shampoo_check_finish_args(fn, &p, o[4] != Py_None, o[5] != Py_None, -1, o[6] != Py_None) < 0)
        return failed(m, &scope, &call, lists, 1);
    const io_indices ix = {1, 2, 8, 9};
    if (bind_lists(&call, specs, m, lists, seqs, written, names, 1, ix) < 0 ||
        shampoo_cuda_env_for(m, &call, stream, &call.views[0], NULL, 0, &env, &scope) < 0)
        return failed(m, &scope, &call, lists, 1);
    const shampoo_io_dtype dt = lists[0].bf16 ? SHAMPOO_IO_BF16 : SHAMPOO_IO_REAL;
    void *a[11];
    for (int i = 0; i < 11; i++)
        a[i] = shampoo_arg(&call, i);
    shampoo_status st = bits == 32
        ? shampoo_cuda_finish_io_f32(&env, lists[0].ptrs, dt, a[3], a[4], a[5], a[6], a[7],
                                     a[8], call.nblocks, a[9], &p, a[10])
        : shampoo_cuda_finish_io_f64(&env, lists[0].ptrs, dt, a[3], a[4], a[5], a[6], a[7],
                                     a[8], call.nblocks, a[9], &p, a[10]);
    return done(m, &scope, &call, lists, 1, st);
}

/* scatter_io_*(stream, workspace, params, tensor_offsets, block_tensor, blocks, table,
 * table_host, active_host, accumulate) */
static PyObject *scatter_io(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        WORKSPACE_ARG,
        OFFSETS_ARG,
        BLOCK_TENSOR_ARG,
        {"blocks", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, 0},
        SHAMPOO_CUDA_TABLE_ARGS,
        ACTIVE_HOST_ARG,
    };
    static const char *const names[1] = {"params"};
    static const int written[1] = {1};
    PyObject *o[7], *seqs[1], *flag;
    unsigned long long stream;
    shampoo_call call = {0};
    shampoo_cuda_env env;
    shampoo_cuda_scope scope = {0};
    shampoo_tensor_list lists[1] = {{0}};
    if (!PyArg_ParseTuple(args, "KOOOOOOOOO", &stream, &o[0], &seqs[0], &o[1], &o[2], &o[3],
                          &o[4], &o[5], &o[6], &flag))
        return NULL;
    /* a bool or an int only: a tensor's truth value would raise its own error */
    if (!PyBool_Check(flag) && !PyLong_Check(flag))
        return PyErr_Format(PyExc_TypeError, "%s: argument 'accumulate' must be a bool", fn);
    const int accumulate = PyObject_IsTrue(flag);
    if (accumulate < 0)
        return NULL;
    const io_indices ix = {1, 2, 5, 6};
    if (shampoo_call_bind(&call, &shampoo_cuda_get_state(m)->dl, fn, specs, o, 7, bits) < 0 ||
        bind_lists(&call, specs, m, lists, seqs, written, names, 1, ix) < 0 ||
        shampoo_cuda_env_for(m, &call, stream, &call.views[0], NULL, 0, &env, &scope) < 0)
        return failed(m, &scope, &call, lists, 1);
    const shampoo_io_dtype dt = lists[0].bf16 ? SHAMPOO_IO_BF16 : SHAMPOO_IO_REAL;
    void *a[7];
    for (int i = 0; i < 7; i++)
        a[i] = shampoo_arg(&call, i);
    shampoo_status st = bits == 32
        ? shampoo_cuda_scatter_io_f32(&env, lists[0].ptrs, dt, a[3], a[4], a[5], call.nblocks,
                                      a[6], accumulate)
        : shampoo_cuda_scatter_io_f64(&env, lists[0].ptrs, dt, a[3], a[4], a[5], call.nblocks,
                                      a[6], accumulate);
    return done(m, &scope, &call, lists, 1, st);
}

/* io_workspace_bytes(op, nblocks) -> int: the workspace one call of op needs. */
static PyObject *io_workspace_bytes(PyObject *m, PyObject *args)
{
    (void)m;
    const char *op;
    long long nblocks;
    if (!PyArg_ParseTuple(args, "sL:io_workspace_bytes", &op, &nblocks))
        return NULL;
    if (nblocks < 0)
        return PyErr_Format(PyExc_ValueError, "io_workspace_bytes: nblocks must be >= 0");
    size_t bytes;
    if (strcmp(op, "gather_io") == 0)
        bytes = shampoo_cuda_io_workspace(nblocks, 2, 0);
    else if (strcmp(op, "finish_io") == 0)
        bytes = shampoo_cuda_io_workspace(nblocks, 1, 1);
    else if (strcmp(op, "scatter_io") == 0)
        bytes = shampoo_cuda_io_workspace(nblocks, 1, 0);
    else
        return PyErr_Format(PyExc_ValueError, "io_workspace_bytes: unknown op '%s'", op);
    return PyLong_FromSize_t(bytes);
}

SHAMPOO_TWINS(gather_io)
SHAMPOO_TWINS(finish_io)
SHAMPOO_TWINS(scatter_io)

PyMethodDef shampoo_cuda_io_methods[] = {
    SHAMPOO_TWIN_ENTRIES(gather_io, "Gradients read in place into block layout (CUDA)"),
    SHAMPOO_TWIN_ENTRIES(finish_io, "Finish fused with the parameter update in place (CUDA)"),
    SHAMPOO_TWIN_ENTRIES(scatter_io, "Block layout into the parameters in place (CUDA)"),
    {"io_workspace_bytes", io_workspace_bytes, METH_VARARGS,
     "io_workspace_bytes(op, nblocks) -> int: workspace bytes of one pointer-table call"},
    {NULL, NULL, 0, NULL},
};
