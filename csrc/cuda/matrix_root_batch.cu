/* The device side of a root step (matrix_root_cuda.cuh): the kernels, and the batched eigen
 * roots of one factor size: pack (bias-corrected copies, contiguous) -> eigendecomposition
 * (eigensolver_cuda.cuh) -> scale the eigenvectors by (lambda [- min(lambda_min, 0)] +
 * epsilon)^alpha -> one strided batched GEMM X = Q diag(s) Q^T -> unpack into `out`. */
#include "matrix_root_cuda.cuh"

#include <math.h>

namespace shampoo_root {

using namespace shampoo_eig;

namespace {

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

template <typename real>
shampoo_status launch_scan_factors(cudaStream_t stream, const int64_t *table,
                                   const int64_t *table_host, int64_t nblocks,
                                   const uint8_t *active, const real *factors, bool divide,
                                   real bc, int32_t *flags)
{
    const dim3 grid((unsigned)nblocks, shampoo_chunks_for(table_host, nblocks, true));
    scan_factors<real><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(table, active, factors, divide,
                                                                   bc, flags);
    return SHAMPOO_LAUNCHED("scan_factors");
}

template <typename real>
shampoo_status launch_diagonal_roots(cudaStream_t stream, const int64_t *job_offset,
                                     const int64_t *job_n, const int64_t *job_factor,
                                     const double *job_alpha, int64_t ndiag, int64_t widest,
                                     const real *factors, bool divide, real bc, real epsilon,
                                     real *out, int32_t *flags)
{
    diagonal_roots<real><<<matrix_grid(ndiag, widest), SHAMPOO_CUDA_THREADS, 0, stream>>>(
        job_offset, job_n, job_factor, job_alpha, 0, factors, divide, bc, epsilon, out, flags);
    /* checked here, not by a later call: no dense job may follow to notice it */
    return SHAMPOO_LAUNCHED("diagonal_roots");
}

template <typename S, typename R>
shampoo_status launch_pack(cudaStream_t stream, dim3 grid, const int64_t *job_offset,
                           int64_t first, int64_t n, const S *factors, bool divide, S bc,
                           R *staging)
{
    pack<S, R><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(job_offset, first, n, factors, divide,
                                                          bc, staging);
    return SHAMPOO_LAUNCHED("pack");
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
        SHAMPOO_TRY((launch_pack<S, R>(stream, grid, job_offset, at, n, factors, divide, bc,
                                       stage_a)));
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

#define SHAMPOO_ROOT_LAUNCHERS(real)                                                           \
    template shampoo_status launch_scan_factors<real>(cudaStream_t, const int64_t *,          \
                                                      const int64_t *, int64_t,               \
                                                      const uint8_t *, const real *, bool,    \
                                                      real, int32_t *);                       \
    template shampoo_status launch_diagonal_roots<real>(                                       \
        cudaStream_t, const int64_t *, const int64_t *, const int64_t *, const double *,      \
        int64_t, int64_t, const real *, bool, real, real, real *, int32_t *);
SHAMPOO_ROOT_LAUNCHERS(float)
SHAMPOO_ROOT_LAUNCHERS(double)

#define SHAMPOO_EIGEN_ROOTS(S, R)                                                              \
    template shampoo_status launch_pack<S, R>(cudaStream_t, dim3, const int64_t *, int64_t,  \
                                              int64_t, const S *, bool, S, R *);              \
    template shampoo_status eigen_roots<S, R>(                                                 \
        const shampoo_cuda_env *, const S *, S *, bool, S, const shampoo_root_config *,       \
        const int64_t *, const int64_t *, const double *, int *, int64_t, int64_t, int64_t,   \
        int64_t, R *, R *, R *, R *, void *, size_t, void *, bool, int32_t *);
SHAMPOO_EIGEN_ROOTS(float, float)
SHAMPOO_EIGEN_ROOTS(double, double)
SHAMPOO_EIGEN_ROOTS(float, double) /* the float64 retry of float32 factors */

} // namespace shampoo_root
