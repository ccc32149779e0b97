/* The warm-started QR step of the eigenbases on the GPU (eigenbasis_cuda.cuh; CPU twin:
 * eb_qr in core/eigenbasis.inc): one factor at a time, host-steered (each iteration's
 * relative change decides whether another follows):
 *   P = F Q (cuBLAS GEMM) -> column-major copy -> cuSOLVER geqrf + orgqr -> Q' row-major ->
 *   ||Q - Q'||_F^2 and ||Q||_F^2 by one deterministic block reduction -> the host decides;
 * then M = F Q, the Rayleigh quotients q_j^T M_j summed per column in the CPU's order, a
 * stable sort on the host, and one kernel writes the permuted columns into out. */
#include "eigenbasis_cuda.cuh"

#include <math.h>
#include <stdlib.h>
#include <string.h>

namespace shampoo_qr {

using namespace shampoo_root;

namespace {

/* Scratch regions for factors up to max_n, in bytes. */
struct qr_regions {
    size_t matrix, vector, work, small, perm, total;
};

qr_regions regions_of(int64_t max_n, size_t work_bytes, int real_bytes)
{
    qr_regions r;
    r.matrix = shampoo_align256((size_t)(max_n * max_n) * (size_t)real_bytes);
    r.vector = shampoo_align256((size_t)max_n * (size_t)real_bytes);
    r.work = shampoo_align256(work_bytes);
    r.small = shampoo_align256(2 * sizeof(double) + 2 * sizeof(int));
    r.perm = shampoo_align256((size_t)max_n * sizeof(int64_t));
    r.total = max_n >= 2 ? 3 * r.matrix + r.vector + r.work + r.small + r.perm : 0;
    return r;
}

int geqrf_buffer(const shampoo_cuda_libs *l, void *h, int n, float *a, int *lw)
{
    return l->sgeqrf_buffer(h, n, n, a, n, lw);
}
int geqrf_buffer(const shampoo_cuda_libs *l, void *h, int n, double *a, int *lw)
{
    return l->dgeqrf_buffer(h, n, n, a, n, lw);
}
int orgqr_buffer(const shampoo_cuda_libs *l, void *h, int n, float *a, int *lw)
{
    return l->sorgqr_buffer(h, n, n, n, a, n, a, lw);
}
int orgqr_buffer(const shampoo_cuda_libs *l, void *h, int n, double *a, int *lw)
{
    return l->dorgqr_buffer(h, n, n, n, a, n, a, lw);
}
int geqrf(const shampoo_cuda_libs *l, void *h, int n, float *a, float *tau, float *w, int lw,
          int *info)
{
    return l->sgeqrf(h, n, n, a, n, tau, w, lw, info);
}
int geqrf(const shampoo_cuda_libs *l, void *h, int n, double *a, double *tau, double *w, int lw,
          int *info)
{
    return l->dgeqrf(h, n, n, a, n, tau, w, lw, info);
}
int orgqr(const shampoo_cuda_libs *l, void *h, int n, float *a, float *tau, float *w, int lw,
          int *info)
{
    return l->sorgqr(h, n, n, n, a, n, tau, w, lw, info);
}
int orgqr(const shampoo_cuda_libs *l, void *h, int n, double *a, double *tau, double *w, int lw,
          int *info)
{
    return l->dorgqr(h, n, n, n, a, n, tau, w, lw, info);
}

template <typename real>
__global__ void warm_scan(const int64_t *table, const uint8_t *active, const real *previous,
                          int32_t *flags)
{
    const int64_t b = blockIdx.x;
    if (!active[b])
        return;
    const int64_t *row = shampoo_table_row(table, b);
    const int64_t total = shampoo_row_factor_numel(row);
    const real *p = previous + row[SHAMPOO_BF_FACTOR_OFFSET];
    for (int64_t e = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.y * blockDim.x) {
        if (p[e] != (real)0) {
            int64_t k, i, j, n;
            shampoo_factor_element(row, e, &k, &i, &j, &n);
            atomicOr(&flags[row[SHAMPOO_BF_FACTOR_INDEX] + k], FLAG_WARM);
        }
    }
}

/* dst = src^T (n x n): row-major <-> column-major. */
template <typename real> __global__ void transpose(const real *src, real *dst, int64_t n)
{
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n * n;
         e += (int64_t)gridDim.x * blockDim.x)
        dst[(e % n) * n + e / n] = src[e];
}

/* sums[0] = ||q - qn||^2, sums[1] = ||q||^2 in double; one thread block, fixed order. */
template <typename real>
__global__ void change_norms(const real *q, const real *qn, int64_t nn, double *sums)
{
    __shared__ double ds[SHAMPOO_CUDA_THREADS], ns[SHAMPOO_CUDA_THREADS];
    const unsigned t = threadIdx.x;
    double d = 0.0, s = 0.0;
    for (int64_t i = t; i < nn; i += SHAMPOO_CUDA_THREADS) {
        const double x = (double)q[i] - (double)qn[i];
        d += x * x;
        s += (double)q[i] * (double)q[i];
    }
    ds[t] = d;
    ns[t] = s;
    __syncthreads();
    for (unsigned half = SHAMPOO_CUDA_THREADS / 2; half > 0; half /= 2) {
        if (t < half) {
            ds[t] += ds[t + half];
            ns[t] += ns[t + half];
        }
        __syncthreads();
    }
    if (t == 0) {
        sums[0] = ds[0];
        sums[1] = ns[0];
    }
}

/* rq[j] = sum_i q[i][j] m[i][j], i ascending (the CPU's order). */
template <typename real>
__global__ void rayleigh(const real *q, const real *m, int64_t n, real *rq)
{
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n;
         j += (int64_t)gridDim.x * blockDim.x) {
        real s = 0;
        for (int64_t i = 0; i < n; i++)
            s += q[i * n + j] * m[i * n + j];
        rq[j] = s;
    }
}

template <typename real>
__global__ void permute_columns(const real *q, const int64_t *perm, int64_t n, real *out,
                                int32_t *flag)
{
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n * n;
         e += (int64_t)gridDim.x * blockDim.x) {
        const real v = q[(e / n) * n + perm[e % n]];
        out[e] = v;
        if (!isfinite(v))
            atomicOr(flag, FLAG_NONFINITE_ROOT);
    }
}

unsigned grid_for(int64_t count)
{
    int64_t g = (count + SHAMPOO_CUDA_THREADS - 1) / SHAMPOO_CUDA_THREADS;
    g = g < 65535 ? g : 65535;
    return (unsigned)(g > 0 ? g : 1);
}

template <typename real> const char *qr_name(bool orgqr_step)
{
    if (sizeof(real) == 8)
        return orgqr_step ? "cusolverDnDorgqr" : "cusolverDnDgeqrf";
    return orgqr_step ? "cusolverDnSorgqr" : "cusolverDnSgeqrf";
}

} // namespace

template <typename real>
shampoo_status qr_workspace(const shampoo_cuda_env *env, const int64_t *table_host,
                            int64_t nblocks, size_t *bytes)
{
    int64_t max_n = 0;
    int lwork_max = 1;
    real *probe = shampoo_eig::size_query_pointer<real>();
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t *row = shampoo_table_row(table_host, b);
        for (int64_t k = 0; k < row[SHAMPOO_BF_ORDER]; k++) {
            const int64_t n = row[SHAMPOO_BF_DIMS + k];
            if (n < 2 || n > DIM_LIMIT)
                continue;
            max_n = n > max_n ? n : max_n;
            int lw = 0;
            SHAMPOO_TRY(SHAMPOO_SOLVER_CHECK(
                sizeof(real) == 8 ? "cusolverDnDgeqrf_bufferSize" : "cusolverDnSgeqrf_bufferSize",
                geqrf_buffer(env->libs, env->solver, (int)n, probe, &lw)));
            lwork_max = lw > lwork_max ? lw : lwork_max;
            SHAMPOO_TRY(SHAMPOO_SOLVER_CHECK(
                sizeof(real) == 8 ? "cusolverDnDorgqr_bufferSize" : "cusolverDnSorgqr_bufferSize",
                orgqr_buffer(env->libs, env->solver, (int)n, probe, &lw)));
            lwork_max = lw > lwork_max ? lw : lwork_max;
        }
    }
    *bytes = regions_of(max_n, (size_t)lwork_max * sizeof(real), sizeof(real)).total;
    return SHAMPOO_OK;
}

template <typename real>
shampoo_status launch_warm_scan(cudaStream_t stream, const int64_t *table,
                                const int64_t *table_host, int64_t nblocks,
                                const uint8_t *active, const real *previous, int32_t *flags)
{
    const dim3 grid((unsigned)nblocks, shampoo_chunks_for(table_host, nblocks, true));
    warm_scan<real><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(table, active, previous, flags);
    return SHAMPOO_LAUNCHED("warm_scan");
}

template <typename real>
shampoo_status qr_basis(const shampoo_cuda_env *env, int64_t n, const real *f, const real *prev,
                        real *out, const shampoo_eigenbasis_config *cfg, void *scratch,
                        int32_t *flag)
{
    cudaStream_t stream = shampoo_stream(env);
    const size_t nn = (size_t)(n * n);
    /* the regions as qr_workspace sized them for the largest factor; lwork is what is left */
    int lwork = 0;
    SHAMPOO_TRY(SHAMPOO_SOLVER_CHECK(qr_name<real>(false), geqrf_buffer(env->libs, env->solver,
                                                                        (int)n, (real *)scratch,
                                                                        &lwork)));
    int lw2 = 0;
    SHAMPOO_TRY(SHAMPOO_SOLVER_CHECK(qr_name<real>(true), orgqr_buffer(env->libs, env->solver,
                                                                       (int)n, (real *)scratch,
                                                                       &lw2)));
    lwork = lw2 > lwork ? lw2 : lwork;
    lwork = lwork > 1 ? lwork : 1;
    const qr_regions r = regions_of(n, (size_t)lwork * sizeof(real), sizeof(real));
    char *p = (char *)scratch;
    real *q = (real *)p, *pq = (real *)(p + r.matrix), *a = (real *)(p + 2 * r.matrix);
    real *tau = (real *)(p + 3 * r.matrix);
    real *work = (real *)(p + 3 * r.matrix + r.vector);
    double *sums = (double *)(p + 3 * r.matrix + r.vector + r.work);
    int *info = (int *)(sums + 2);
    int64_t *perm = (int64_t *)(p + 3 * r.matrix + r.vector + r.work + r.small);
    const unsigned grid = grid_for((int64_t)nn);
    SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, q, prev, nn * sizeof(real),
                                   cudaMemcpyDeviceToDevice, stream));
    double error = INFINITY;
    for (int64_t it = 0; it < cfg->max_iterations && !(error <= cfg->tolerance); it++) {
        /* row-major P = F Q is the column-major Q_mem F_mem */
        SHAMPOO_TRY(shampoo_gemm_strided(env->libs, env->blas, SHAMPOO_CUBLAS_OP_N,
                                         SHAMPOO_CUBLAS_OP_N, (int)n, q, f, pq, 1));
        transpose<real><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(pq, a, n);
        SHAMPOO_TRY(SHAMPOO_LAUNCHED("transpose"));
        SHAMPOO_TRY(SHAMPOO_SOLVER_CHECK(qr_name<real>(false),
                                         geqrf(env->libs, env->solver, (int)n, a, tau, work,
                                               lwork, info)));
        SHAMPOO_TRY(SHAMPOO_SOLVER_CHECK(qr_name<real>(true),
                                         orgqr(env->libs, env->solver, (int)n, a, tau, work,
                                               lwork, info + 1)));
        transpose<real><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(a, pq, n);
        SHAMPOO_TRY(SHAMPOO_LAUNCHED("transpose"));
        change_norms<real><<<1, SHAMPOO_CUDA_THREADS, 0, stream>>>(q, pq, (int64_t)nn, sums);
        SHAMPOO_TRY(SHAMPOO_LAUNCHED("change_norms"));
        SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, q, pq, nn * sizeof(real),
                                       cudaMemcpyDeviceToDevice, stream));
        char host[2 * sizeof(double) + 2 * sizeof(int)];
        SHAMPOO_TRY(fetch(host, sums, sizeof(host), stream));
        double s[2];
        int inf[2];
        memcpy(s, host, sizeof(s));
        memcpy(inf, host + sizeof(s), sizeof(inf));
        if (inf[0] != 0 || inf[1] != 0)
            return SHAMPOO_ERR_LINALG; /* an argument error, as LAPACK's info < 0 on the CPU */
        error = sqrt(s[0]) / sqrt(s[1]);
    }
    /* M = F Q, rq_j = (Q^T F Q)_jj, then the stable ascending order of the columns */
    SHAMPOO_TRY(shampoo_gemm_strided(env->libs, env->blas, SHAMPOO_CUBLAS_OP_N,
                                     SHAMPOO_CUBLAS_OP_N, (int)n, q, f, pq, 1));
    rayleigh<real><<<grid_for(n), SHAMPOO_CUDA_THREADS, 0, stream>>>(q, pq, n, tau);
    SHAMPOO_TRY(SHAMPOO_LAUNCHED("rayleigh"));
    real *rq = (real *)malloc((size_t)n * sizeof(real));
    int64_t *order = (int64_t *)malloc((size_t)n * sizeof(int64_t));
    shampoo_status st = rq == NULL || order == NULL ? SHAMPOO_ERR_NO_MEMORY
                                                    : fetch(rq, tau, (size_t)n * sizeof(real), stream);
    if (st == SHAMPOO_OK) {
        for (int64_t j = 0; j < n; j++) { /* insertion sort: stable for ties, as the CPU's */
            int64_t i = j;
            while (i > 0 && rq[order[i - 1]] > rq[j])
                i--;
            memmove(order + i + 1, order + i, (size_t)(j - i) * sizeof(int64_t));
            order[i] = j;
        }
        st = SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, perm, order, (size_t)n * sizeof(int64_t),
                                cudaMemcpyHostToDevice, stream);
    }
    if (st == SHAMPOO_OK) {
        permute_columns<real><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(q, perm, n, out, flag);
        st = SHAMPOO_LAUNCHED("permute_columns");
    }
    /* the host order array must outlive the enqueued copy */
    const shampoo_status sync = SHAMPOO_CUDA_CHECK(cudaStreamSynchronize, stream);
    free(rq);
    free(order);
    return st != SHAMPOO_OK ? st : sync;
}

#define SHAMPOO_QR_INSTANCES(real)                                                             \
    template shampoo_status qr_workspace<real>(const shampoo_cuda_env *, const int64_t *,     \
                                               int64_t, size_t *);                            \
    template shampoo_status launch_warm_scan<real>(cudaStream_t, const int64_t *,             \
                                                   const int64_t *, int64_t, const uint8_t *, \
                                                   const real *, int32_t *);                  \
    template shampoo_status qr_basis<real>(const shampoo_cuda_env *, int64_t, const real *,   \
                                           const real *, real *,                              \
                                           const shampoo_eigenbasis_config *, void *,         \
                                           int32_t *);
SHAMPOO_QR_INSTANCES(float)
SHAMPOO_QR_INSTANCES(double)

} // namespace shampoo_qr
