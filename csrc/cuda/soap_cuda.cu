/* The SOAP direction on the GPU (soap_cuda.h; CPU twin: core/soap_direction.inc).
 *   1. one kernel flags the blocks that have an eigenbasis (Q_0 not all zero, order >= 1);
 *   2. with moment_grads: R(moment_grads) by the batched block contraction that
 *      preconditioning uses (block_contraction_cuda.cuh), then
 *      D <- beta2 D + (1 - beta2) R^2 in one elementwise kernel;
 *   3. with out: R(grads) (unless step 2 rotated the same buffer), the scaling
 *      R / (D / bc + epsilon)^(1/r) in place, and R^T by batched GEMMs into out.
 * A block without an eigenbasis (or of order 0) uses the unrotated buffer instead: the
 * elementwise kernels read it directly and the back rotation does not write its `out`, so
 * R is exactly the identity there as on the CPU. The elementwise arithmetic is the CPU's,
 * operation for operation (the build passes -fmad=false). */
#include "block_contraction_cuda.cuh"
#include "soap_cuda.h"

#include <math.h>

namespace {

constexpr int ROTATIONS = 3; /* moment, direction forward, direction back */

/* Workspace regions (bytes): the per-block basis flags, three block-layout buffers (two
 * intermediates and the rotated result), then per rotation the contraction's pointer
 * arrays. */
struct soap_workspace {
    size_t flags, scratch, pointers, total;
    int64_t nitems;
};

soap_workspace soap_workspace_of(const int64_t *table_host, int64_t nblocks,
                                 const int64_t *plan_host, int real_bytes)
{
    int64_t block_numel, factor_numel;
    shampoo_table_extents(table_host, nblocks, &block_numel, &factor_numel);
    soap_workspace w;
    w.nitems = plan_host[1];
    w.flags = shampoo_align256((size_t)nblocks * sizeof(int32_t));
    w.scratch = shampoo_align256((size_t)block_numel * (size_t)real_bytes);
    w.pointers = shampoo_contract::pointer_bytes(w.nitems);
    w.total = w.flags + 3 * w.scratch + ROTATIONS * w.pointers;
    return w;
}

/* has[b] != 0 when block b (order >= 1) has a nonzero entry in its first eigenbasis. */
template <typename real>
__global__ void basis_flags(const int64_t *table, const uint8_t *active, const real *bases,
                            int32_t *has)
{
    const int64_t b = blockIdx.x;
    const int64_t *row = shampoo_table_row(table, b);
    if (!active[b] || row[SHAMPOO_BF_ORDER] < 1)
        return;
    const int64_t n = row[SHAMPOO_BF_DIMS];
    const real *q = bases + row[SHAMPOO_BF_FACTOR_OFFSET];
    for (int64_t e = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; e < n * n;
         e += (int64_t)gridDim.y * blockDim.x)
        if (q[e] != (real)0) {
            atomicOr(&has[b], 1);
            return;
        }
}

/* D <- beta2 D + (1 - beta2) X^2 (beta2 == 1: D + X^2), X the rotated moment gradient of a
 * block with a basis, else the raw one. */
template <typename real>
__global__ void second_moment(const int64_t *table, const uint8_t *active, const int32_t *has,
                              const real *rotated, const real *raw, real *corrected,
                              double beta2_in)
{
    const int64_t b = blockIdx.x;
    if (!active[b])
        return;
    const int64_t *row = shampoo_table_row(table, b);
    const int64_t numel = row[SHAMPOO_BF_NUMEL], offset = row[SHAMPOO_BF_BLOCK_OFFSET];
    const real *x = (has[b] ? rotated : raw) + offset;
    real *D = corrected + offset;
    const real beta2 = (real)beta2_in, alpha = (real)(1.0 - beta2_in);
    for (int64_t i = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; i < numel;
         i += (int64_t)gridDim.y * blockDim.x) {
        if (beta2_in == 1.0)
            D[i] += x[i] * x[i];
        else
            D[i] = D[i] * beta2 + alpha * (x[i] * x[i]);
    }
}

/* X / (D / bc + epsilon)^(1/r): in place into `rotated` for a block with a basis (rotated
 * back next), straight into `out` otherwise (R^T is the identity there). */
template <typename real>
__global__ void scale(const int64_t *table, const uint8_t *active, const int32_t *has,
                      real *rotated, const real *raw, const real *corrected, real *out,
                      double bc_in, double eps_in)
{
    const int64_t b = blockIdx.x;
    if (!active[b])
        return;
    const int64_t *row = shampoo_table_row(table, b);
    const int64_t numel = row[SHAMPOO_BF_NUMEL], offset = row[SHAMPOO_BF_BLOCK_OFFSET];
    const int64_t r = row[SHAMPOO_BF_ROOT];
    const real *x = (has[b] ? rotated : raw) + offset;
    real *y = (has[b] ? rotated : out) + offset;
    const real *D = corrected + offset;
    const real bc = (real)bc_in, eps = (real)eps_in;
    for (int64_t i = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; i < numel;
         i += (int64_t)gridDim.y * blockDim.x) {
        real s = D[i] / bc + eps;
        s = r == 1 ? s : r == 2 ? (real)sqrt((double)s) : (real)pow((double)s, 1.0 / (double)r);
        y[i] = x[i] / s;
    }
}

bool params_ok(const shampoo_soap_params *p)
{
    return p->bias_correction > 0.0 && isfinite(p->bias_correction) && p->epsilon >= 0.0 &&
           p->beta2 >= 0.0 && p->beta2 <= 1.0;
}

template <typename real>
shampoo_status soap_direction(const shampoo_cuda_env *env, real *out, const real *grads,
                              const real *moment_grads, const real *bases, real *corrected,
                              const int64_t *table, const int64_t *table_host, int64_t nblocks,
                              const int64_t *plan, const int64_t *plan_host,
                              const uint8_t *active, const shampoo_soap_params *p)
{
    if (env == NULL || p == NULL || bases == NULL || corrected == NULL || nblocks < 0 ||
        (nblocks > 0 && (table == NULL || table_host == NULL || plan == NULL ||
                         plan_host == NULL || active == NULL)) ||
        (out == NULL && moment_grads == NULL) || (out != NULL && grads == NULL) ||
        !params_ok(p))
        return SHAMPOO_ERR_INVALID_ARG;
    if (nblocks == 0)
        return SHAMPOO_OK;
    /* the CPU kernel's checks, before any launch */
    int64_t widest = 1;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t *row = shampoo_table_row(table_host, b);
        if (row[SHAMPOO_BF_ORDER] >= 1)
            widest = row[SHAMPOO_BF_DIMS] * row[SHAMPOO_BF_DIMS] > widest
                         ? row[SHAMPOO_BF_DIMS] * row[SHAMPOO_BF_DIMS] : widest;
        if (row[SHAMPOO_BF_ROOT] < 1)
            return SHAMPOO_ERR_INVALID_ARG;
        if (row[SHAMPOO_BF_NUMEL] > INT32_MAX)
            return SHAMPOO_ERR_UNSUPPORTED;
    }
    if (!shampoo_plan_fits_blas(plan_host))
        return SHAMPOO_ERR_UNSUPPORTED;
    const soap_workspace w = soap_workspace_of(table_host, nblocks, plan_host, sizeof(real));
    if (env->workspace == NULL || env->workspace_bytes < w.total)
        return SHAMPOO_ERR_INVALID_ARG;
    cudaStream_t stream = shampoo_stream(env);
    char *ws = (char *)env->workspace;
    int32_t *has = (int32_t *)ws;
    real *ping = (real *)(ws + w.flags), *pong = (real *)(ws + w.flags + w.scratch);
    real *rotated = (real *)(ws + w.flags + 2 * w.scratch);
    char *pointers = ws + w.flags + 3 * w.scratch;
    if (w.nitems > 0)
        SHAMPOO_TRY(shampoo_blas_bind(env));

    SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemsetAsync, has, 0, (size_t)nblocks * sizeof(int32_t),
                                   stream));
    int64_t chunks = (widest + SHAMPOO_CUDA_THREADS - 1) / SHAMPOO_CUDA_THREADS;
    chunks = chunks < SHAMPOO_CUDA_MAX_GRID_Y ? chunks : SHAMPOO_CUDA_MAX_GRID_Y;
    basis_flags<real><<<dim3((unsigned)nblocks, (unsigned)chunks), SHAMPOO_CUDA_THREADS, 0,
                        stream>>>(table, active, bases, has);
    SHAMPOO_TRY(SHAMPOO_LAUNCHED("basis_flags"));

    /* R(X) contracts X with the bases, R^T(X) with the transposed bases */
    const shampoo_contract::contraction<real> c = {env, plan, plan_host, table, active, has,
                                                   bases, ping, pong};
    using shampoo_contract::contract;
    const dim3 grid((unsigned)nblocks, shampoo_chunks_for(table_host, nblocks));
    bool rotated_grads = false;
    if (moment_grads != NULL) {
        SHAMPOO_TRY(contract<real>(c, moment_grads, rotated, pointers, false));
        second_moment<real><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(
            table, active, has, rotated, moment_grads, corrected, p->beta2);
        SHAMPOO_TRY(SHAMPOO_LAUNCHED("second_moment"));
        rotated_grads = moment_grads == grads;
    }
    if (out == NULL)
        return SHAMPOO_OK;
    if (!rotated_grads)
        SHAMPOO_TRY(contract<real>(c, grads, rotated, pointers + w.pointers, false));
    scale<real><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(table, active, has, rotated, grads,
                                                          corrected, out, p->bias_correction,
                                                          p->epsilon);
    /* checked here: with no basis anywhere no GEMM follows to notice it */
    SHAMPOO_TRY(SHAMPOO_LAUNCHED("scale"));
    return contract<real>(c, rotated, out, pointers + 2 * w.pointers, true);
}

} // namespace

extern "C" size_t shampoo_cuda_soap_direction_workspace(const int64_t *table_host,
                                                        int64_t nblocks,
                                                        const int64_t *plan_host, int real_bytes)
{
    return soap_workspace_of(table_host, nblocks, plan_host, real_bytes).total;
}

extern "C" shampoo_status shampoo_cuda_soap_direction_f32(
    const shampoo_cuda_env *env, float *out, const float *grads, const float *moment_grads,
    const float *bases, float *corrected, const int64_t *table, const int64_t *table_host,
    int64_t nblocks, const int64_t *plan, const int64_t *plan_host, const uint8_t *active,
    const shampoo_soap_params *p)
{
    return soap_direction<float>(env, out, grads, moment_grads, bases, corrected, table,
                                 table_host, nblocks, plan, plan_host, active, p);
}

extern "C" shampoo_status shampoo_cuda_soap_direction_f64(
    const shampoo_cuda_env *env, double *out, const double *grads, const double *moment_grads,
    const double *bases, double *corrected, const int64_t *table, const int64_t *table_host,
    int64_t nblocks, const int64_t *plan, const int64_t *plan_host, const uint8_t *active,
    const shampoo_soap_params *p)
{
    return soap_direction<double>(env, out, grads, moment_grads, bases, corrected, table,
                                  table_host, nblocks, plan, plan_host, active, p);
}
