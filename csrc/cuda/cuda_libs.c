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
