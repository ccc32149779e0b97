/* Private declarations of the CUDA module distributed_shampoo._C_cuda (cuda_binding.c,
 * cuda_ops.c): its state and the environment a kernel call gets. Python-side only. */
#ifndef SHAMPOO_CUDA_BINDING_H
#define SHAMPOO_CUDA_BINDING_H

#include "binding.h" /* Python.h first */

#include "../cuda/shampoo_cuda.h"

#define SHAMPOO_CUDA_MAX_DEVICES 64

typedef struct shampoo_cuda_module_state {
    shampoo_dlpack_state dl;
    int libs_loaded;
    shampoo_cuda_libs libs;
    /* cuBLAS / cuSOLVER handles per device, created on first use and kept for the life of
     * the process (destroying them at interpreter exit can race the CUDA context's own
     * teardown) */
    void *blas[SHAMPOO_CUDA_MAX_DEVICES];
    void *solver[SHAMPOO_CUDA_MAX_DEVICES];
} shampoo_cuda_module_state;

static inline shampoo_cuda_module_state *shampoo_cuda_get_state(PyObject *module)
{
    return (shampoo_cuda_module_state *)PyModule_GetState(module);
}

/* Fills env for a bound call on call->device_id: stream, workspaces (views may be NULL) and,
 * when need_libs, the loaded libraries with that device's handles (created on first use).
 * Returns 0, or -1 with an exception set. */
int shampoo_cuda_env_for(PyObject *module, const shampoo_call *call, unsigned long long stream,
                         const shampoo_view *workspace, const shampoo_view *blas_workspace,
                         int need_libs, shampoo_cuda_env *env);

/* Sets the Python exception for a CUDA kernel status (with the CUDA error text); NULL. */
PyObject *shampoo_cuda_raise_status(const char *fn, shampoo_status status);

extern PyMethodDef shampoo_cuda_kernel_methods[];

#endif
