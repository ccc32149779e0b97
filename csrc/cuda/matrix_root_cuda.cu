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
 *   5. the host reads the solver infos and non-finite flags and writes the statuses. */
#include "cuda_common.cuh"

#include <math.h>
#include <stdlib.h>
#include <string.h>

namespace {

enum { FLAG_NAN = 1, FLAG_INF = 2, FLAG_OFFDIAG = 4, FLAG_NONFINITE_ROOT = 8 };
/* The largest n with n * n <= INT_MAX (cuSOLVER's legacy API takes int sizes). */
constexpr int64_t DIM_LIMIT = 46340;

/* Where factor k of block b sits, host side. */
struct factor_ref {
    int64_t block, n, offset, index;
};

/* ------------------------------------------------------------------ device kernels */

/* Step 1: per active factor, NaN/Inf in F / bc and nonzero off-diagonal entries of F. */
template <typename real>
__global__ void scan_factors(const int64_t *table, const uint8_t *active, const real *factors,
                             bool divide, real bc, int32_t *flags)
{
    const int64_t b = blockIdx.x;
    if (!active[b])
        return;
    const int64_t *row = shampoo_table_row(table, b);
    const int64_t total = shampoo_row_factor_numel(row);
    const real *f = factors + row[SHAMPOO_BF_FACTOR_OFFSET];
    for (int64_t e = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.y * blockDim.x) {
        int64_t k, i, j, n;
        shampoo_factor_element(row, e, &k, &i, &j, &n);
        const real a = divide ? f[e] / bc : f[e];
        int bits = isnan(a) ? FLAG_NAN : isinf(a) ? FLAG_INF : 0;
        if (i != j && f[e] != (real)0)
            bits |= FLAG_OFFDIAG;
        if (bits != 0)
            atomicOr(&flags[row[SHAMPOO_BF_FACTOR_INDEX] + k], bits);
    }
}

/* Step 2: X = diag((a_ii + epsilon)^alpha) for diagonal and 1x1 jobs. */
template <typename real>
__global__ void diagonal_roots(const int64_t *job_offset, const int64_t *job_n,
                               const int64_t *job_factor, const double *job_alpha,
                               int64_t first, const real *factors, bool divide, real bc,
                               real epsilon, real *out, int32_t *flags)
{
    const int64_t j = first + blockIdx.x, n = job_n[j], offset = job_offset[j];
    for (int64_t e = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; e < n * n;
         e += (int64_t)gridDim.y * blockDim.x) {
        real x = 0;
        if (e / n == e % n) {
            const real a = divide ? factors[offset + e] / bc : factors[offset + e];
            x = (real)pow((double)(a + epsilon), job_alpha[j]);
        }
        out[offset + e] = x;
        if (!isfinite(x))
            atomicOr(&flags[job_factor[j]], FLAG_NONFINITE_ROOT);
    }
}

/* Step 3a: bias-corrected copies (computed in the source type S, as the CPU computes `a`)
 * of jobs first.. into contiguous n x n slots of type R. */
template <typename S, typename R>
__global__ void pack(const int64_t *job_offset, int64_t first, int64_t n, const S *factors,
                     bool divide, S bc, R *staging)
{
    const int64_t j = blockIdx.x;
    const S *f = factors + job_offset[first + j];
    for (int64_t e = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; e < n * n;
         e += (int64_t)gridDim.y * blockDim.x)
        staging[j * n * n + e] = (R)(divide ? f[e] / bc : f[e]);
}

/* Step 3c: eigenvalues (ascending) -> their scale (lambda [- lambda_min] + epsilon)^alpha, in
 * place. One thread block per matrix. */
template <typename real>
__global__ void eigen_scales(real *w, int64_t n, const double *job_alpha, int64_t first,
                             bool make_psd, real epsilon)
{
    real *wj = w + blockIdx.x * n;
    const real smallest = wj[0];
    __syncthreads(); /* every thread has read wj[0] before anyone overwrites it */
    const bool shift = make_psd && smallest < (real)0;
    const double alpha = job_alpha[first + blockIdx.x];
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
        const real lambda = shift ? wj[c] - smallest : wj[c];
        wj[c] = (real)pow((double)(lambda + epsilon), alpha);
    }
}

/* Step 3d: Qs = Q diag(s): column c (column-major) of each Q times s_c. */
template <typename real>
__global__ void scale_columns(const real *q, const real *w, real *qs, int64_t n)
{
    const int64_t j = blockIdx.x;
    for (int64_t e = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; e < n * n;
         e += (int64_t)gridDim.y * blockDim.x)
        qs[j * n * n + e] = q[j * n * n + e] * w[j * n + e / n];
}

/* Step 3f: X slots -> out (type S), for the jobs whose solver succeeded. */
template <typename R, typename S>
__global__ void unpack(const int64_t *job_offset, const int64_t *job_factor, int64_t first,
                       int64_t n, const R *x, const int *info, S *out, int32_t *flags)
{
    const int64_t j = blockIdx.x;
    if (info[j] != 0)
        return;
    S *o = out + job_offset[first + j];
    for (int64_t e = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; e < n * n;
         e += (int64_t)gridDim.y * blockDim.x) {
        const S v = (S)x[j * n * n + e];
        o[e] = v;
        if (!isfinite(v))
            atomicOr(&flags[job_factor[first + j]], FLAG_NONFINITE_ROOT);
    }
}

} // namespace

#include "eigensolver_cuda.cuh"

namespace {

using namespace shampoo_eig;

/* ------------------------------------------------------------------ host planning */

/* Device workspace regions, in bytes, sized from the table alone (every factor of size >= 2
 * counted as dense), so the caller can allocate before the call; and the batch size of each
 * factor size, found once from cuSOLVER's buffer sizes (solver_batch). */
struct root_workspace {
    size_t flags, jobs, info, stage, w, solver, retry_stage, retry_w, retry_solver, total;
    int64_t factor_count, max_n;
    int64_t nsizes;
    int64_t *size_n, *size_batch; /* nsizes each, ascending n; free with release() */
};

void release(root_workspace *ws)
{
    free(ws->size_n);
    free(ws->size_batch);
    ws->size_n = ws->size_batch = NULL;
}

/* The planned batch for factors of size n (1 when n was not planned). */
int64_t planned_batch(const root_workspace *ws, int64_t n)
{
    for (int64_t i = 0; i < ws->nsizes; i++)
        if (ws->size_n[i] == n)
            return ws->size_batch[i];
    return 1;
}

/* All factors of the table, host side, and the factor count. */
factor_ref *list_factors(const int64_t *table_host, int64_t nblocks, int64_t *count)
{
    int64_t total = 0;
    for (int64_t b = 0; b < nblocks; b++)
        total += table_host[b * SHAMPOO_BF_COUNT + SHAMPOO_BF_ORDER];
    factor_ref *refs = (factor_ref *)malloc((size_t)(total > 0 ? total : 1) * sizeof(factor_ref));
    if (refs == NULL)
        return NULL;
    int64_t next = 0;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t *row = table_host + b * (int64_t)SHAMPOO_BF_COUNT;
        int64_t offset = row[SHAMPOO_BF_FACTOR_OFFSET];
        for (int64_t k = 0; k < row[SHAMPOO_BF_ORDER]; k++) {
            const int64_t n = row[SHAMPOO_BF_DIMS + k];
            refs[next++] = factor_ref{b, n, offset, row[SHAMPOO_BF_FACTOR_INDEX] + k};
            offset += n * n;
        }
    }
    *count = total;
    return refs;
}

int compare_int64(const void *a, const void *b)
{
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

template <typename real>
shampoo_status plan_workspace(const shampoo_cuda_env *env, const int64_t *table_host,
                              int64_t nblocks, root_workspace *ws)
{
    int64_t nfactors = 0, factor_slots = 0;
    memset(ws, 0, sizeof(*ws));
    factor_ref *refs = list_factors(table_host, nblocks, &nfactors);
    const size_t cap = (size_t)(nfactors > 0 ? nfactors : 1);
    int64_t *sizes = (int64_t *)malloc(cap * sizeof(int64_t));
    ws->size_n = (int64_t *)malloc(cap * sizeof(int64_t));
    ws->size_batch = (int64_t *)malloc(cap * sizeof(int64_t));
    shampoo_status st = SHAMPOO_OK;
    void *syevj_params = NULL;
    if (refs == NULL || sizes == NULL || ws->size_n == NULL || ws->size_batch == NULL) {
        st = SHAMPOO_ERR_NO_MEMORY;
        goto done;
    }
    for (int64_t f = 0; f < nfactors; f++) {
        factor_slots = refs[f].index + 1 > factor_slots ? refs[f].index + 1 : factor_slots;
        sizes[f] = refs[f].n;
        if (refs[f].n > DIM_LIMIT) {
            st = SHAMPOO_ERR_UNSUPPORTED;
            goto done;
        }
    }
    qsort(sizes, (size_t)nfactors, sizeof(int64_t), compare_int64);
    if ((st = SHAMPOO_SOLVER_CHECK("cusolverDnCreateSyevjInfo",
                                   env->libs->syevj_info_create(&syevj_params))) != SHAMPOO_OK)
        goto done;
    {
        int64_t stage = 0, wlen = 0;
        size_t solver = 0;
        for (int64_t f = 0; f < nfactors;) {
            int64_t n = sizes[f], count = 0;
            while (f < nfactors && sizes[f] == n) {
                f++;
                count++;
            }
            ws->max_n = n > ws->max_n ? n : ws->max_n;
            if (n < 2)
                continue;
            int64_t batch = 1;
            size_t bytes = 0;
            if ((st = solver_batch<real>(env, solver_for(env->libs, n, false), n, count,
                                         syevj_params, &batch, &bytes)) != SHAMPOO_OK)
                goto done;
            ws->size_n[ws->nsizes] = n;
            ws->size_batch[ws->nsizes++] = batch;
            stage = batch * n * n > stage ? batch * n * n : stage;
            wlen = batch * n > wlen ? batch * n : wlen;
            solver = bytes > solver ? bytes : solver;
        }
        ws->factor_count = factor_slots;
        ws->flags = shampoo_align256((size_t)factor_slots * sizeof(int32_t));
        /* job arrays: offset, n, factor (int64) and alpha (double) per factor */
        ws->jobs = shampoo_align256(4 * (size_t)(nfactors > 0 ? nfactors : 1) * 8);
        ws->info = shampoo_align256((size_t)(nfactors + 1) * sizeof(int));
        ws->stage = shampoo_align256((size_t)stage * sizeof(real));
        ws->w = shampoo_align256((size_t)wlen * sizeof(real));
        ws->solver = shampoo_align256(solver);
        if (sizeof(real) == 4 && ws->max_n >= 2) {
            /* float64 retry of one factor at a time (syevd) */
            const int64_t n = ws->max_n;
            int64_t one = 1;
            size_t bytes = 0;
            if ((st = solver_batch<double>(env, SOLVER_SYEVD, n, 1, syevj_params, &one,
                                           &bytes)) != SHAMPOO_OK)
                goto done;
            ws->retry_stage = shampoo_align256((size_t)(n * n) * sizeof(double));
            ws->retry_w = shampoo_align256((size_t)n * sizeof(double));
            ws->retry_solver = shampoo_align256(bytes);
        }
        ws->total = ws->flags + ws->jobs + ws->info + 3 * ws->stage + ws->w + ws->solver +
                    3 * ws->retry_stage + ws->retry_w + ws->retry_solver;
    }
done:
    if (syevj_params != NULL)
        env->libs->syevj_info_destroy(syevj_params);
    free(sizes);
    free(refs);
    if (st != SHAMPOO_OK)
        release(ws);
    return st;
}

/* Grid of one thread block row per matrix and chunks of its n*n elements. */
dim3 matrix_grid(int64_t matrices, int64_t n)
{
    int64_t chunks = (n * n + SHAMPOO_CUDA_THREADS - 1) / SHAMPOO_CUDA_THREADS;
    chunks = chunks < SHAMPOO_CUDA_MAX_GRID_Y ? chunks : SHAMPOO_CUDA_MAX_GRID_Y;
    return dim3((unsigned)matrices, (unsigned)(chunks > 0 ? chunks : 1));
}

/* Step 3 for jobs [first, first + count) of size n, batch_max at a time: the eigen root of
 * each into out. S is the factors' type, R the type the eigensolver works in (R = double for
 * the float32 retry). Every launch whose output cuSOLVER or cuBLAS reads next is checked
 * before that call, so no library call runs on stale staging. */
template <typename S, typename R>
shampoo_status eigen_roots(const shampoo_cuda_env *env, const S *factors, S *out, bool divide,
                           S bc, const shampoo_root_config *cfg, const int64_t *job_offset,
                           const int64_t *job_factor, const double *job_alpha, int *info,
                           int64_t first, int64_t count, int64_t n, int64_t batch_max,
                           R *stage_a, R *stage_qs, R *stage_x, R *w, void *solver_work,
                           size_t solver_work_bytes, void *syevj_params, bool force_syevd,
                           int32_t *flags)
{
    cudaStream_t stream = shampoo_stream(env);
    const solver_kind kind = solver_for(env->libs, n, force_syevd);
    batch_max = batch_max > 0 ? batch_max : 1;
    for (int64_t done = 0; done < count; done += batch_max) {
        const int64_t batch = count - done < batch_max ? count - done : batch_max;
        const int64_t at = first + done;
        const dim3 grid = matrix_grid(batch, n);
        pack<S, R><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(job_offset, at, n, factors, divide,
                                                              bc, stage_a);
        SHAMPOO_TRY(SHAMPOO_LAUNCHED("pack"));
        SHAMPOO_TRY(solve<R>(env, kind, (int)n, (int)batch, stage_a, w, info + done, solver_work,
                             solver_work_bytes, syevj_params));
        eigen_scales<R><<<(unsigned)batch, SHAMPOO_CUDA_THREADS, 0, stream>>>(
            w, n, job_alpha, at, cfg->make_positive_semidefinite != 0, (R)cfg->epsilon);
        SHAMPOO_TRY(SHAMPOO_LAUNCHED("eigen_scales"));
        scale_columns<R><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(stage_a, w, stage_qs, n);
        SHAMPOO_TRY(SHAMPOO_LAUNCHED("scale_columns"));
        /* row-major X = Qs Q^T is the column-major Q Qs^T, as the CPU kernel forms it */
        SHAMPOO_TRY(shampoo_gemm_strided(env->libs, env->blas, SHAMPOO_CUBLAS_OP_N,
                                         SHAMPOO_CUBLAS_OP_T, (int)n, stage_a, stage_qs, stage_x,
                                         (int)batch));
        unpack<R, S><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(job_offset, job_factor, at, n,
                                                                stage_x, info + done, out, flags);
        SHAMPOO_TRY(SHAMPOO_LAUNCHED("unpack"));
    }
    return SHAMPOO_OK;
}

/* Copies device -> host and waits (a root step synchronises anyway). */
shampoo_status fetch(void *host, const void *device, size_t bytes, cudaStream_t stream)
{
    if (bytes > 0)
        SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, host, device, bytes,
                                       cudaMemcpyDeviceToHost, stream));
    return SHAMPOO_CUDA_CHECK(cudaStreamSynchronize, stream);
}

int compare_int64_pair(const void *a, const void *b);

/* Sorts jobs [first, end) of the four job arrays by size, stably (table order within a
 * size), in O(n log n). Returns false when out of memory. */
bool sort_dense_jobs(int64_t *offset, int64_t *n, int64_t *factor, double *alpha,
                     int64_t first, int64_t end)
{
    const int64_t count = end - first;
    if (count < 2)
        return true;
    /* (n, original position) pairs: sorting them is stable by construction */
    int64_t *keys = (int64_t *)malloc((size_t)count * 2 * sizeof(int64_t));
    int64_t *tmp = (int64_t *)malloc((size_t)count * 3 * sizeof(int64_t));
    double *tmp_alpha = (double *)malloc((size_t)count * sizeof(double));
    if (keys == NULL || tmp == NULL || tmp_alpha == NULL) {
        free(keys);
        free(tmp);
        free(tmp_alpha);
        return false;
    }
    for (int64_t i = 0; i < count; i++) {
        keys[2 * i] = n[first + i];
        keys[2 * i + 1] = i;
    }
    qsort(keys, (size_t)count, 2 * sizeof(int64_t), compare_int64_pair);
    for (int64_t i = 0; i < count; i++) {
        const int64_t from = first + keys[2 * i + 1];
        tmp[i] = offset[from];
        tmp[count + i] = n[from];
        tmp[2 * count + i] = factor[from];
        tmp_alpha[i] = alpha[from];
    }
    for (int64_t i = 0; i < count; i++) {
        offset[first + i] = tmp[i];
        n[first + i] = tmp[count + i];
        factor[first + i] = tmp[2 * count + i];
        alpha[first + i] = tmp_alpha[i];
    }
    free(keys);
    free(tmp);
    free(tmp_alpha);
    return true;
}

int compare_int64_pair(const void *a, const void *b)
{
    const int64_t *x = (const int64_t *)a, *y = (const int64_t *)b;
    if (x[0] != y[0])
        return (x[0] > y[0]) - (x[0] < y[0]);
    return (x[1] > y[1]) - (x[1] < y[1]);
}

/* The host side of one call: every buffer it allocates, freed in one place. */
struct root_host {
    factor_ref *refs = nullptr;
    uint8_t *active = nullptr, *diagonal = nullptr;
    int32_t *flags = nullptr;
    int *info = nullptr;
    int64_t *jobs = nullptr; /* offset, n, factor: 3 x nfactors, then alpha (as doubles) */
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
    const dim3 grid((unsigned)nblocks, shampoo_chunks_for(table_host, nblocks, true));
    scan_factors<real><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(table, active, factors, divide,
                                                                   bc, d_flags);
    SHAMPOO_TRY(SHAMPOO_LAUNCHED("scan_factors"));
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
        diagonal_roots<real><<<matrix_grid(ndiag, widest), SHAMPOO_CUDA_THREADS, 0, stream>>>(
            d_offset, d_n, d_factor, d_alpha, 0, factors, divide, bc, (real)cfg->epsilon, out,
            d_flags);
        /* checked here, not by a later call: no dense job may follow to notice it */
        SHAMPOO_TRY(SHAMPOO_LAUNCHED("diagonal_roots"));
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
