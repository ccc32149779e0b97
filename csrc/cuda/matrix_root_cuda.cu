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
    SHAMPOO_TRY(alloc_host(&h, table_host, nblocks, &nfactors));
    SHAMPOO_TRY(SHAMPOO_SOLVER_CHECK("cusolverDnSetStream",
                                     env->libs->cusolver_set_stream(env->solver, env->stream)));
    SHAMPOO_TRY(shampoo_blas_bind(env));

    /* 1. scan */
    const bool divide = cfg->bias_correction != 1.0;
    const real bc = (real)cfg->bias_correction;
    const size_t flag_bytes = (size_t)ws.factor_count * sizeof(int32_t);
    SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemsetAsync, d_flags, 0, flag_bytes, stream));
    SHAMPOO_TRY(launch_scan_factors<real>(stream, table, table_host, nblocks, active, factors,
                                          divide, bc, d_flags));
    SHAMPOO_TRY(read_scan(&h, active, is_diagonal, d_flags, nblocks, stream));

    /* statuses and jobs: diagonal/1x1 jobs first, then dense jobs sorted by size */
    const job_arrays job = jobs_in(h.jobs, nfactors), dev = jobs_in(d_jobs, nfactors);
    int64_t njobs = 0, ndiag = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int64_t f = 0; f < nfactors; f++) {
            const factor_ref r = h.refs[f];
            const int64_t root = table_host[r.block * SHAMPOO_BF_COUNT + SHAMPOO_BF_ROOT];
            if (pass == 0) {
                if (!scan_status(&h, r, status_out))
                    continue;
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
            job.offset[njobs] = r.offset;
            job.n[njobs] = r.n;
            job.factor[njobs] = r.index;
            job.alpha[njobs] = alpha;
            njobs++;
        }
        if (pass == 0)
            ndiag = njobs;
    }
    SHAMPOO_TRY(upload_jobs(&h, nfactors, ndiag, njobs, d_jobs, stream));

    /* 2. diagonal and 1x1 factors */
    if (ndiag > 0)
        SHAMPOO_TRY(launch_diagonal_roots<real>(stream, dev.offset, dev.n, dev.factor, dev.alpha,
                                                ndiag, widest_job(job.n, ndiag), factors, divide,
                                                bc, (real)cfg->epsilon, out, d_flags));
    /* 3. dense factors, one size at a time; dense job j's solver info at d_info[j - ndiag] */
    SHAMPOO_TRY(for_each_size(job.n, ndiag, njobs, [&](int64_t j, int64_t end) {
        return eigen_roots<real, real>(env, factors, out, divide, bc, cfg, dev.offset, dev.factor,
                                       dev.alpha, d_info + (j - ndiag), j, end - j, job.n[j],
                                       planned_batch(&ws, job.n[j]), stage_a, stage_qs, stage_x,
                                       d_w, solver_work, ws.solver, h.syevj_params, false,
                                       d_flags);
    }));
    const int64_t ndense = njobs - ndiag;
    if (ndense > 0)
        SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, h.info, d_info,
                                       (size_t)ndense * sizeof(int), cudaMemcpyDeviceToHost,
                                       stream));
    SHAMPOO_TRY(fetch(h.flags, d_flags, flag_bytes, stream));

    /* 4. the float64 retry of failed float32 factors, one at a time */
    const bool retry = sizeof(real) == 4 && cfg->retry_double_precision;
    SHAMPOO_TRY(retry_failed(h, ndiag, ndense, job.factor, retry, d_info + ndense, status_out,
                             stream, [&](int64_t j) {
        return eigen_roots<real, double>(env, factors, out, divide, bc, cfg, dev.offset, dev.factor,
                                         dev.alpha, d_info + ndense, j, 1, job.n[j], 1, retry_a,
                                         retry_qs, retry_x, retry_w, retry_work,
                                         ws.retry_solver, h.syevj_params, true, d_flags);
    }));
    SHAMPOO_TRY(fetch(h.flags, d_flags, flag_bytes, stream));

    /* 5. non-finite roots, and the updated diagonal flags back to the device */
    return finish_statuses(h, job.factor, njobs, status_out, is_diagonal, stream);
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
