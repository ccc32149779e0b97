/* Eigenbases on the GPU (soap_cuda.h; CPU twin: core/eigenbasis.inc). The host steers as in
 * a root step (matrix_root_cuda.cu), whose planning, factor scan and eigensolvers this reuses:
 *   1. launch_scan_factors flags every active factor (NaN/Inf, off-diagonal entries; with QR
 *      also a nonzero previous basis), and the host reads the flags back and sets the
 *      statuses;
 *   2. one kernel writes the identity for every 1x1 and diagonal factor;
 *   3. the dense factors, grouped by size n, go through cuSOLVER in batches (the root
 *      step's pack into contiguous staging -> eigensolver_cuda.cuh's solve -> the
 *      column-major eigenvectors transposed into the row-major Q of soap.h, column j for the
 *      j-th smallest eigenvalue);
 *   4. float32 factors whose eigensolver failed are redone one by one in float64 (syevd);
 *      with QR, the factors with a previous basis take its warm-started step instead of 3-4
 *      (eigenbasis_qr_cuda.cu);
 *   5. the host reads the solver infos and non-finite flags and writes the statuses.
 * A factor whose eigensolver failed keeps its `out` untouched, as on the CPU. */
#include "eigenbasis_cuda.cuh"

#include <math.h>
#include <stdlib.h>

namespace {

using namespace shampoo_root;
using namespace shampoo_eig;

/* Step 2: Q = I for the 1x1 and diagonal jobs [0, ndiag). */
template <typename real>
__global__ void identity_bases(const int64_t *job_offset, const int64_t *job_n, real *out)
{
    const int64_t j = blockIdx.x, n = job_n[j];
    real *o = out + job_offset[j];
    for (int64_t e = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; e < n * n;
         e += (int64_t)gridDim.y * blockDim.x)
        o[e] = e / n == e % n ? (real)1 : (real)0;
}

/* Step 3c: out[i][j] = eigenvector j's entry i (column-major staging: a[j * n + i]) for the
 * jobs whose solver succeeded; a non-finite entry flags its factor. */
template <typename R, typename S>
__global__ void store_bases(const int64_t *job_offset, const int64_t *job_factor, int64_t first,
                            int64_t n, const R *a, const int *info, S *out, int32_t *flags)
{
    const int64_t j = blockIdx.x;
    if (info[j] != 0)
        return;
    S *o = out + job_offset[first + j];
    const R *q = a + j * n * n;
    for (int64_t e = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; e < n * n;
         e += (int64_t)gridDim.y * blockDim.x) {
        const S v = (S)q[(e % n) * n + e / n];
        o[e] = v;
        if (!isfinite(v))
            atomicOr(&flags[job_factor[first + j]], FLAG_NONFINITE_ROOT);
    }
}

/* Step 3 for jobs [first, first + count) of size n, batch_max at a time. S: the factors'
 * type; R: the solver's (double for the float32 retry). */
template <typename S, typename R>
shampoo_status eigenvectors(const shampoo_cuda_env *env, const S *factors, S *out,
                            const int64_t *job_offset, const int64_t *job_factor, int *info,
                            int64_t first, int64_t count, int64_t n, int64_t batch_max,
                            R *stage, R *w, void *work, size_t work_bytes, void *syevj_params,
                            bool force_syevd, int32_t *flags)
{
    cudaStream_t stream = shampoo_stream(env);
    const solver_kind kind = solver_for(env->libs, n, force_syevd);
    batch_max = batch_max > 0 ? batch_max : 1;
    for (int64_t done = 0; done < count; done += batch_max) {
        const int64_t batch = count - done < batch_max ? count - done : batch_max;
        const int64_t at = first + done;
        const dim3 grid = matrix_grid(batch, n);
        /* no bias correction: the eigenvectors do not depend on it */
        SHAMPOO_TRY((launch_pack<S, R>(stream, grid, job_offset, at, n, factors, false, (S)1,
                                       stage)));
        SHAMPOO_TRY(solve<R>(env, kind, (int)n, (int)batch, stage, w, info + done, work,
                             work_bytes, syevj_params));
        store_bases<R, S><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(
            job_offset, job_factor, at, n, stage, info + done, out, flags);
        SHAMPOO_TRY(SHAMPOO_LAUNCHED("store_bases"));
    }
    return SHAMPOO_OK;
}

/* The root step's host buffers plus the warm-started QR factors' jobs. */
struct basis_host : root_host {
    int64_t *qr_jobs = nullptr; /* offset, n, factor per warm-started QR factor */
    ~basis_host() { free(qr_jobs); }
};

/* The CPU kernel's argument checks (soap.h), host side. */
shampoo_status check_args(const shampoo_eigenbasis_config *cfg, const void *previous,
                          const int64_t *table_host, int64_t nblocks)
{
    if (cfg->method != SHAMPOO_EIGENBASIS_EIGH && cfg->method != SHAMPOO_EIGENBASIS_QR)
        return SHAMPOO_ERR_INVALID_ARG;
    if (cfg->max_iterations < 0 || cfg->max_iterations > SHAMPOO_ROOT_MAX_ITERATIONS ||
        isnan(cfg->tolerance) || (cfg->method == SHAMPOO_EIGENBASIS_QR && previous == NULL))
        return SHAMPOO_ERR_INVALID_ARG;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t *row = shampoo_table_row(table_host, b);
        if (row[SHAMPOO_BF_ORDER] < 0 || row[SHAMPOO_BF_ORDER] > SHAMPOO_MAX_ORDER)
            return SHAMPOO_ERR_INVALID_ARG;
        for (int64_t k = 0; k < row[SHAMPOO_BF_ORDER]; k++)
            if (row[SHAMPOO_BF_DIMS + k] < 0 || row[SHAMPOO_BF_DIMS + k] > DIM_LIMIT)
                return SHAMPOO_ERR_INVALID_ARG;
    }
    return SHAMPOO_OK;
}

/* The root step's workspace, then (QR) the QR step's scratch; ws planned by the caller. */
template <typename real>
shampoo_status workspace_total(const shampoo_cuda_env *env, const int64_t *table_host,
                               int64_t nblocks, int method, const root_workspace &ws,
                               size_t *total)
{
    size_t qr = 0;
    if (method == SHAMPOO_EIGENBASIS_QR)
        SHAMPOO_TRY(shampoo_qr::qr_workspace<real>(env, table_host, nblocks, &qr));
    *total = ws.total + qr;
    return SHAMPOO_OK;
}

template <typename real>
shampoo_status eigenbasis(const shampoo_cuda_env *env, real *out, const real *factors,
                          const real *previous, const int64_t *table,
                          const int64_t *table_host, int64_t nblocks, const uint8_t *active,
                          const shampoo_eigenbasis_config *cfg,
                          uint8_t *is_diagonal, int32_t *status_out)
{
    if (env == NULL || env->libs == NULL || cfg == NULL || nblocks < 0 ||
        (nblocks > 0 && (table == NULL || table_host == NULL || active == NULL)))
        return SHAMPOO_ERR_INVALID_ARG;
    shampoo_status st = check_args(cfg, previous, table_host, nblocks);
    const bool qr = cfg->method == SHAMPOO_EIGENBASIS_QR;
    if (st != SHAMPOO_OK)
        return st;
    basis_host h;
    h.libs = env->libs;
    root_workspace &ws = h.ws;
    if ((st = plan_workspace<real>(env, table_host, nblocks, &ws)) != SHAMPOO_OK)
        return st;
    if (ws.factor_count > 0 &&
        (out == NULL || factors == NULL || is_diagonal == NULL || status_out == NULL))
        return SHAMPOO_ERR_INVALID_ARG;
    if (ws.factor_count == 0 || nblocks == 0)
        return SHAMPOO_OK;
    SHAMPOO_TRY(SHAMPOO_SOLVER_CHECK("cusolverDnSetStream",
                                     env->libs->cusolver_set_stream(env->solver, env->stream)));
    size_t total = 0;
    SHAMPOO_TRY(workspace_total<real>(env, table_host, nblocks, cfg->method, ws, &total));
    if (total > 0 && (env->workspace == NULL || env->workspace_bytes < total))
        return SHAMPOO_ERR_INVALID_ARG;
    void *qr_scratch = (char *)env->workspace + ws.total;
    cudaStream_t stream = shampoo_stream(env);
    /* the root step's regions (matrix_root_cuda.cu); only the first staging buffer is used */
    char *p = (char *)env->workspace;
    int32_t *d_flags = (int32_t *)p;
    int64_t *d_jobs = (int64_t *)(p += ws.flags);
    int *d_info = (int *)(p += ws.jobs);
    real *stage = (real *)(p += ws.info);
    real *d_w = (real *)(p += 3 * ws.stage);
    void *solver_work = (p += ws.w);
    double *retry_a = (double *)(p += ws.solver);
    double *retry_w = (double *)(p += 3 * ws.retry_stage);
    void *retry_work = (p += ws.retry_w);

    int64_t nfactors = 0;
    SHAMPOO_TRY(alloc_host(&h, table_host, nblocks, &nfactors));
    h.qr_jobs = (int64_t *)malloc(3 * (size_t)(nfactors > 0 ? nfactors : 1) * 8);
    if (h.qr_jobs == NULL)
        return SHAMPOO_ERR_NO_MEMORY;
    if (qr)
        SHAMPOO_TRY(shampoo_blas_bind(env));

    /* 1. scan (no bias correction: the eigenvectors do not depend on it) */
    const size_t flag_bytes = (size_t)ws.factor_count * sizeof(int32_t);
    SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemsetAsync, d_flags, 0, flag_bytes, stream));
    SHAMPOO_TRY(launch_scan_factors<real>(stream, table, table_host, nblocks, active, factors,
                                          false, (real)1, d_flags));
    if (qr)
        SHAMPOO_TRY(shampoo_qr::launch_warm_scan<real>(stream, table, table_host, nblocks, active,
                                                       previous, d_flags));
    SHAMPOO_TRY(read_scan(&h, active, is_diagonal, d_flags, nblocks, stream));

    /* statuses and jobs: identity (1x1, diagonal) jobs first, then dense jobs by size */
    const job_arrays job = jobs_in(h.jobs, nfactors), dev = jobs_in(d_jobs, nfactors);
    int64_t njobs = 0, ndiag = 0, nqr = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int64_t f = 0; f < nfactors; f++) {
            const factor_ref r = h.refs[f];
            if (pass == 0 && !scan_status(&h, r, status_out))
                continue;
            if (!h.active[r.block] || r.n == 0 || status_out[r.index] != SHAMPOO_ROOT_OK)
                continue;
            if ((r.n == 1 || h.diagonal[r.index]) != (pass == 0))
                continue;
            if (pass == 1 && qr && (h.flags[r.index] & shampoo_qr::FLAG_WARM)) {
                h.qr_jobs[3 * nqr] = r.offset;
                h.qr_jobs[3 * nqr + 1] = r.n;
                h.qr_jobs[3 * nqr++ + 2] = r.index;
                continue;
            }
            job.offset[njobs] = r.offset;
            job.n[njobs] = r.n;
            job.factor[njobs++] = r.index;
        }
        if (pass == 0)
            ndiag = njobs;
    }
    SHAMPOO_TRY(upload_jobs(&h, nfactors, ndiag, njobs, d_jobs, stream));

    /* 2. identity bases */
    if (ndiag > 0) {
        identity_bases<real><<<matrix_grid(ndiag, widest_job(job.n, ndiag)), SHAMPOO_CUDA_THREADS,
                               0, stream>>>(dev.offset, dev.n, out);
        SHAMPOO_TRY(SHAMPOO_LAUNCHED("identity_bases"));
    }
    /* 3. dense factors, one size at a time; dense job j's info at d_info[j - ndiag] */
    SHAMPOO_TRY(for_each_size(job.n, ndiag, njobs, [&](int64_t j, int64_t end) {
        return eigenvectors<real, real>(env, factors, out, dev.offset, dev.factor,
                                        d_info + (j - ndiag), j, end - j, job.n[j],
                                        planned_batch(&ws, job.n[j]), stage, d_w, solver_work,
                                        ws.solver, h.syevj_params, false, d_flags);
    }));
    const int64_t ndense = njobs - ndiag;
    if (ndense > 0)
        SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, h.info, d_info,
                                       (size_t)ndense * sizeof(int), cudaMemcpyDeviceToHost,
                                       stream));
    SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaStreamSynchronize, stream));

    /* 4. the float64 retry of failed float32 factors, one at a time */
    const bool retry = sizeof(real) == 4 && cfg->retry_double_precision;
    SHAMPOO_TRY(retry_failed(h, ndiag, ndense, job.factor, retry, d_info + ndense, status_out,
                             stream, [&](int64_t j) {
        return eigenvectors<real, double>(env, factors, out, dev.offset, dev.factor,
                                          d_info + ndense, j, 1, job.n[j], 1, retry_a, retry_w,
                                          retry_work, ws.retry_solver, h.syevj_params, true,
                                          d_flags);
    }));
    /* 4'. the warm-started QR factors, one at a time */
    for (int64_t j = 0; j < nqr; j++) {
        const int64_t offset = h.qr_jobs[3 * j], n = h.qr_jobs[3 * j + 1];
        SHAMPOO_TRY(shampoo_qr::qr_basis<real>(env, n, factors + offset, previous + offset,
                                               out + offset, cfg, qr_scratch,
                                               d_flags + h.qr_jobs[3 * j + 2]));
    }
    SHAMPOO_TRY(fetch(h.flags, d_flags, flag_bytes, stream));

    /* 5. non-finite bases (an identity job never flags one), and the updated diagonal flags
     * back to the device */
    for (int64_t j = 0; j < nqr; j++)
        if (h.flags[h.qr_jobs[3 * j + 2]] & FLAG_NONFINITE_ROOT)
            status_out[h.qr_jobs[3 * j + 2]] = SHAMPOO_ROOT_NONFINITE;
    return finish_statuses(h, job.factor, njobs, status_out, is_diagonal, stream);
}

template <typename real>
shampoo_status eigenbasis_workspace(const shampoo_cuda_env *env, const int64_t *table_host,
                                    int64_t nblocks, int method, size_t *bytes)
{
    root_workspace ws;
    shampoo_status st = plan_workspace<real>(env, table_host, nblocks, &ws);
    if (st == SHAMPOO_OK)
        st = workspace_total<real>(env, table_host, nblocks, method, ws, bytes);
    release(&ws);
    return st;
}

} // namespace

extern "C" shampoo_status shampoo_cuda_eigenbasis_workspace(const shampoo_cuda_env *env,
                                                            const int64_t *table_host,
                                                            int64_t nblocks, int real_bytes,
                                                            int method, size_t *bytes)
{
    if (env == NULL || env->libs == NULL || bytes == NULL || nblocks < 0 ||
        (nblocks > 0 && table_host == NULL) || (real_bytes != 4 && real_bytes != 8) ||
        (method != SHAMPOO_EIGENBASIS_EIGH && method != SHAMPOO_EIGENBASIS_QR))
        return SHAMPOO_ERR_INVALID_ARG;
    *bytes = 0;
    SHAMPOO_TRY(SHAMPOO_SOLVER_CHECK("cusolverDnSetStream",
                                     env->libs->cusolver_set_stream(env->solver, env->stream)));
    return real_bytes == 4 ? eigenbasis_workspace<float>(env, table_host, nblocks, method, bytes)
                           : eigenbasis_workspace<double>(env, table_host, nblocks, method, bytes);
}

extern "C" shampoo_status shampoo_cuda_eigenbasis_f32(
    const shampoo_cuda_env *env, float *out, const float *factors, const float *previous,
    const int64_t *table, const int64_t *table_host, int64_t nblocks, const uint8_t *active,
    const shampoo_eigenbasis_config *cfg, uint8_t *is_diagonal, int32_t *status_out)
{
    return eigenbasis<float>(env, out, factors, previous, table, table_host, nblocks, active,
                             cfg, is_diagonal, status_out);
}

extern "C" shampoo_status shampoo_cuda_eigenbasis_f64(
    const shampoo_cuda_env *env, double *out, const double *factors, const double *previous,
    const int64_t *table, const int64_t *table_host, int64_t nblocks, const uint8_t *active,
    const shampoo_eigenbasis_config *cfg, uint8_t *is_diagonal, int32_t *status_out)
{
    return eigenbasis<double>(env, out, factors, previous, table, table_host, nblocks, active,
                              cfg, is_diagonal, status_out);
}
