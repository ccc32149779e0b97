/* Run-time resolution of cuBLAS and cuSOLVER (cuda_libs.h). */
#define _GNU_SOURCE
#include "cuda_libs.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

/* dlopen()s the first pair whose two libraries both load: cuBLAS and cuSOLVER come from one
 * CUDA release (libcublas.so.13 with libcusolver.so.12, ...), so they are tried as matched
 * pairs, never picked independently. */
static int open_pair(shampoo_cuda_libs *libs, const char *const *cublas_paths,
                     const char *const *cusolver_paths, int n, char *err, size_t errlen)
{
    const char *last = "no candidate pair was given";
    char failed[256] = "";
    for (int i = 0; i < n; i++) {
        /* RTLD_GLOBAL: cuSOLVER resolves some cuBLAS symbols through the global scope */
        void *blas = dlopen(cublas_paths[i], RTLD_NOW | RTLD_GLOBAL);
        if (blas == NULL) {
            last = dlerror();
            snprintf(failed, sizeof failed, "%s", cublas_paths[i]);
            continue;
        }
        void *solver = dlopen(cusolver_paths[i], RTLD_NOW | RTLD_GLOBAL);
        if (solver == NULL) {
            last = dlerror();
            snprintf(failed, sizeof failed, "%s", cusolver_paths[i]);
            dlclose(blas);
            continue;
        }
        libs->cublas_lib = blas;
        libs->cusolver_lib = solver;
        return 0;
    }
    snprintf(err, errlen,
             "could not load a matching cuBLAS/cuSOLVER pair (tried %d pairs; last failure: "
             "%s: %s)", n, failed[0] ? failed : "-", last != NULL ? last : "unknown");
    return -1;
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
                           const char *const *cusolver_paths, int npairs, char *err,
                           size_t errlen)
{
    memset(libs, 0, sizeof(*libs));
    if (open_pair(libs, cublas_paths, cusolver_paths, npairs, err, errlen) < 0)
        return -1;
    void *b = libs->cublas_lib, *s = libs->cusolver_lib;
#define SHAMPOO_RESOLVE_(lib, symbol, field, required) RESOLVE(lib, #symbol, field, required);
    SHAMPOO_CUDA_LIB_SYMBOLS(SHAMPOO_RESOLVE_)
#undef SHAMPOO_RESOLVE_
    if (libs->params_create == NULL || libs->params_destroy == NULL ||
        libs->xsyev_batched_buffer == NULL || libs->xsyev_batched == NULL) {
        libs->xsyev_batched_buffer = NULL;
        libs->xsyev_batched = NULL;
    }
    return 0;
}

#define SHAMPOO_STATUS_CASE_(value, name)                                                    \
    case value:                                                                              \
        return #name;

const char *shampoo_cublas_status_name(int status)
{
    switch (status) {
        SHAMPOO_CUBLAS_STATUSES(SHAMPOO_STATUS_CASE_)
    default:
        return "unknown status";
    }
}

const char *shampoo_cusolver_status_name(int status)
{
    switch (status) {
        SHAMPOO_CUSOLVER_STATUSES(SHAMPOO_STATUS_CASE_)
    default:
        return "unknown status";
    }
}
