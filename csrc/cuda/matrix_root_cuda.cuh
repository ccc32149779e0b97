/* Internal interface of the inverse-root kernels (matrix_root_cuda.cu steers a root step;
 * matrix_root_plan.cu sizes its workspace and orders its jobs; matrix_root_batch.cu holds the
 * device kernels and the batched eigen roots). Not part of shampoo_cuda.h. */
#ifndef SHAMPOO_MATRIX_ROOT_CUDA_CUH
#define SHAMPOO_MATRIX_ROOT_CUDA_CUH

#include "eigensolver_cuda.cuh"

#include <stdlib.h>

namespace shampoo_root {

enum { FLAG_NAN = 1, FLAG_INF = 2, FLAG_OFFDIAG = 4, FLAG_NONFINITE_ROOT = 8 };
/* The largest n with n * n <= INT_MAX (cuSOLVER's legacy API takes int sizes). */
constexpr int64_t DIM_LIMIT = 46340;

/* Where factor k of block b sits, host side. */
struct factor_ref {
    int64_t block, n, offset, index;
};

/* Device workspace regions, in bytes, sized from the table alone (every factor of size >= 2
 * counted as dense), so the caller can allocate before the call; and the batch size of each
 * factor size, found once from cuSOLVER's buffer sizes (solver_batch). */
struct root_workspace {
    size_t flags, jobs, info, stage, w, solver, retry_stage, retry_w, retry_solver, total;
    int64_t factor_count, max_n;
    int64_t nsizes;
    int64_t *size_n, *size_batch; /* nsizes each, ascending n; free with release() */
};

/* ---- matrix_root_plan.cu */

void release(root_workspace *ws);
/* The planned batch for factors of size n (1 when n was not planned). */
int64_t planned_batch(const root_workspace *ws, int64_t n);
/* All factors of the table, host side, and the factor count (free() the result). */
factor_ref *list_factors(const int64_t *table_host, int64_t nblocks, int64_t *count);
/* The workspace of a root step on this table (float and double instances). */
template <typename real>
shampoo_status plan_workspace(const shampoo_cuda_env *env, const int64_t *table_host,
                              int64_t nblocks, root_workspace *ws);
/* Sorts jobs [first, end) of the four job arrays by size, stably (table order within a
 * size), in O(n log n). Returns false when out of memory. */
bool sort_dense_jobs(int64_t *offset, int64_t *n, int64_t *factor, double *alpha,
                     int64_t first, int64_t end);

/* ---- matrix_root_batch.cu (float and double instances; eigen_roots also <float, double>) */

/* Step 1: flags of every active factor (FLAG_*), launched and checked. */
template <typename real>
shampoo_status launch_scan_factors(cudaStream_t stream, const int64_t *table,
                                   const int64_t *table_host, int64_t nblocks,
                                   const uint8_t *active, const real *factors, bool divide,
                                   real bc, int32_t *flags);
/* Step 2: the roots of diagonal and 1x1 jobs [0, ndiag), launched and checked. */
template <typename real>
shampoo_status launch_diagonal_roots(cudaStream_t stream, const int64_t *job_offset,
                                     const int64_t *job_n, const int64_t *job_factor,
                                     const double *job_alpha, int64_t ndiag, int64_t widest,
                                     const real *factors, bool divide, real bc, real epsilon,
                                     real *out, int32_t *flags);
/* Step 3 for jobs [first, first + count) of size n, batch_max at a time. */
template <typename S, typename R>
shampoo_status eigen_roots(const shampoo_cuda_env *env, const S *factors, S *out, bool divide,
                           S bc, const shampoo_root_config *cfg, const int64_t *job_offset,
                           const int64_t *job_factor, const double *job_alpha, int *info,
                           int64_t first, int64_t count, int64_t n, int64_t batch_max,
                           R *stage_a, R *stage_qs, R *stage_x, R *w, void *solver_work,
                           size_t solver_work_bytes, void *syevj_params, bool force_syevd,
                           int32_t *flags);

/* The host side of one root (or eigenbasis) call: every buffer it allocates, freed in one
   place. */
struct root_host {
    factor_ref *refs = nullptr;
    uint8_t *active = nullptr, *diagonal = nullptr;
    int32_t *flags = nullptr;
    int *info = nullptr;
    int64_t *jobs = nullptr; /* offset, n, factor: 3 x nfactors, then alpha (as doubles) if used */
    void *syevj_params = nullptr;
    const shampoo_cuda_libs *libs = nullptr;
    root_workspace ws = {};
    ~root_host()
    {
        release(&ws);
        if (syevj_params != nullptr)
            libs->syevj_info_destroy(syevj_params);
        free(refs);
        free(active);
        free(diagonal);
        free(flags);
        free(info);
        free(jobs);
    }
};

} // namespace shampoo_root

#endif
