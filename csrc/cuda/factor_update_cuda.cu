/* Factor accumulation on the GPU (shampoo_cuda.h; CPU twin: core/factor_update.inc).
 * Per call: one kernel writes the pointer arrays of every batched GEMM from the batch plan,
 * one kernel per middle dimension unfolds order >= 3 blocks, one cuBLAS batched GEMM per
 * shape group and dimension forms the Gram matrices C = U U^T, and one kernel accumulates
 * F <- beta2 F + (1 - beta2) C (or F + C) for every factor, reading C's upper triangle as the
 * CPU reads SYRK's, so both triangles of F get the same value. */
#include "cuda_common.cuh"

#include "../core/batch_plan.h"

namespace {

/* Workspace regions (bytes), in order: Gram matrices in factor layout, unfolded blocks in
 * block layout (only when a block has a middle dimension), then the A and C pointer arrays,
 * slot k * nitems + j for item j and dimension k. */
struct gram_workspace {
    size_t gram, unfold, pointers, total;
    int64_t nitems;
};

gram_workspace gram_workspace_of(const int64_t *table_host, int64_t nblocks,
                                 const int64_t *plan_host, int real_bytes)
{
    int64_t block_numel, factor_numel, max_order = 0;
    shampoo_table_extents(table_host, nblocks, &block_numel, &factor_numel);
    for (int64_t g = 0; g < plan_host[0]; g++) {
        int64_t order = shampoo_plan_group(plan_host, g)[SHAMPOO_PG_ORDER];
        max_order = order > max_order ? order : max_order;
    }
    gram_workspace w;
    w.nitems = plan_host[1];
    w.gram = shampoo_align256((size_t)factor_numel * (size_t)real_bytes);
    w.unfold = max_order >= 3 ? shampoo_align256((size_t)block_numel * (size_t)real_bytes) : 0;
    w.pointers = shampoo_align256(2 * (size_t)w.nitems * SHAMPOO_MAX_ORDER * sizeof(void *));
    w.total = w.gram + w.unfold + w.pointers;
    return w;
}

/* A_{k,j}: the mode-k unfolding of item j's gradient, read in place for the first and last
 * dimensions and from the unfold buffer for middle ones; C_{k,j}: its Gram matrix slot. */
template <typename real>
__global__ void gram_pointers(const int64_t *plan, const int64_t *table, const real *grads,
                              const real *unfold, real *gram, const real **a_ptrs,
                              real **c_ptrs)
{
    const int64_t nitems = plan[1];
    const int64_t *items = shampoo_plan_items(plan);
    const int64_t total = nitems * SHAMPOO_MAX_ORDER;
    for (int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; s < total;
         s += (int64_t)gridDim.x * blockDim.x) {
        const int64_t k = s / nitems, j = s % nitems;
        const int64_t *row = shampoo_table_row(table, items[j]);
        const int64_t order = row[SHAMPOO_BF_ORDER];
        if (k >= order)
            continue;
        const bool middle = k > 0 && k < order - 1;
        a_ptrs[s] = (middle ? unfold : grads) + row[SHAMPOO_BF_BLOCK_OFFSET];
        c_ptrs[s] = gram + row[SHAMPOO_BF_FACTOR_OFFSET] + shampoo_factor_elem_offset(row, k);
    }
}

/* For every block with a middle dimension k: viewing G as (outer, n, inner) row-major, write
 * U[i, o * inner + q] = G[o, i, q] (n x outer*inner, row-major) at the block's offset. */
template <typename real>
__global__ void unfold_middle(const int64_t *table, const real *grads, real *unfold, int64_t k)
{
    const int64_t *row = shampoo_table_row(table, blockIdx.x);
    const int64_t order = row[SHAMPOO_BF_ORDER], numel = row[SHAMPOO_BF_NUMEL];
    if (k <= 0 || k >= order - 1 || numel == 0)
        return;
    int64_t inner = 1;
    for (int64_t j = k + 1; j < order; j++)
        inner *= row[SHAMPOO_BF_DIMS + j];
    const int64_t n = row[SHAMPOO_BF_DIMS + k], rest = numel / n;
    const real *g = grads + row[SHAMPOO_BF_BLOCK_OFFSET];
    real *u = unfold + row[SHAMPOO_BF_BLOCK_OFFSET];
    for (int64_t e = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; e < numel;
         e += (int64_t)gridDim.y * blockDim.x) {
        const int64_t q = e % inner, i = (e / inner) % n, o = e / (inner * n);
        u[i * rest + o * inner + q] = g[e];
    }
}

/* F_out = F_in + C or F_in * beta2 + (1 - beta2) * C over every factor element of block
 * blockIdx.x, C read from its column-major upper triangle (a zero C for an empty block);
 * inactive blocks copy F_in through. Writes nothing once the step has failed. */
template <typename real>
__global__ void accumulate(const int64_t *table, const uint8_t *active, const real *gram,
                           const real *f_in, real *f_out, bool plain_sum, real beta2,
                           real one_minus_beta2, const int64_t *fail)
{
    if (shampoo_step_failed(fail))
        return;
    const int64_t b = blockIdx.x;
    const int64_t *row = shampoo_table_row(table, b);
    const int64_t total = shampoo_row_factor_numel(row);
    const int64_t base = row[SHAMPOO_BF_FACTOR_OFFSET];
    const bool is_active = active[b] != 0, empty = row[SHAMPOO_BF_NUMEL] == 0;
    for (int64_t e = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.y * blockDim.x) {
        const int64_t x = base + e;
        if (!is_active) {
            if (f_out != f_in)
                f_out[x] = f_in[x];
            continue;
        }
        int64_t k, i, j, n;
        shampoo_factor_element(row, e, &k, &i, &j, &n);
        const real *c = gram + x - (i * n + j);
        const real cij = empty ? (real)0 : (i <= j ? c[i + j * n] : c[j + i * n]);
        f_out[x] = plain_sum ? f_in[x] + cij : f_in[x] * beta2 + one_minus_beta2 * cij;
    }
}

template <typename real>
shampoo_status factor_update(const shampoo_cuda_env *env, real *factors_out,
                             const real *factors_in, const real *grads, const int64_t *table,
                             const int64_t *table_host, int64_t nblocks, const int64_t *plan,
                             const int64_t *plan_host, const uint8_t *active, double beta2,
                             const int64_t *fail)
{
    if (env == NULL || factors_out == NULL || factors_in == NULL || grads == NULL ||
        nblocks < 0 ||
        (nblocks > 0 && (table == NULL || table_host == NULL || plan == NULL ||
                         plan_host == NULL || active == NULL)))
        return SHAMPOO_ERR_INVALID_ARG;
    if (nblocks == 0)
        return SHAMPOO_OK;
    const gram_workspace w = gram_workspace_of(table_host, nblocks, plan_host, sizeof(real));
    /* a zero-byte workspace (nothing to stage) is valid and arrives as NULL */
    if (w.total > 0 && (env->workspace == NULL || env->workspace_bytes < w.total))
        return SHAMPOO_ERR_INVALID_ARG;
    if (!shampoo_plan_fits_blas(plan_host))
        return SHAMPOO_ERR_UNSUPPORTED; /* cuBLAS takes int sizes: found before any launch */
    cudaStream_t stream = shampoo_stream(env);
    char *ws = (char *)env->workspace;
    real *gram = (real *)ws;
    real *unfold = (real *)(ws + w.gram);
    const real **a_ptrs = (const real **)(ws + w.gram + w.unfold);
    real **c_ptrs = (real **)(a_ptrs + w.nitems * SHAMPOO_MAX_ORDER);
    if (w.nitems > 0) {
        shampoo_status st = shampoo_blas_bind(env);
        if (st != SHAMPOO_OK)
            return st;
        const int64_t slots = w.nitems * SHAMPOO_MAX_ORDER;
        const unsigned grid = (unsigned)((slots + SHAMPOO_CUDA_THREADS - 1) / SHAMPOO_CUDA_THREADS);
        gram_pointers<real><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(plan, table, grads, unfold,
                                                                       gram, a_ptrs, c_ptrs);
        /* cuBLAS reads these pointer arrays next: never hand it stale ones */
        SHAMPOO_TRY(SHAMPOO_LAUNCHED("gram_pointers"));
        const dim3 blocks_grid((unsigned)nblocks, shampoo_chunks_for(table_host, nblocks));
        for (int64_t k = 0; k < SHAMPOO_MAX_ORDER; k++) {
            bool has_middle = false;
            for (int64_t g = 0; g < plan_host[0]; g++)
                has_middle |= k > 0 && k < shampoo_plan_group(plan_host, g)[SHAMPOO_PG_ORDER] - 1;
            if (has_middle) {
                unfold_middle<real><<<blocks_grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(
                    table, grads, unfold, k);
                SHAMPOO_TRY(SHAMPOO_LAUNCHED("unfold_middle"));
            }
            for (int64_t g = 0; g < plan_host[0]; g++) {
                const int64_t *grp = shampoo_plan_group(plan_host, g);
                const int64_t order = grp[SHAMPOO_PG_ORDER];
                if (k >= order)
                    continue;
                const int n = (int)grp[SHAMPOO_PG_DIMS + k];
                const int rest = (int)(grp[SHAMPOO_PG_NUMEL] / n);
                const int64_t s = k * w.nitems + grp[SHAMPOO_PG_FIRST];
                const int count = (int)grp[SHAMPOO_PG_COUNT];
                if (k == order - 1 && order > 1) {
                    /* G is rest x n row-major: the column-major n x rest A, C = A A^T */
                    SHAMPOO_TRY(shampoo_gemm_batched(env->libs, env->blas, SHAMPOO_CUBLAS_OP_N,
                                                     SHAMPOO_CUBLAS_OP_T, n, n, rest, a_ptrs + s,
                                                     n, a_ptrs + s, n, c_ptrs + s, n, count));
                } else {
                    /* U is n x rest row-major: the column-major rest x n A, C = A^T A */
                    SHAMPOO_TRY(shampoo_gemm_batched(env->libs, env->blas, SHAMPOO_CUBLAS_OP_T,
                                                     SHAMPOO_CUBLAS_OP_N, n, n, rest, a_ptrs + s,
                                                     rest, a_ptrs + s, rest, c_ptrs + s, n,
                                                     count));
                }
            }
        }
    }
    const dim3 grid((unsigned)nblocks, shampoo_chunks_for(table_host, nblocks, true));
    accumulate<real><<<grid, SHAMPOO_CUDA_THREADS, 0, stream>>>(
        table, active, gram, factors_in, factors_out, beta2 == 1.0, (real)beta2,
        (real)(1.0 - beta2), fail);
    return SHAMPOO_LAUNCHED("accumulate");
}

} // namespace

extern "C" size_t shampoo_cuda_factor_update_workspace(const int64_t *table_host,
                                                       int64_t nblocks,
                                                       const int64_t *plan_host,
                                                       int real_bytes)
{
    return gram_workspace_of(table_host, nblocks, plan_host, real_bytes).total;
}

extern "C" shampoo_status shampoo_cuda_factor_update_f32(
    const shampoo_cuda_env *env, float *factors_out, const float *factors_in,
    const float *grads, const int64_t *table, const int64_t *table_host, int64_t nblocks,
    const int64_t *plan, const int64_t *plan_host, const uint8_t *active, double beta2,
    const int64_t *fail)
{
    return factor_update<float>(env, factors_out, factors_in, grads, table, table_host,
                                nblocks, plan, plan_host, active, beta2, fail);
}

extern "C" shampoo_status shampoo_cuda_factor_update_f64(
    const shampoo_cuda_env *env, double *factors_out, const double *factors_in,
    const double *grads, const int64_t *table, const int64_t *table_host, int64_t nblocks,
    const int64_t *plan, const int64_t *plan_host, const uint8_t *active, double beta2,
    const int64_t *fail)
{
    return factor_update<double>(env, factors_out, factors_in, grads, table, table_host,
                                 nblocks, plan, plan_host, active, beta2, fail);
}
