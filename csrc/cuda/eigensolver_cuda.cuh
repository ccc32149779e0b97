/* cuSOLVER's symmetric eigensolvers as the inverse-root kernels use them (included by
 * matrix_root_cuda.cuh): one overload per type, the choice of solver, buffer sizes, and the
 * size of the batches a group of equal-size factors is solved in. Every failed call is
 * recorded with its status (cuda_common.cuh). */
#ifndef SHAMPOO_EIGENSOLVER_CUDA_CUH
#define SHAMPOO_EIGENSOLVER_CUDA_CUH

#include <limits.h>
#include <stdlib.h>

#include "cuda_common.cuh"

namespace shampoo_eig {

/* Largest size served by syevjBatched (cuSOLVER's limit). */
constexpr int SYEVJ_MAX_N = 32;
/* Elements per staging buffer: larger groups of one size are solved in several batches. */
constexpr int64_t STAGING_CAP = (int64_t)1 << 25;
/* Device bytes the eigensolver's workspace may take for one batch. syevjBatched's workspace
 * is dominated by a per-matrix constant, so a batch sized by matrix elements alone (up to 8 M
 * 2x2 matrices) could need GBs or overflow the int lwork; batches shrink until they fit. */
constexpr size_t SOLVER_BUDGET = (size_t)256 << 20;

inline int syevd_buffer(const shampoo_cuda_libs *l, void *h, int n, const float *a,
                        const float *w, int *lwork)
{
    return l->ssyevd_buffer(h, SHAMPOO_CUSOLVER_EIG_MODE_VECTOR, SHAMPOO_CUBLAS_FILL_UPPER, n,
                            a, n, w, lwork);
}
inline int syevd_buffer(const shampoo_cuda_libs *l, void *h, int n, const double *a,
                        const double *w, int *lwork)
{
    return l->dsyevd_buffer(h, SHAMPOO_CUSOLVER_EIG_MODE_VECTOR, SHAMPOO_CUBLAS_FILL_UPPER, n,
                            a, n, w, lwork);
}
inline int syevd(const shampoo_cuda_libs *l, void *h, int n, float *a, float *w, float *work,
                 int lwork, int *info)
{
    return l->ssyevd(h, SHAMPOO_CUSOLVER_EIG_MODE_VECTOR, SHAMPOO_CUBLAS_FILL_UPPER, n, a, n, w,
                     work, lwork, info);
}
inline int syevd(const shampoo_cuda_libs *l, void *h, int n, double *a, double *w,
                 double *work, int lwork, int *info)
{
    return l->dsyevd(h, SHAMPOO_CUSOLVER_EIG_MODE_VECTOR, SHAMPOO_CUBLAS_FILL_UPPER, n, a, n, w,
                     work, lwork, info);
}
inline int syevj_buffer(const shampoo_cuda_libs *l, void *h, int n, const float *a,
                        const float *w, int *lwork, void *params, int batch)
{
    return l->ssyevj_batched_buffer(h, SHAMPOO_CUSOLVER_EIG_MODE_VECTOR,
                                    SHAMPOO_CUBLAS_FILL_UPPER, n, a, n, w, lwork, params, batch);
}
inline int syevj_buffer(const shampoo_cuda_libs *l, void *h, int n, const double *a,
                        const double *w, int *lwork, void *params, int batch)
{
    return l->dsyevj_batched_buffer(h, SHAMPOO_CUSOLVER_EIG_MODE_VECTOR,
                                    SHAMPOO_CUBLAS_FILL_UPPER, n, a, n, w, lwork, params, batch);
}
inline int syevj(const shampoo_cuda_libs *l, void *h, int n, float *a, float *w, float *work,
                 int lwork, int *info, void *params, int batch)
{
    return l->ssyevj_batched(h, SHAMPOO_CUSOLVER_EIG_MODE_VECTOR, SHAMPOO_CUBLAS_FILL_UPPER, n,
                             a, n, w, work, lwork, info, params, batch);
}
inline int syevj(const shampoo_cuda_libs *l, void *h, int n, double *a, double *w,
                 double *work, int lwork, int *info, void *params, int batch)
{
    return l->dsyevj_batched(h, SHAMPOO_CUSOLVER_EIG_MODE_VECTOR, SHAMPOO_CUBLAS_FILL_UPPER, n,
                             a, n, w, work, lwork, info, params, batch);
}
template <typename real> constexpr int cuda_type()
{
    return sizeof(real) == 8 ? SHAMPOO_CUDA_R_64F : SHAMPOO_CUDA_R_32F;
}
template <typename real> constexpr const char *prefixed(const char *s, const char *d)
{
    return sizeof(real) == 8 ? d : s;
}

/* Which eigensolver serves a batch of n x n matrices. */
enum solver_kind { SOLVER_SYEVJ, SOLVER_XSYEV, SOLVER_SYEVD };

inline solver_kind solver_for(const shampoo_cuda_libs *libs, int64_t n, bool force_syevd)
{
    if (force_syevd)
        return SOLVER_SYEVD;
    if (n <= SYEVJ_MAX_N)
        return SOLVER_SYEVJ;
    return libs->xsyev_batched != NULL ? SOLVER_XSYEV : SOLVER_SYEVD;
}

/* A device pointer stand-in for the buffer-size queries, which only look at sizes. */
template <typename real> real *size_query_pointer()
{
    return (real *)(uintptr_t)256;
}

/* Device bytes the solver needs for `batch` n x n matrices (host bytes for XsyevBatched in
 * *host_bytes). Returns the library status (0: success) and, in *call, the routine's name;
 * nothing is recorded (a failed probe of a large batch is retried smaller). */
template <typename real>
int solver_bytes(const shampoo_cuda_env *env, solver_kind kind, int n, int batch,
                 void *syevj_params, size_t *device_bytes, size_t *host_bytes,
                 const char **call)
{
    const shampoo_cuda_libs *libs = env->libs;
    real *a = size_query_pointer<real>();
    *host_bytes = 0;
    *device_bytes = 0;
    int lwork = 0, rc = 0;
    if (kind == SOLVER_SYEVJ) {
        *call = prefixed<real>("cusolverDnSsyevjBatched_bufferSize",
                               "cusolverDnDsyevjBatched_bufferSize");
        rc = syevj_buffer(libs, env->solver, n, a, a, &lwork, syevj_params, batch);
        *device_bytes = (size_t)(lwork > 0 ? lwork : 0) * sizeof(real);
        if (rc == 0 && lwork < 0)
            rc = -1; /* an overflowed int */
    } else if (kind == SOLVER_SYEVD) {
        *call = prefixed<real>("cusolverDnSsyevd_bufferSize", "cusolverDnDsyevd_bufferSize");
        rc = syevd_buffer(libs, env->solver, n, a, a, &lwork);
        *device_bytes = (size_t)(lwork > 0 ? lwork : 0) * sizeof(real);
        if (rc == 0 && lwork < 0)
            rc = -1;
    } else {
        shampoo_cusolver_params params = NULL;
        *call = "cusolverDnCreateParams";
        rc = libs->params_create(&params);
        if (rc == 0) {
            *call = "cusolverDnXsyevBatched_bufferSize";
            rc = libs->xsyev_batched_buffer(env->solver, params,
                                            SHAMPOO_CUSOLVER_EIG_MODE_VECTOR,
                                            SHAMPOO_CUBLAS_FILL_UPPER, n, cuda_type<real>(), a,
                                            n, cuda_type<real>(), a, cuda_type<real>(),
                                            device_bytes, host_bytes, batch);
        }
        if (params != NULL)
            libs->params_destroy(params);
    }
    return rc;
}

/* The batch size for `count` matrices of size n: as many as the staging cap, the batch-count
 * cap and the solver budget allow (halving until the queried workspace fits; never below
 * one), with that batch's workspace bytes. A query that fails for a single matrix is
 * recorded and returned. */
template <typename real>
shampoo_status solver_batch(const shampoo_cuda_env *env, solver_kind kind, int64_t n,
                            int64_t count, void *syevj_params, int64_t *batch_out,
                            size_t *bytes_out)
{
    const int64_t by_stage = STAGING_CAP / (n * n) > 0 ? STAGING_CAP / (n * n) : 1;
    int64_t batch = count < by_stage ? count : by_stage;
    batch = batch < SHAMPOO_CUDA_MAX_BATCH ? batch : SHAMPOO_CUDA_MAX_BATCH;
    if (kind == SOLVER_SYEVD)
        batch = batch > 0 ? batch : 1; /* one call per matrix: the workspace is per matrix */
    for (;;) {
        size_t bytes = 0, host = 0;
        const char *call = "";
        const int probe = kind == SOLVER_SYEVD ? 1 : (int)batch;
        const int rc = solver_bytes<real>(env, kind, (int)n, probe, syevj_params, &bytes,
                                          &host, &call);
        const bool int_lwork = kind != SOLVER_XSYEV;
        const bool ok = rc == 0 && (!int_lwork || bytes / sizeof(real) <= (size_t)INT_MAX);
        /* syevd's workspace is one matrix's however large the batch */
        const bool single = batch <= 1 || kind == SOLVER_SYEVD;
        if (ok && (bytes <= SOLVER_BUDGET || single)) {
            *batch_out = batch > 0 ? batch : 1;
            *bytes_out = bytes;
            return SHAMPOO_OK;
        }
        if (single) {
            if (rc != 0 && rc != -1)
                return SHAMPOO_SOLVER_CHECK(call, rc);
            return SHAMPOO_ERR_UNSUPPORTED; /* one matrix's workspace overflows int */
        }
        batch = (batch + 1) / 2;
    }
}

/* Eigendecomposition of `batch` contiguous n x n matrices in a (eigenvectors replace them),
 * eigenvalues ascending into w, one info per matrix; work holds work_bytes, at least what
 * solver_batch found for this batch. */
template <typename real>
shampoo_status solve(const shampoo_cuda_env *env, solver_kind kind, int n, int batch, real *a,
                     real *w, int *info, void *work, size_t work_bytes, void *syevj_params)
{
    const shampoo_cuda_libs *libs = env->libs;
    const int lwork = (int)(work_bytes / sizeof(real) < (size_t)INT_MAX
                                ? work_bytes / sizeof(real) : (size_t)INT_MAX);
    if (kind == SOLVER_SYEVJ)
        return SHAMPOO_SOLVER_CHECK(
            prefixed<real>("cusolverDnSsyevjBatched", "cusolverDnDsyevjBatched"),
            syevj(libs, env->solver, n, a, w, (real *)work, lwork, info, syevj_params, batch));
    if (kind == SOLVER_SYEVD) {
        const size_t nn = (size_t)n * (size_t)n;
        for (int i = 0; i < batch; i++)
            SHAMPOO_TRY(SHAMPOO_SOLVER_CHECK(
                prefixed<real>("cusolverDnSsyevd", "cusolverDnDsyevd"),
                syevd(libs, env->solver, n, a + i * nn, w + (size_t)i * n, (real *)work, lwork,
                      info + i)));
        return SHAMPOO_OK;
    }
    size_t need = 0, host_need = 0;
    const char *call = "";
    SHAMPOO_TRY(SHAMPOO_SOLVER_CHECK(call, solver_bytes<real>(env, kind, n, batch, syevj_params,
                                                              &need, &host_need, &call)));
    if (need > work_bytes)
        return SHAMPOO_ERR_INVALID_ARG;
    shampoo_cusolver_params params = NULL;
    void *host = host_need > 0 ? malloc(host_need) : NULL;
    if (host_need > 0 && host == NULL)
        return SHAMPOO_ERR_NO_MEMORY;
    shampoo_status st = SHAMPOO_SOLVER_CHECK("cusolverDnCreateParams",
                                             libs->params_create(&params));
    if (st == SHAMPOO_OK)
        st = SHAMPOO_SOLVER_CHECK(
            "cusolverDnXsyevBatched",
            libs->xsyev_batched(env->solver, params, SHAMPOO_CUSOLVER_EIG_MODE_VECTOR,
                                SHAMPOO_CUBLAS_FILL_UPPER, n, cuda_type<real>(), a, n,
                                cuda_type<real>(), w, cuda_type<real>(), work, work_bytes,
                                host, host_need, info, batch));
    /* the host buffer must outlive the enqueued work */
    const shampoo_status sync = SHAMPOO_CUDA_CHECK(cudaStreamSynchronize, shampoo_stream(env));
    if (params != NULL)
        libs->params_destroy(params);
    free(host);
    return st != SHAMPOO_OK ? st : sync;
}

} // namespace shampoo_eig

#endif
