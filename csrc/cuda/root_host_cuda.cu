/* The host side that a root step (matrix_root_cuda.cu) and an eigenbasis call
 * (eigenbasis_cuda.cu) share (matrix_root_cuda.cuh): the host buffers, the scan's flags read
 * back, the statuses they imply, and the last statuses with the diagonal flags sent back.
 * Both calls read the same scan flags and report through the same statuses, so both write
 * them here. */
#include "matrix_root_cuda.cuh"

#include <stdlib.h>

namespace shampoo_root {

shampoo_status alloc_host(root_host *h, const int64_t *table_host, int64_t nblocks,
                          int64_t *nfactors)
{
    h->refs = list_factors(table_host, nblocks, nfactors);
    const size_t count = (size_t)h->ws.factor_count;
    const size_t jobs = (size_t)(*nfactors > 0 ? *nfactors : 1);
    h->active = (uint8_t *)malloc((size_t)nblocks);
    h->diagonal = (uint8_t *)malloc(count);
    h->flags = (int32_t *)malloc(count * sizeof(int32_t));
    h->info = (int *)malloc((size_t)(*nfactors + 1) * sizeof(int));
    h->jobs = (int64_t *)calloc(4 * jobs, 8); /* offset, n, factor, alpha per job */
    if (h->refs == NULL || h->active == NULL || h->diagonal == NULL || h->flags == NULL ||
        h->info == NULL || h->jobs == NULL)
        return SHAMPOO_ERR_NO_MEMORY;
    return SHAMPOO_SOLVER_CHECK("cusolverDnCreateSyevjInfo",
                                h->libs->syevj_info_create(&h->syevj_params));
}

shampoo_status read_scan(root_host *h, const uint8_t *active, const uint8_t *is_diagonal,
                         const int32_t *d_flags, int64_t nblocks, cudaStream_t stream)
{
    SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, h->active, active, (size_t)nblocks,
                                   cudaMemcpyDeviceToHost, stream));
    SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, h->diagonal, is_diagonal,
                                   (size_t)h->ws.factor_count, cudaMemcpyDeviceToHost, stream));
    return fetch(h->flags, d_flags, (size_t)h->ws.factor_count * sizeof(int32_t), stream);
}

bool scan_status(root_host *h, const factor_ref &r, int32_t *status_out)
{
    if (!h->active[r.block]) {
        status_out[r.index] = SHAMPOO_ROOT_INACTIVE;
        return false;
    }
    status_out[r.index] = SHAMPOO_ROOT_OK;
    if (r.n == 0)
        return false;
    if (h->diagonal[r.index] && (h->flags[r.index] & FLAG_OFFDIAG))
        h->diagonal[r.index] = 0;
    if (h->flags[r.index] & (FLAG_NAN | FLAG_INF)) {
        status_out[r.index] =
            (h->flags[r.index] & FLAG_NAN) ? SHAMPOO_ROOT_FACTOR_NAN : SHAMPOO_ROOT_FACTOR_INF;
        return false;
    }
    return true;
}

shampoo_status upload_jobs(root_host *h, int64_t nfactors, int64_t ndiag, int64_t njobs,
                           int64_t *d_jobs, cudaStream_t stream)
{
    const job_arrays job = jobs_in(h->jobs, nfactors);
    if (!sort_dense_jobs(job.offset, job.n, job.factor, job.alpha, ndiag, njobs))
        return SHAMPOO_ERR_NO_MEMORY;
    if (njobs == 0)
        return SHAMPOO_OK;
    return SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, d_jobs, h->jobs, 4 * (size_t)nfactors * 8,
                              cudaMemcpyHostToDevice, stream);
}

int64_t widest_job(const int64_t *job_n, int64_t count)
{
    int64_t widest = 1;
    for (int64_t j = 0; j < count; j++)
        widest = job_n[j] > widest ? job_n[j] : widest;
    return widest;
}

shampoo_status finish_statuses(const root_host &h, const int64_t *job_factor, int64_t njobs,
                               int32_t *status_out, uint8_t *is_diagonal, cudaStream_t stream)
{
    for (int64_t j = 0; j < njobs; j++) {
        int32_t *s = &status_out[job_factor[j]];
        if (*s != SHAMPOO_ROOT_FAILED && (h.flags[job_factor[j]] & FLAG_NONFINITE_ROOT))
            *s = SHAMPOO_ROOT_NONFINITE;
    }
    SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, is_diagonal, h.diagonal,
                                   (size_t)h.ws.factor_count, cudaMemcpyHostToDevice, stream));
    return SHAMPOO_CUDA_CHECK(cudaStreamSynchronize, stream);
}

} // namespace shampoo_root
