/* Inverse roots on the GPU (shampoo_cuda.h; CPU twin: core/matrix_root.inc, eigen method).
 * A root step may synchronise, and the statuses are host data, so the host steers:
 *   1. one kernel scans every active factor (NaN/Inf after bias correction, off-diagonal
 *      entries), and the host reads the flags back;
 *   2. one kernel computes every 1x1 and diagonal factor's root (SPEC §5.2);
 *   3. the remaining (dense) factors, grouped by size n, go through cuSOLVER in batches:
 *      pack (bias-corrected copies, contiguous) -> eigendecomposition (syevjBatched for
 *      n <= 32; XsyevBatched where the library has it; else one syevd per factor) -> scale
 *      the eigenvectors by (lambda [- min(lambda_min, 0)] + epsilon)^alpha -> one strided
 *      batched GEMM X = Q diag(s) Q^T -> unpack into `out`;
 *   4. float32 factors whose eigensolver failed are redone one by one in float64 (syevd);
 *   5. the host reads the solver infos and non-finite flags and writes the statuses.
 * Planning is in matrix_root_plan.cu; the kernels and step 3 in matrix_root_batch.cu. */
#include "matrix_root_cuda.cuh"

#include <math.h>
#include <stdlib.h>

namespace {

using namespace shampoo_root;

/* Copies device -> host and waits (a root step synchronises anyway). */
shampoo_status fetch(void *host, const void *device, size_t bytes, cudaStream_t stream)
{
    if (bytes > 0)
        SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, host, device, bytes,
                                       cudaMemcpyDeviceToHost, stream));
    return SHAMPOO_CUDA_CHECK(cudaStreamSynchronize, stream);
}

bool config_ok(const shampoo_root_config *cfg)
{
    return isfinite(cfg->bias_correction) && cfg->bias_correction != 0.0 &&
           !isnan(cfg->epsilon) && !isnan(cfg->exponent_multiplier);
}

template <typename real>
shampoo_status root_inverse(const shampoo_cuda_env *env, real *out, const real *factors,
                            const int64_t *table, const int64_t *table_host, int64_t nblocks,
                            const uint8_t *active, const shampoo_root_config *cfg,
                            uint8_t *is_diagonal, int32_t *status_out)
{
    if (env == NULL || env->libs == NULL || cfg == NULL || nblocks < 0 ||
        (nblocks > 0 && (table == NULL || table_host == NULL || active == NULL)) ||
        !config_ok(cfg))
        return SHAMPOO_ERR_INVALID_ARG;
    if (cfg->method != SHAMPOO_ROOT_EIGEN)
        return SHAMPOO_ERR_UNSUPPORTED;
    root_host h;
    h.libs = env->libs;
    root_workspace &ws = h.ws;
    shampoo_status st = plan_workspace<real>(env, table_host, nblocks, &ws);
    if (st != SHAMPOO_OK)
        return st;
    if (ws.factor_count > 0 &&
        (out == NULL || factors == NULL || is_diagonal == NULL || status_out == NULL))
        return SHAMPOO_ERR_INVALID_ARG;
    if (ws.factor_count == 0 || nblocks == 0)
        return SHAMPOO_OK;
    if (ws.total > 0 && (env->workspace == NULL || env->workspace_bytes < ws.total))
        return SHAMPOO_ERR_INVALID_ARG;
    cudaStream_t stream = shampoo_stream(env);
    char *p = (char *)env->workspace;
    int32_t *d_flags = (int32_t *)p;
    p += ws.flags;
    int64_t *d_jobs = (int64_t *)p;
    p += ws.jobs;
    int *d_info = (int *)p;
    p += ws.info;
    real *stage_a = (real *)p, *stage_qs = (real *)(p + ws.stage), *stage_x = (real *)(p + 2 * ws.stage);
    p += 3 * ws.stage;
    real *d_w = (real *)p;
    p += ws.w;
    void *solver_work = p;
    p += ws.solver;
    double *retry_a = (double *)p, *retry_qs = (double *)(p + ws.retry_stage);
    double *retry_x = (double *)(p + 2 * ws.retry_stage);
    p += 3 * ws.retry_stage;
    double *retry_w = (double *)p;
    p += ws.retry_w;
    void *retry_work = p;

    int64_t nfactors = 0;
    h.refs = list_factors(table_host, nblocks, &nfactors);
    h.active = (uint8_t *)malloc((size_t)nblocks);
    h.diagonal = (uint8_t *)malloc((size_t)ws.factor_count);
    h.flags = (int32_t *)malloc((size_t)ws.factor_count * sizeof(int32_t));
    h.info = (int *)malloc((size_t)(nfactors + 1) * sizeof(int));
    h.jobs = (int64_t *)malloc(4 * (size_t)(nfactors > 0 ? nfactors : 1) * 8);
    if (h.refs == NULL || h.active == NULL || h.diagonal == NULL || h.flags == NULL ||
        h.info == NULL || h.jobs == NULL)
        return SHAMPOO_ERR_NO_MEMORY;
    SHAMPOO_TRY(SHAMPOO_SOLVER_CHECK("cusolverDnCreateSyevjInfo",
                                     env->libs->syevj_info_create(&h.syevj_params)));
    SHAMPOO_TRY(SHAMPOO_SOLVER_CHECK("cusolverDnSetStream",
                                     env->libs->cusolver_set_stream(env->solver, env->stream)));
    SHAMPOO_TRY(shampoo_blas_bind(env));

    /* 1. scan */
    const bool divide = cfg->bias_correction != 1.0;
    const real bc = (real)cfg->bias_correction;
    SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemsetAsync, d_flags, 0,
                                   (size_t)ws.factor_count * sizeof(int32_t), stream));
    SHAMPOO_TRY(launch_scan_factors<real>(stream, table, table_host, nblocks, active, factors,
                                          divide, bc, d_flags));
    SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, h.active, active, (size_t)nblocks,
                                   cudaMemcpyDeviceToHost, stream));
    SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, h.diagonal, is_diagonal,
                                   (size_t)ws.factor_count, cudaMemcpyDeviceToHost, stream));
    if ((st = fetch(h.flags, d_flags, (size_t)ws.factor_count * sizeof(int32_t), stream)) !=
        SHAMPOO_OK)
        return st;

    /* statuses and jobs: diagonal/1x1 jobs first, then dense jobs sorted by size */
    int64_t *job_offset = h.jobs, *job_n = h.jobs + nfactors, *job_factor = h.jobs + 2 * nfactors;
    double *job_alpha = (double *)(h.jobs + 3 * nfactors);
    int64_t njobs = 0, ndiag = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int64_t f = 0; f < nfactors; f++) {
            const factor_ref r = h.refs[f];
            const int64_t root = table_host[r.block * SHAMPOO_BF_COUNT + SHAMPOO_BF_ROOT];
            if (pass == 0) {
                if (!h.active[r.block]) {
                    status_out[r.index] = SHAMPOO_ROOT_INACTIVE;
                    continue;
                }
                status_out[r.index] = SHAMPOO_ROOT_OK;
                if (r.n == 0)
                    continue;
                if (h.diagonal[r.index] && (h.flags[r.index] & FLAG_OFFDIAG))
                    h.diagonal[r.index] = 0;
                if (h.flags[r.index] & (FLAG_NAN | FLAG_INF)) {
                    status_out[r.index] = (h.flags[r.index] & FLAG_NAN) ? SHAMPOO_ROOT_FACTOR_NAN
                                                                        : SHAMPOO_ROOT_FACTOR_INF;
                    continue;
                }
                if (root < 1) {
                    status_out[r.index] = SHAMPOO_ROOT_FAILED; /* as the reference raises */
                    continue;
                }
            }
            if (!h.active[r.block] || r.n == 0 || status_out[r.index] != SHAMPOO_ROOT_OK)
                continue;
            const bool simple = r.n == 1 || h.diagonal[r.index];
            if (simple != (pass == 0))
                continue;
            double alpha = -cfg->exponent_multiplier / (double)root;
            if (r.n == 1)
                alpha = (double)(float)alpha; /* SPEC §4.12: a float32 exponent */
            job_offset[njobs] = r.offset;
            job_n[njobs] = r.n;
            job_factor[njobs] = r.index;
            job_alpha[njobs] = alpha;
            njobs++;
        }
        if (pass == 0)
            ndiag = njobs;
    }
    /* dense jobs sorted by size, so each size is one contiguous range (stable: table order) */
    if (!sort_dense_jobs(job_offset, job_n, job_factor, job_alpha, ndiag, njobs))
        return SHAMPOO_ERR_NO_MEMORY;
    if (njobs > 0)
        SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, d_jobs, h.jobs, 4 * (size_t)nfactors * 8,
                                       cudaMemcpyHostToDevice, stream));
    const int64_t *d_offset = d_jobs, *d_n = d_jobs + nfactors, *d_factor = d_jobs + 2 * nfactors;
    const double *d_alpha = (const double *)(d_jobs + 3 * nfactors);

    /* 2. diagonal and 1x1 factors */
    if (ndiag > 0) {
        int64_t widest = 1;
        for (int64_t j = 0; j < ndiag; j++)
            widest = job_n[j] > widest ? job_n[j] : widest;
        SHAMPOO_TRY(launch_diagonal_roots<real>(stream, d_offset, d_n, d_factor, d_alpha,
                                                ndiag, widest, factors, divide, bc,
                                                (real)cfg->epsilon, out, d_flags));
    }
    /* 3. dense factors, one size at a time; infos indexed by dense job */
    for (int64_t j = ndiag; j < njobs;) {
        int64_t end = j;
        while (end < njobs && job_n[end] == job_n[j])
            end++;
        st = eigen_roots<real, real>(env, factors, out, divide, bc, cfg, d_offset, d_factor,
                                     d_alpha, d_info + (j - ndiag), j, end - j, job_n[j],
                                     planned_batch(&ws, job_n[j]), stage_a, stage_qs,
                                     stage_x, d_w, solver_work, ws.solver, h.syevj_params,
                                     false, d_flags);
        if (st != SHAMPOO_OK)
            return st;
        j = end;
    }
    /* dense job j's solver info sits at d_info[j - ndiag] */
    const int64_t ndense = njobs - ndiag;
    if (ndense > 0)
        SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, h.info, d_info,
                                       (size_t)ndense * sizeof(int), cudaMemcpyDeviceToHost,
                                       stream));
    if ((st = fetch(h.flags, d_flags, (size_t)ws.factor_count * sizeof(int32_t), stream)) !=
        SHAMPOO_OK)
        return st;

    /* 4. the float64 retry of failed float32 factors, one at a time */
    for (int64_t d = 0; d < ndense; d++) {
        const int64_t j = ndiag + d;
        if (h.info[d] < 0)
            return SHAMPOO_ERR_LINALG;
        if (h.info[d] == 0)
            continue;
        status_out[job_factor[j]] = SHAMPOO_ROOT_FAILED;
        if (sizeof(real) != 4 || !cfg->retry_double_precision)
            continue;
        st = eigen_roots<real, double>(env, factors, out, divide, bc, cfg, d_offset, d_factor,
                                       d_alpha, d_info + ndense, j, 1, job_n[j], 1, retry_a,
                                       retry_qs, retry_x, retry_w, retry_work, ws.retry_solver,
                                       h.syevj_params, true, d_flags);
        if (st != SHAMPOO_OK)
            return st;
        int retry_info = 0;
        if ((st = fetch(&retry_info, d_info + ndense, sizeof(int), stream)) != SHAMPOO_OK)
            return st;
        if (retry_info < 0)
            return SHAMPOO_ERR_LINALG;
        if (retry_info == 0)
            status_out[job_factor[j]] = SHAMPOO_ROOT_RETRIED_DOUBLE;
    }
    if ((st = fetch(h.flags, d_flags, (size_t)ws.factor_count * sizeof(int32_t), stream)) !=
        SHAMPOO_OK)
        return st;

    /* 5. non-finite roots, and the updated diagonal flags back to the device */
    for (int64_t j = 0; j < njobs; j++) {
        int32_t *s = &status_out[job_factor[j]];
        if (*s != SHAMPOO_ROOT_FAILED && (h.flags[job_factor[j]] & FLAG_NONFINITE_ROOT))
            *s = SHAMPOO_ROOT_NONFINITE;
    }
    SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, is_diagonal, h.diagonal,
                                   (size_t)ws.factor_count, cudaMemcpyHostToDevice, stream));
    return SHAMPOO_CUDA_CHECK(cudaStreamSynchronize, stream);
}

} // namespace

extern "C" shampoo_status shampoo_cuda_root_inverse_workspace(const shampoo_cuda_env *env,
                                                              const int64_t *table_host,
                                                              int64_t nblocks, int real_bytes,
                                                              size_t *bytes)
{
    if (env == NULL || env->libs == NULL || bytes == NULL || nblocks < 0 ||
        (nblocks > 0 && table_host == NULL) || (real_bytes != 4 && real_bytes != 8))
        return SHAMPOO_ERR_INVALID_ARG;
    SHAMPOO_TRY(SHAMPOO_SOLVER_CHECK("cusolverDnSetStream",
                                     env->libs->cusolver_set_stream(env->solver, env->stream)));
    root_workspace ws;
    shampoo_status st = real_bytes == 4 ? plan_workspace<float>(env, table_host, nblocks, &ws)
                                        : plan_workspace<double>(env, table_host, nblocks, &ws);
    *bytes = st == SHAMPOO_OK ? ws.total : 0;
    release(&ws);
    return st;
}

extern "C" shampoo_status shampoo_cuda_root_inverse_f32(
    const shampoo_cuda_env *env, float *out, const float *factors, const int64_t *table,
    const int64_t *table_host, int64_t nblocks, const uint8_t *active,
    const shampoo_root_config *cfg, uint8_t *is_diagonal, int32_t *status_out)
{
    return root_inverse<float>(env, out, factors, table, table_host, nblocks, active, cfg,
                               is_diagonal, status_out);
}

extern "C" shampoo_status shampoo_cuda_root_inverse_f64(
    const shampoo_cuda_env *env, double *out, const double *factors, const int64_t *table,
    const int64_t *table_host, int64_t nblocks, const uint8_t *active,
    const shampoo_root_config *cfg, uint8_t *is_diagonal, int32_t *status_out)
{
    return root_inverse<double>(env, out, factors, table, table_host, nblocks, active, cfg,
                                is_diagonal, status_out);
}
