/* The batched block contraction (block_contraction_cuda.cuh), float and double. */
#include "block_contraction_cuda.cuh"

#include "../core/batch_plan.h"

namespace shampoo_contract {

namespace {

/* Contraction k of item j reads src (k = 0) or the previous intermediate and writes the next
 * intermediate, or dst for the last one of an active block that `has` (NULL: all). */
template <typename real>
__global__ void contraction_pointers(const int64_t *plan, const int64_t *table,
                                     const uint8_t *active, const int32_t *has, const real *src,
                                     const real *mats, real *dst, real *ping, real *pong,
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
        const bool last = k == order - 1 && active[b] && (has == NULL || has[b]);
        q_ptrs[s] = mats + row[SHAMPOO_BF_FACTOR_OFFSET] + shampoo_factor_elem_offset(row, k);
        t_ptrs[s] = (k == 0 ? src : scratch[(k - 1) % 2]) + offset;
        o_ptrs[s] = (last ? dst : scratch[k % 2]) + offset;
    }
}

} // namespace

size_t pointer_bytes(int64_t nitems)
{
    return shampoo_align256(3 * (size_t)nitems * SHAMPOO_MAX_ORDER * sizeof(void *));
}

template <typename real>
shampoo_status contract(const contraction<real> &c, const real *src, real *dst, char *pointers,
                        bool transpose)
{
    const int64_t nitems = c.plan_host[1];
    if (nitems == 0)
        return SHAMPOO_OK;
    cudaStream_t stream = shampoo_stream(c.env);
    const int64_t slots = nitems * SHAMPOO_MAX_ORDER;
    const real **q_ptrs = (const real **)pointers;
    const real **t_ptrs = q_ptrs + slots;
    real **o_ptrs = (real **)(t_ptrs + slots);
    const unsigned grid = (unsigned)((slots + SHAMPOO_CUDA_THREADS - 1) / SHAMPOO_CUDA_THREADS);
    contraction_pointers<real><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(
        c.plan, c.table, c.active, c.has, src, c.mats, dst, c.ping, c.pong, q_ptrs, t_ptrs,
        o_ptrs);
    /* cuBLAS reads these pointer arrays next: never hand it stale ones */
    SHAMPOO_TRY(SHAMPOO_LAUNCHED("contraction_pointers"));
    /* dimension by dimension: contraction k of every group reads what k - 1 wrote */
    for (int64_t k = 0; k < SHAMPOO_MAX_ORDER; k++) {
        for (int64_t g = 0; g < c.plan_host[0]; g++) {
            const int64_t *grp = shampoo_plan_group(c.plan_host, g);
            if (k >= grp[SHAMPOO_PG_ORDER])
                continue;
            const int n = (int)grp[SHAMPOO_PG_DIMS + k];
            const int rest = (int)(grp[SHAMPOO_PG_NUMEL] / n);
            const int64_t s = k * nitems + grp[SHAMPOO_PG_FIRST];
            /* the CPU's T' = T^T op(Q) (row-major rest x n) is the column-major
             * op(Q)^T T_mem^T, where Q's memory reads as Q^T */
            SHAMPOO_TRY(shampoo_gemm_batched(c.env->libs, c.env->blas,
                                             transpose ? SHAMPOO_CUBLAS_OP_T : SHAMPOO_CUBLAS_OP_N,
                                             SHAMPOO_CUBLAS_OP_T, n, rest, n, q_ptrs + s, n,
                                             t_ptrs + s, rest, o_ptrs + s, n,
                                             (int)grp[SHAMPOO_PG_COUNT]));
        }
    }
    return SHAMPOO_OK;
}

template shampoo_status contract<float>(const contraction<float> &, const float *, float *,
                                        char *, bool);
template shampoo_status contract<double>(const contraction<double> &, const double *, double *,
                                         char *, bool);

} // namespace shampoo_contract
