/* Entry points of the pointer-table kernels (csrc/core/param_io.h): gradients read and
 * parameters written where they are, through lists of tensors borrowed for one call
 * (tensor_list.c). Part of the binding. */
#include "binding.h"

#include "../core/block_table.h"
#include "../core/param_io.h"
#include "tensor_list.h"

#define TABLE_ARG {"table", SHAMPOO_ARG_TABLE, SHAMPOO_LAYOUT_NONE, 0}
#define ACTIVE_ARG {"active", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_BLOCK, 0}
#define OFFSETS_ARG {"tensor_offsets", SHAMPOO_ARG_INT64, SHAMPOO_LAYOUT_NONE, 0}
#define BLOCK_TENSOR_ARG {"block_tensor", SHAMPOO_ARG_INT64, SHAMPOO_LAYOUT_PER_BLOCK, 0}

/* Borrows the lists after the call's views (indices of tensor_offsets, block_tensor, table
 * and active given), then checks overlaps; -1 with an exception set. */
static int bind_lists(shampoo_call *call, const shampoo_arg_spec *specs, PyObject *m,
                      shampoo_tensor_list *lists, PyObject *const *seqs, const int *written,
                      const char *const *names, int nlists, int i_offsets, int i_block_tensor,
                      int i_table, int i_active)
{
    shampoo_dlpack_state *st = &shampoo_get_state(m)->dl;
    for (int i = 0; i < nlists; i++) {
        if (seqs[i] == Py_None)
            continue;
        if (shampoo_list_bind(&lists[i], st, call->fn, names[i], seqs[i], written[i],
                              call->real_bits, call->views[i_table].data, call->nblocks,
                              call->views[i_active].data, call->views[i_offsets].data,
                              call->views[i_offsets].numel,
                              call->views[i_block_tensor].data) < 0)
            return -1;
    }
    return shampoo_list_check_overlaps(call->fn, lists, nlists, call, specs);
}

static PyObject *done(shampoo_call *call, shampoo_tensor_list *lists, int nlists,
                      shampoo_status st, PyObject *ok)
{
    for (int i = 0; i < nlists; i++)
        shampoo_list_release(&lists[i]);
    return shampoo_call_done(call, st, ok, shampoo_raise_status);
}

static PyObject *failed(shampoo_call *call, shampoo_tensor_list *lists, int nlists)
{
    for (int i = 0; i < nlists; i++)
        shampoo_list_release(&lists[i]);
    return shampoo_call_failed(call);
}

static PyObject *gather_io(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        {"grad_blocks", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        {"param_blocks", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        OFFSETS_ARG,
        BLOCK_TENSOR_ARG,
        TABLE_ARG,
        ACTIVE_ARG,
        {"sq_norms", SHAMPOO_ARG_DOUBLE, SHAMPOO_LAYOUT_PER_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
    };
    static const char *const names[2] = {"grads", "params"};
    static const int written[2] = {0, 0};
    PyObject *o[7], *seqs[2];
    double l2;
    shampoo_call call = {0};
    shampoo_tensor_list lists[2] = {{0}};
    if (!PyArg_ParseTuple(args, "OOOOOOOOdO", &o[0], &o[1], &seqs[0], &seqs[1], &o[2], &o[3],
                          &o[4], &o[5], &l2, &o[6]))
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 7, bits) < 0)
        return shampoo_call_failed(&call);
    if (seqs[0] == Py_None || (seqs[1] == Py_None && (o[1] != Py_None || l2 != 0.0))) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'grads' is required, and 'params' when "
                     "param_blocks is given or l2_weight_decay != 0", fn);
        return failed(&call, lists, 2);
    }
    if (bind_lists(&call, specs, m, lists, seqs, written, names, 2, 2, 3, 4, 5) < 0)
        return failed(&call, lists, 2);
    const shampoo_io_dtype dt = lists[0].bf16 ? SHAMPOO_IO_BF16 : SHAMPOO_IO_REAL;
    if (seqs[1] != Py_None && lists[1].bf16 != lists[0].bf16) {
        PyErr_Format(PyExc_TypeError, "%s: 'grads' and 'params' must share one dtype", fn);
        return failed(&call, lists, 2);
    }
    const void *const *g = (const void *const *)lists[0].ptrs;
    const void *const *w = seqs[1] != Py_None ? (const void *const *)lists[1].ptrs : NULL;
    int64_t first = -1;
    shampoo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (bits == 32)
        st = shampoo_gather_io_f32(shampoo_arg(&call, 0), shampoo_arg(&call, 1), g, w, dt,
                                   shampoo_arg(&call, 4), call.nblocks, shampoo_arg(&call, 5),
                                   l2, &first, shampoo_arg(&call, 6));
    else
        st = shampoo_gather_io_f64(shampoo_arg(&call, 0), shampoo_arg(&call, 1), g, w, dt,
                                   shampoo_arg(&call, 4), call.nblocks, shampoo_arg(&call, 5),
                                   l2, &first, shampoo_arg(&call, 6));
    Py_END_ALLOW_THREADS
    return done(&call, lists, 2, st, PyLong_FromLongLong(first));
}

static PyObject *finish_io(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        OFFSETS_ARG,
        BLOCK_TENSOR_ARG,
        {"grads", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, 0},
        {"shampoo_dir", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OPTIONAL},
        {"grafting_state", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, SHAMPOO_ARG_OPTIONAL},
        {"momentum_state", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK,
         SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},
        TABLE_ARG,
        ACTIVE_ARG,
    };
    static const char *const names[1] = {"params"};
    static const int written[1] = {1};
    PyObject *o[8], *seqs[1];
    shampoo_finish_params p;
    int graft;
    shampoo_call call = {0};
    shampoo_tensor_list lists[1] = {{0}};
    if (!PyArg_ParseTuple(args, "OOOOOOOOOipdddddpd", &seqs[0], &o[0], &o[1], &o[2], &o[3],
                          &o[4], &o[5], &o[6], &o[7], &graft, &p.grafting_phase,
                          &p.grafting_bias_correction, &p.grafting_epsilon,
                          &p.decoupled_weight_decay, &p.momentum, &p.dampening, &p.nesterov,
                          &p.lr))
        return NULL;
    p.graft = (shampoo_graft_kind)graft;
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 8, bits) < 0)
        return shampoo_call_failed(&call);
    if (shampoo_check_finish_args(fn, &p, o[3] != Py_None, o[4] != Py_None, -1, o[5] != Py_None) < 0)
        return failed(&call, lists, 1);
    if (bind_lists(&call, specs, m, lists, seqs, written, names, 1, 0, 1, 6, 7) < 0)
        return failed(&call, lists, 1);
    const shampoo_io_dtype dt = lists[0].bf16 ? SHAMPOO_IO_BF16 : SHAMPOO_IO_REAL;
    void *const *w = lists[0].ptrs;
    shampoo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (bits == 32)
        st = shampoo_finish_io_f32(w, dt, shampoo_arg(&call, 2), shampoo_arg(&call, 3),
                                   shampoo_arg(&call, 4), shampoo_arg(&call, 5),
                                   shampoo_arg(&call, 6), call.nblocks, shampoo_arg(&call, 7),
                                   &p);
    else
        st = shampoo_finish_io_f64(w, dt, shampoo_arg(&call, 2), shampoo_arg(&call, 3),
                                   shampoo_arg(&call, 4), shampoo_arg(&call, 5),
                                   shampoo_arg(&call, 6), call.nblocks, shampoo_arg(&call, 7),
                                   &p);
    Py_END_ALLOW_THREADS
    return done(&call, lists, 1, st, Py_NewRef(Py_None));
}

static PyObject *scatter_io(PyObject *m, PyObject *args, int bits, const char *fn)
{
    static const shampoo_arg_spec specs[] = {
        OFFSETS_ARG,
        BLOCK_TENSOR_ARG,
        {"blocks", SHAMPOO_ARG_REAL, SHAMPOO_LAYOUT_BLOCK, 0},
        TABLE_ARG,
        ACTIVE_ARG,
    };
    static const char *const names[1] = {"params"};
    static const int written[1] = {1};
    PyObject *o[5], *seqs[1], *flag;
    shampoo_call call = {0};
    shampoo_tensor_list lists[1] = {{0}};
    if (!PyArg_ParseTuple(args, "OOOOOOO", &seqs[0], &o[0], &o[1], &o[2], &o[3], &o[4], &flag))
        return NULL;
    /* a bool or an int only: a tensor's truth value would raise its own error */
    if (!PyBool_Check(flag) && !PyLong_Check(flag))
        return PyErr_Format(PyExc_TypeError, "%s: argument 'accumulate' must be a bool", fn);
    const int accumulate = PyObject_IsTrue(flag);
    if (accumulate < 0)
        return NULL;
    if (shampoo_call_bind(&call, &shampoo_get_state(m)->dl, fn, specs, o, 5, bits) < 0)
        return shampoo_call_failed(&call);
    if (bind_lists(&call, specs, m, lists, seqs, written, names, 1, 0, 1, 3, 4) < 0)
        return failed(&call, lists, 1);
    const shampoo_io_dtype dt = lists[0].bf16 ? SHAMPOO_IO_BF16 : SHAMPOO_IO_REAL;
    shampoo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (bits == 32)
        st = shampoo_scatter_io_f32(lists[0].ptrs, dt, shampoo_arg(&call, 2),
                                    shampoo_arg(&call, 3), call.nblocks, shampoo_arg(&call, 4),
                                    accumulate);
    else
        st = shampoo_scatter_io_f64(lists[0].ptrs, dt, shampoo_arg(&call, 2),
                                    shampoo_arg(&call, 3), call.nblocks, shampoo_arg(&call, 4),
                                    accumulate);
    Py_END_ALLOW_THREADS
    return done(&call, lists, 1, st, Py_NewRef(Py_None));
}

SHAMPOO_TWINS(gather_io)
SHAMPOO_TWINS(finish_io)
SHAMPOO_TWINS(scatter_io)

PyMethodDef shampoo_param_io_methods[] = {
    SHAMPOO_TWIN_ENTRIES(gather_io, "Gradients read in place into block layout (param_io.h)"),
    SHAMPOO_TWIN_ENTRIES(finish_io, "Finish fused with the parameter update in place"),
    SHAMPOO_TWIN_ENTRIES(scatter_io, "Block layout into the parameters in place"),
    {NULL, NULL, 0, NULL},
};
