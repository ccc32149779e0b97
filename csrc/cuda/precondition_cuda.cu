/* Preconditioning on the GPU (shampoo_cuda.h; CPU twin: core/precondition.inc). Each block
 * of order d is contracted with its d inverse roots in turn, T <- T^T Q_k, by the batched
 * block contraction (block_contraction_cuda.cuh: one cuBLAS batched GEMM per shape group and
 * dimension); order-0 blocks are copied. */
#include "block_contraction_cuda.cuh"

namespace {

/* Workspace regions (bytes): two block-layout intermediates, then the contraction's pointer
 * arrays. */
struct contract_workspace {
    size_t scratch, pointers, total;
    int64_t nitems;
};

contract_workspace contract_workspace_of(const int64_t *table_host, int64_t nblocks,
                                         const int64_t *plan_host, int real_bytes)
{
    int64_t block_numel, factor_numel;
    shampoo_table_extents(table_host, nblocks, &block_numel, &factor_numel);
    contract_workspace w;
    w.nitems = plan_host[1];
    w.scratch = shampoo_align256((size_t)block_numel * (size_t)real_bytes);
    w.pointers = shampoo_contract::pointer_bytes(w.nitems);
    w.total = 2 * w.scratch + w.pointers;
    return w;
}

/* Order-0 blocks (one element): the identity preconditioner, P = G (SPEC §2.4). */
template <typename real>
__global__ void copy_scalars(const int64_t *table, int64_t nblocks, const uint8_t *active,
                             const real *grads, real *out)
{
    for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < nblocks;
         b += (int64_t)gridDim.x * blockDim.x) {
        const int64_t *row = shampoo_table_row(table, b);
        if (active[b] && row[SHAMPOO_BF_ORDER] == 0 && row[SHAMPOO_BF_NUMEL] > 0)
            out[row[SHAMPOO_BF_BLOCK_OFFSET]] = grads[row[SHAMPOO_BF_BLOCK_OFFSET]];
    }
}

template <typename real>
shampoo_status precondition(const shampoo_cuda_env *env, real *out, const real *grads,
                            const real *inv_roots, const int64_t *table,
                            const int64_t *table_host, int64_t nblocks, const int64_t *plan,
                            const int64_t *plan_host, const uint8_t *active)
{
    if (env == NULL || out == NULL || grads == NULL || inv_roots == NULL || nblocks < 0 ||
        (nblocks > 0 && (table == NULL || table_host == NULL || plan == NULL ||
                         plan_host == NULL || active == NULL)))
        return SHAMPOO_ERR_INVALID_ARG;
    if (nblocks == 0)
        return SHAMPOO_OK;
    const contract_workspace w = contract_workspace_of(table_host, nblocks, plan_host,
                                                       sizeof(real));
    if (w.total > 0 && (env->workspace == NULL || env->workspace_bytes < w.total))
        return SHAMPOO_ERR_INVALID_ARG;
    if (!shampoo_plan_fits_blas(plan_host))
        return SHAMPOO_ERR_UNSUPPORTED; /* cuBLAS takes int sizes: found before any launch */
    cudaStream_t stream = shampoo_stream(env);
    char *ws = (char *)env->workspace;
    real *ping = (real *)ws, *pong = (real *)(ws + w.scratch);
    const unsigned scalar_grid = (unsigned)((nblocks + SHAMPOO_CUDA_THREADS - 1) / SHAMPOO_CUDA_THREADS);
    copy_scalars<real><<<scalar_grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(table, nblocks, active,
                                                                         grads, out);
    SHAMPOO_TRY(SHAMPOO_LAUNCHED("copy_scalars"));
    if (w.nitems == 0)
        return SHAMPOO_OK;
    SHAMPOO_TRY(shampoo_blas_bind(env));
    const shampoo_contract::contraction<real> c = {env, plan, plan_host, table, active, NULL,
                                                   inv_roots, ping, pong};
    return shampoo_contract::contract<real>(c, grads, out, ws + 2 * w.scratch, false);
}

} // namespace

extern "C" size_t shampoo_cuda_precondition_workspace(const int64_t *table_host,
                                                      int64_t nblocks,
                                                      const int64_t *plan_host, int real_bytes)
{
    return contract_workspace_of(table_host, nblocks, plan_host, real_bytes).total;
}

extern "C" shampoo_status shampoo_cuda_precondition_f32(
    const shampoo_cuda_env *env, float *out, const float *grads, const float *inv_roots,
    const int64_t *table, const int64_t *table_host, int64_t nblocks, const int64_t *plan,
    const int64_t *plan_host, const uint8_t *active)
{
    return precondition<float>(env, out, grads, inv_roots, table, table_host, nblocks, plan,
                               plan_host, active);
}

extern "C" shampoo_status shampoo_cuda_precondition_f64(
    const shampoo_cuda_env *env, double *out, const double *grads, const double *inv_roots,
    const int64_t *table, const int64_t *table_host, int64_t nblocks, const int64_t *plan,
    const int64_t *plan_host, const uint8_t *active)
{
    return precondition<double>(env, out, grads, inv_roots, table, table_host, nblocks, plan,
                                plan_host, active);
}
