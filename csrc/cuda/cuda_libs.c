/* Run-time resolution of cuBLAS and cuSOLVER (cuda_libs.h). */
#define _GNU_SOURCE
#include "cuda_libs.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

static void *open_first(const char *const *paths, int n, const char *what, char *err,
                        size_t errlen)
{
    const char *last = "no candidate path was given";
    for (int i = 0; i < n; i++) {
        /* RTLD_GLOBAL: cuSOLVER resolves some cuBLAS symbols through the global scope */
        void *lib = dlopen(paths[i], RTLD_NOW | RTLD_GLOBAL);
        if (lib != NULL)
            return lib;
        last = dlerror();
    }
    snprintf(err, errlen, "could not load %s (tried %d candidates; last error: %s)", what, n,
             last != NULL ? last : "unknown");
    return NULL;
}

/* Resolves name into *slot; a missing required symbol is an error. */
static int resolve(void *lib, const char *name, void **slot, int required, char *err,
                   size_t errlen)
{
    *slot = dlsym(lib, name);
    if (*slot == NULL && required) {
        snprintf(err, errlen, "symbol %s not found in the loaded library", name);
        return -1;
    }
    return 0;
}

#define RESOLVE(lib, name, field, required)                                                  \
    do {                                                                                     \
        void *sym_;                                                                          \
        if (resolve((lib), (name), &sym_, (required), err, errlen) < 0)                      \
            return -1;                                                                       \
        memcpy(&libs->field, &sym_, sizeof(sym_)); /* object to function pointer */          \
    } while (0)

int shampoo_cuda_libs_load(shampoo_cuda_libs *libs, const char *const *cublas_paths,
                           int n_cublas, const char *const *cusolver_paths, int n_cusolver,
                           char *err, size_t errlen)
{
    memset(libs, 0, sizeof(*libs));
    libs->cublas_lib = open_first(cublas_paths, n_cublas, "cuBLAS", err, errlen);
    if (libs->cublas_lib == NULL)
        return -1;
    libs->cusolver_lib = open_first(cusolver_paths, n_cusolver, "cuSOLVER", err, errlen);
    if (libs->cusolver_lib == NULL)
        return -1;
    void *b = libs->cublas_lib, *s = libs->cusolver_lib;
    RESOLVE(b, "cublasCreate_v2", cublas_create, 1);
    RESOLVE(b, "cublasDestroy_v2", cublas_destroy, 1);
    RESOLVE(b, "cublasSetStream_v2", cublas_set_stream, 1);
    RESOLVE(b, "cublasSetWorkspace_v2", cublas_set_workspace, 1);
    RESOLVE(b, "cublasSetMathMode", cublas_set_math_mode, 1);
    RESOLVE(b, "cublasSgemmBatched", sgemm_batched, 1);
    RESOLVE(b, "cublasDgemmBatched", dgemm_batched, 1);
    RESOLVE(b, "cublasSgemmStridedBatched", sgemm_strided, 1);
    RESOLVE(b, "cublasDgemmStridedBatched", dgemm_strided, 1);
    RESOLVE(s, "cusolverDnCreate", cusolver_create, 1);
    RESOLVE(s, "cusolverDnDestroy", cusolver_destroy, 1);
    RESOLVE(s, "cusolverDnSetStream", cusolver_set_stream, 1);
    RESOLVE(s, "cusolverDnSsyevd_bufferSize", ssyevd_buffer, 1);
    RESOLVE(s, "cusolverDnDsyevd_bufferSize", dsyevd_buffer, 1);
    RESOLVE(s, "cusolverDnSsyevd", ssyevd, 1);
    RESOLVE(s, "cusolverDnDsyevd", dsyevd, 1);
    RESOLVE(s, "cusolverDnCreateSyevjInfo", syevj_info_create, 1);
    RESOLVE(s, "cusolverDnDestroySyevjInfo", syevj_info_destroy, 1);
    RESOLVE(s, "cusolverDnSsyevjBatched_bufferSize", ssyevj_batched_buffer, 1);
    RESOLVE(s, "cusolverDnDsyevjBatched_bufferSize", dsyevj_batched_buffer, 1);
    RESOLVE(s, "cusolverDnSsyevjBatched", ssyevj_batched, 1);
    RESOLVE(s, "cusolverDnDsyevjBatched", dsyevj_batched, 1);
    RESOLVE(s, "cusolverDnCreateParams", params_create, 0);
    RESOLVE(s, "cusolverDnDestroyParams", params_destroy, 0);
    RESOLVE(s, "cusolverDnXsyevBatched_bufferSize", xsyev_batched_buffer, 0);
    RESOLVE(s, "cusolverDnXsyevBatched", xsyev_batched, 0);
    if (libs->params_create == NULL || libs->params_destroy == NULL ||
        libs->xsyev_batched_buffer == NULL || libs->xsyev_batched == NULL) {
        libs->xsyev_batched_buffer = NULL;
        libs->xsyev_batched = NULL;
    }
    return 0;
}
