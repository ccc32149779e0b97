/* Internal interface of the inverse-root kernels (matrix_root_cuda.cu steers a root step;
 * matrix_root_plan.cu sizes its workspace and orders its jobs; matrix_root_batch.cu holds the
 * device kernels and the batched eigen roots; root_host_cuda.cu the host side that the
 * eigenbasis call, eigenbasis_cuda.cu, shares). Not part of shampoo_cuda.h. */
#ifndef SHAMPOO_MATRIX_ROOT_CUDA_CUH
#define SHAMPOO_MATRIX_ROOT_CUDA_CUH

#include "eigensolver_cuda.cuh"

#include <stdlib.h>

namespace shampoo_root {

enum { FLAG_NAN = 1, FLAG_INF = 2, FLAG_OFFDIAG = 4, FLAG_NONFINITE_ROOT = 8 };
/* The largest n with n * n <= INT_MAX (cuSOLVER's legacy API takes int sizes). */
constexpr int64_t DIM_LIMIT = 46340;

/* Copies device -> host and waits (a root step or an eigenbasis call synchronises anyway). */
static inline shampoo_status fetch(void *host, const void *device, size_t bytes,
                                   cudaStream_t stream)
{
    if (bytes > 0)
        SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, host, device, bytes,
                                       cudaMemcpyDeviceToHost, stream));
    return SHAMPOO_CUDA_CHECK(cudaStreamSynchronize, stream);
}

/* Grid of one thread block row per matrix and chunks of its n*n elements. */
static inline dim3 matrix_grid(int64_t matrices, int64_t n)
{
    int64_t chunks = (n * n + SHAMPOO_CUDA_THREADS - 1) / SHAMPOO_CUDA_THREADS;
    chunks = chunks < SHAMPOO_CUDA_MAX_GRID_Y ? chunks : SHAMPOO_CUDA_MAX_GRID_Y;
    return dim3((unsigned)matrices, (unsigned)(chunks > 0 ? chunks : 1));
}

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
/* Step 3a (also of an eigenbasis call, divide = false): copies of jobs first.., F / bc
 * computed in S when divide, into contiguous n x n slots of type R; launched and checked
 * (cuSOLVER reads them next). */
template <typename S, typename R>
shampoo_status launch_pack(cudaStream_t stream, dim3 grid, const int64_t *job_offset,
                           int64_t first, int64_t n, const S *factors, bool divide, S bc,
                           R *staging);
/* Step 3 for jobs [first, first + count) of size n, batch_max at a time. */
template <typename S, typename R>
shampoo_status eigen_roots(const shampoo_cuda_env *env, const S *factors, S *out, bool divide,
                           S bc, const shampoo_root_config *cfg, const int64_t *job_offset,
                           const int64_t *job_factor, const double *job_alpha, int *info,
                           int64_t first, int64_t count, int64_t n, int64_t batch_max,
                           R *stage_a, R *stage_qs, R *stage_x, R *w, void *solver_work,
                           size_t solver_work_bytes, void *syevj_params, bool force_syevd,
                           int32_t *flags);

/* A call's job arrays, laid out one after another in one buffer of 4 x nfactors int64 slots
 * (the host's root_host::jobs, or its copy in the device workspace): offset, n and factor
 * index per job, then its exponent alpha (as doubles). */
struct job_arrays {
    int64_t *offset, *n, *factor;
    double *alpha;
};

static inline job_arrays jobs_in(int64_t *base, int64_t nfactors)
{
    return {base, base + nfactors, base + 2 * nfactors, (double *)(base + 3 * nfactors)};
}

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

/* ---- root_host_cuda.cu: the host steps a root step and an eigenbasis call share */

/* The host buffers of a call on this table (h->ws planned, h->libs set; jobs zeroed) and
 * the syevj parameters; *nfactors: the table's factor count. */
shampoo_status alloc_host(root_host *h, const int64_t *table_host, int64_t nblocks,
                          int64_t *nfactors);
/* After the scan kernel: the active mask, diagonal flags and scan flags to the host; waits. */
shampoo_status read_scan(root_host *h, const uint8_t *active, const uint8_t *is_diagonal,
                         const int32_t *d_flags, int64_t nblocks, cudaStream_t stream);
/* Factor r's status from the scan (INACTIVE, OK, FACTOR_NAN / FACTOR_INF), clearing its
 * diagonal flag where the scan saw an off-diagonal entry. True when r may become a job
 * (active, n >= 1, finite). */
bool scan_status(root_host *h, const factor_ref &r, int32_t *status_out);
/* The dense jobs [ndiag, njobs) of h->jobs sorted by size, so that each size is one
 * contiguous range (stable: table order), and all four job arrays (nfactors each) to d_jobs. */
shampoo_status upload_jobs(root_host *h, int64_t nfactors, int64_t ndiag, int64_t njobs,
                           int64_t *d_jobs, cudaStream_t stream);
/* The largest n of jobs [0, count), at least 1 (the diagonal kernels' grid). */
int64_t widest_job(const int64_t *job_n, int64_t count);
/* The last statuses: each of jobs [0, njobs) whose result has a non-finite entry (h.flags
 * fetched) is NONFINITE unless it failed; then the (updated) diagonal flags back to the
 * device, and waits. */
shampoo_status finish_statuses(const root_host &h, const int64_t *job_factor, int64_t njobs,
                               int32_t *status_out, uint8_t *is_diagonal, cudaStream_t stream);

/* Calls run(first, end) for each run [first, end) of equal job_n in [begin, njobs) (dense
 * jobs are sorted by size) and stops at the first status that is not SHAMPOO_OK. */
template <typename Run>
shampoo_status for_each_size(const int64_t *job_n, int64_t begin, int64_t njobs, Run run)
{
    for (int64_t j = begin; j < njobs;) {
        int64_t end = j;
        while (end < njobs && job_n[end] == job_n[j])
            end++;
        SHAMPOO_TRY(run(j, end));
        j = end;
    }
    return SHAMPOO_OK;
}

/* Step 4: each dense job j = ndiag + d whose solve failed (h.info[d] > 0, fetched) is
 * FAILED; where `retry` (float32 factors, retry_double_precision) it is redone alone in
 * float64 by redo(j), which leaves its solver info at *d_retry_info, and is RETRIED_DOUBLE
 * when that succeeds. A negative info is a bad argument to the solver: SHAMPOO_ERR_LINALG. */
template <typename Redo>
shampoo_status retry_failed(const root_host &h, int64_t ndiag, int64_t ndense,
                            const int64_t *job_factor, bool retry, const int *d_retry_info,
                            int32_t *status_out, cudaStream_t stream, Redo redo)
{
    for (int64_t d = 0; d < ndense; d++) {
        const int64_t j = ndiag + d;
        if (h.info[d] < 0)
            return SHAMPOO_ERR_LINALG;
        if (h.info[d] == 0)
            continue;
        status_out[job_factor[j]] = SHAMPOO_ROOT_FAILED;
        if (!retry)
            continue;
        SHAMPOO_TRY(redo(j));
        int retry_info = 0;
        SHAMPOO_TRY(fetch(&retry_info, d_retry_info, sizeof(int), stream));
        if (retry_info < 0)
            return SHAMPOO_ERR_LINALG;
        if (retry_info == 0)
            status_out[job_factor[j]] = SHAMPOO_ROOT_RETRIED_DOUBLE;
    }
    return SHAMPOO_OK;
}

} // namespace shampoo_root

#endif
