/* What every CUDA entry point (cuda_ops.c, cuda_soap_ops.c, cuda_io_ops.c,
 * cuda_packed_ops.c) ends a call with, and the argument checks they share (cuda_binding.h).
 * Part of the binding. */
#include "cuda_binding.h"

#include "../core/batch_plan.h"

PyObject *shampoo_cuda_done(PyObject *m, shampoo_cuda_scope *scope, shampoo_call *call,
                            shampoo_status st, PyObject *ok)
{
    /* the exception's text is read before anything else runs CUDA */
    PyObject *r = shampoo_call_done(call, st, ok, shampoo_cuda_raise_status);
    shampoo_cuda_scope_end(m, scope);
    return r;
}

PyObject *shampoo_cuda_failed(PyObject *m, shampoo_cuda_scope *scope, shampoo_call *call)
{
    shampoo_cuda_scope_end(m, scope);
    return shampoo_call_failed(call);
}

int shampoo_cuda_check_fail(shampoo_call *call, int i)
{
    if (call->views[i].data != NULL && call->views[i].numel != 2) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'fail' must have 2 elements", call->fn);
        return -1;
    }
    return 0;
}

int shampoo_cuda_check_plan(shampoo_call *call, int plan, int plan_host, int table_host)
{
    const shampoo_view *p = &call->views[plan], *h = &call->views[plan_host];
    if (p->numel != h->numel ||
        shampoo_batch_plan_check(h->data, h->numel, call->views[table_host].data,
                                 call->nblocks) != SHAMPOO_OK) {
        PyErr_Format(PyExc_ValueError, "%s: arguments 'plan'/'plan_host' are not the batch "
                     "plan of the table (build it with _backend.batch_plan)", call->fn);
        return -1;
    }
    return 0;
}
