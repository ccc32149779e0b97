/* Preconditioning on the GPU (shampoo_cuda.h; CPU twin: core/precondition.inc). Each block
 * of order d is contracted with its d inverse roots in turn, T <- T^T Q_k (the CPU's GEMM
 * with the transposed operand); blocks of one shape do the same contractions, so each shape
 * group and dimension is one cuBLAS batched GEMM whose pointer arrays one kernel writes from
 * the batch plan. Intermediates ping-pong between two block-layout scratch buffers. */
#include "cuda_common.cuh"

#include "../core/batch_plan.h"

namespace {

/* Workspace regions (bytes): two block-layout intermediates, then the Q, T and output
 * pointer arrays, slot k * nitems + j for item j and dimension k. */
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
    w.pointers = shampoo_align256(3 * (size_t)w.nitems * SHAMPOO_MAX_ORDER * sizeof(void *));
    w.total = 2 * w.scratch + w.pointers;
    return w;
}

/* Contraction k of item j reads the gradient (k = 0) or the previous intermediate, and
 * writes the next intermediate, or `out` for the last one of an active block (an inactive
 * block's last result goes to the free intermediate, so `out` is never written for it). */
template <typename real>
__global__ void contract_pointers(const int64_t *plan, const int64_t *table,
                                  const uint8_t *active, const real *grads,
                                  const real *inv_roots, real *out, real *ping, real *pong,
                                  const real **q_ptrs, const real **t_ptrs, real **o_ptrs)
{
    const int64_t nitems = plan[1];
    const int64_t *items = shampoo_plan_items(plan);
    const int64_t total = nitems * SHAMPOO_MAX_ORDER;
    for (int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; s < total;
         s += (int64_t)gridDim.x * blockDim.x) {
        const int64_t k = s / nitems, j = s % nitems, b = items[j];
        const int64_t *row = shampoo_table_row(table, b);
        const int64_t order = row[SHAMPOO_BF_ORDER], offset = row[SHAMPOO_BF_BLOCK_OFFSET];
        if (k >= order)
            continue;
        real *const scratch[2] = {ping, pong};
        q_ptrs[s] = inv_roots + row[SHAMPOO_BF_FACTOR_OFFSET] + shampoo_factor_elem_offset(row, k);
        t_ptrs[s] = (k == 0 ? grads : scratch[(k - 1) % 2]) + offset;
        o_ptrs[s] = (k == order - 1 && active[b] ? out : scratch[k % 2]) + offset;
    }
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
    const real **q_ptrs = (const real **)(ws + 2 * w.scratch);
    const real **t_ptrs = q_ptrs + w.nitems * SHAMPOO_MAX_ORDER;
    real **o_ptrs = (real **)(t_ptrs + w.nitems * SHAMPOO_MAX_ORDER);
    const unsigned scalar_grid = (unsigned)((nblocks + SHAMPOO_CUDA_THREADS - 1) / SHAMPOO_CUDA_THREADS);
    copy_scalars<real><<<scalar_grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(table, nblocks, active,
                                                                         grads, out);
    SHAMPOO_TRY(SHAMPOO_LAUNCHED("copy_scalars"));
    if (w.nitems > 0) {
        shampoo_status st = shampoo_blas_bind(env);
        if (st != SHAMPOO_OK)
            return st;
        const int64_t slots = w.nitems * SHAMPOO_MAX_ORDER;
        const unsigned grid = (unsigned)((slots + SHAMPOO_CUDA_THREADS - 1) / SHAMPOO_CUDA_THREADS);
        contract_pointers<real><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(
            plan, table, active, grads, inv_roots, out, ping, pong, q_ptrs, t_ptrs, o_ptrs);
        /* cuBLAS reads these pointer arrays next: never hand it stale ones */
        SHAMPOO_TRY(SHAMPOO_LAUNCHED("contract_pointers"));
        /* dimension by dimension: contraction k of every group reads what k - 1 wrote */
        for (int64_t k = 0; k < SHAMPOO_MAX_ORDER; k++) {
            for (int64_t g = 0; g < plan_host[0]; g++) {
                const int64_t *grp = shampoo_plan_group(plan_host, g);
                if (k >= grp[SHAMPOO_PG_ORDER])
                    continue;
                const int n = (int)grp[SHAMPOO_PG_DIMS + k];
                const int rest = (int)(grp[SHAMPOO_PG_NUMEL] / n);
                const int64_t s = k * w.nitems + grp[SHAMPOO_PG_FIRST];
                /* row-major T' (rest x n) = T^T Q is the column-major n x rest Q_mem T_mem^T */
                SHAMPOO_TRY(shampoo_gemm_batched(env->libs, env->blas, SHAMPOO_CUBLAS_OP_N,
                                                 SHAMPOO_CUBLAS_OP_T, n, rest, n, q_ptrs + s, n,
                                                 t_ptrs + s, rest, o_ptrs + s, n,
                                                 (int)grp[SHAMPOO_PG_COUNT]));
            }
        }
    }
    return SHAMPOO_OK;
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
