/* Private declarations of the CUDA module distributed_shampoo._C_cuda (cuda_binding.c,
 * cuda_call.c, cuda_*_ops.c): its state, the environment a kernel call gets, and what the
 * entry points share. Python-side only. */
#ifndef SHAMPOO_CUDA_BINDING_H
#define SHAMPOO_CUDA_BINDING_H

#include "binding.h" /* Python.h first */

#include "../cuda/shampoo_cuda.h"

#define SHAMPOO_CUDA_MAX_DEVICES 64
/* cuBLAS/cuSOLVER handle pairs per device: one per call in flight (a root inverse runs with
 * the GIL released, so calls on several threads may overlap; a handle is bound to one
 * stream and workspace at a time and must not be shared by overlapping calls). */
#define SHAMPOO_CUDA_HANDLE_POOL 16

typedef struct shampoo_cuda_module_state {
    shampoo_dlpack_state dl;
    int libs_loaded;
    shampoo_cuda_libs libs;
    /* cuBLAS / cuSOLVER handles per device, created on first use and kept for the life of
     * the process (destroying them at interpreter exit can race the CUDA context's own
     * teardown); busy while a call holds them (guarded by a lock in cuda_binding.c) */
    void *blas[SHAMPOO_CUDA_MAX_DEVICES][SHAMPOO_CUDA_HANDLE_POOL];
    void *solver[SHAMPOO_CUDA_MAX_DEVICES][SHAMPOO_CUDA_HANDLE_POOL];
    unsigned char busy[SHAMPOO_CUDA_MAX_DEVICES][SHAMPOO_CUDA_HANDLE_POOL];
} shampoo_cuda_module_state;

/* What a call changed and must undo: torch's current device, the handles it holds. */
typedef struct shampoo_cuda_scope {
    int device, previous, entered, slot;
} shampoo_cuda_scope;

static inline shampoo_cuda_module_state *shampoo_cuda_get_state(PyObject *module)
{
    return (shampoo_cuda_module_state *)PyModule_GetState(module);
}

/* Fills env for a bound call on call->device_id: stream, workspaces (views may be NULL) and,
 * when need_libs, the loaded libraries with a free handle pair of that device (created on
 * first use). Makes the device current, saving torch's in *scope (zero-initialised by the
 * caller); shampoo_cuda_scope_end undoes both, whatever happened. Clears the failure record.
 * Returns 0, or -1 with an exception set. */
int shampoo_cuda_env_for(PyObject *module, const shampoo_call *call, unsigned long long stream,
                         const shampoo_view *workspace, const shampoo_view *blas_workspace,
                         int need_libs, shampoo_cuda_env *env, shampoo_cuda_scope *scope);
void shampoo_cuda_scope_end(PyObject *module, shampoo_cuda_scope *scope);

/* Sets the Python exception for a kernel status, with the first failed CUDA/cuBLAS/cuSOLVER
 * call's name, code and place when one was recorded; NULL. */
PyObject *shampoo_cuda_raise_status(const char *fn, shampoo_status status);

/* ---- cuda_call.c: what the entry points share */

/* The argument specs every table-driven CUDA op takes (tensor_args.c). */
#define SHAMPOO_CUDA_TABLE_ARGS                                                              \
    {"table", SHAMPOO_ARG_TABLE, SHAMPOO_LAYOUT_NONE, 0},                                    \
    {"table_host", SHAMPOO_ARG_TABLE, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_HOST}
#define SHAMPOO_CUDA_ACTIVE_ARG {"active", SHAMPOO_ARG_MASK, SHAMPOO_LAYOUT_PER_BLOCK, 0}
#define SHAMPOO_CUDA_PLAN_ARGS                                                               \
    {"plan", SHAMPOO_ARG_INT64, SHAMPOO_LAYOUT_NONE, 0},                                     \
    {"plan_host", SHAMPOO_ARG_INT64, SHAMPOO_LAYOUT_NONE, SHAMPOO_ARG_HOST}
#define SHAMPOO_CUDA_FAIL_ARG(flags) {"fail", SHAMPOO_ARG_INT64, SHAMPOO_LAYOUT_NONE, (flags)}
#define SHAMPOO_CUDA_WORKSPACE_ARGS                                                          \
    {"workspace", SHAMPOO_ARG_BYTES, SHAMPOO_LAYOUT_NONE,                                    \
     SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL},                                                \
    {"blas_workspace", SHAMPOO_ARG_BYTES, SHAMPOO_LAYOUT_NONE,                               \
     SHAMPOO_ARG_OUT | SHAMPOO_ARG_OPTIONAL}

/* Ends a bound call: raises for a bad status (its text read before anything else runs
 * CUDA), else returns `ok`; then torch's device and the handles back. */
PyObject *shampoo_cuda_done(PyObject *m, shampoo_cuda_scope *scope, shampoo_call *call,
                            shampoo_status st, PyObject *ok);
/* Ends a call that failed before its kernel ran (exception set): NULL. */
PyObject *shampoo_cuda_failed(PyObject *m, shampoo_cuda_scope *scope, shampoo_call *call);
/* The failure flag at view i, when given, is int64[2]; 0, or -1 with an exception set. */
int shampoo_cuda_check_fail(shampoo_call *call, int i);
/* Views plan (device) and plan_host are the batch plan of the host table at view
 * table_host; 0, or -1 with an exception set. */
int shampoo_cuda_check_plan(shampoo_call *call, int plan, int plan_host, int table_host);

extern PyMethodDef shampoo_cuda_kernel_methods[];
extern PyMethodDef shampoo_cuda_packed_methods[]; /* cuda_packed_ops.c */
extern PyMethodDef shampoo_cuda_soap_methods[];   /* cuda_soap_ops.c */
extern PyMethodDef shampoo_cuda_io_methods[];     /* cuda_io_ops.c */

#endif
