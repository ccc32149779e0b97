/* The pointer-table passes on the device (param_io_cuda.h): gather_io, finish_io, scatter_io.
 * Each is the param-layout op of elementwise_cuda.cu / finish_cuda.cu with the same launch
 * (grid.x = table block, grid.y = chunks) and the same arithmetic in `real`, element for
 * element; only where an element is read or written differs: through block b's pointer at
 * offset shampoo_param_index(row, i) - PARAM_OFFSET, in the tensor's own dtype. So the
 * results are bitwise those of the staged CUDA step (copy in, op, torch's add_). */
#include <string.h>

#include "elementwise_cuda.cuh"
#include "io_staging_cuda.cuh"
#include "param_io_cuda.h"

/* ---- element access --------------------------------------------------------------------- */

/* bfloat16 is the upper half of a float32: widening is exact. */
__device__ static inline float bf16_load(const void *base, int64_t i)
{
    const uint32_t u = (uint32_t)((const uint16_t *)base)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, NaN to torch's canonical 0x7FC0 (c10::BFloat16), as param_io.c. */
__device__ static inline void bf16_store(void *base, int64_t i, float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint16_t h = isnan(f) ? (uint16_t)0x7FC0
                                : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    ((uint16_t *)base)[i] = h;
}

template <typename real> __device__ static inline real io_load(const void *base, int64_t i, int bf16)
{
    return bf16 ? (real)bf16_load(base, i) : ((const real *)base)[i];
}

template <typename real>
__device__ static inline void io_store(void *base, int64_t i, real x, int bf16)
{
    if (bf16)
        bf16_store(base, i, (float)x);
    else
        ((real *)base)[i] = x;
}

/* Offset of element i (row-major inside the block) from the block's first element. */
__device__ static inline int64_t io_offset(const int64_t *row, int64_t i)
{
    return shampoo_param_index(row, i) - row[SHAMPOO_BF_PARAM_OFFSET];
}

/* The host checks every io op shares: the tables' arguments, the dtype, and that the
 * pointer table has a pointer exactly for the active blocks. */
template <typename real>
static bool io_args_ok(const shampoo_cuda_env *env, int64_t nblocks, const int64_t *table,
                       const int64_t *table_host, const uint8_t *active_host,
                       shampoo_io_dtype dtype, const void *const *ptrs)
{
    if (env == nullptr || nblocks < 0 ||
        (nblocks > 0 && (table == nullptr || table_host == nullptr || active_host == nullptr ||
                         ptrs == nullptr)) ||
        !(dtype == SHAMPOO_IO_REAL || (dtype == SHAMPOO_IO_BF16 && sizeof(real) == 4)))
        return false;
    for (int64_t b = 0; b < nblocks; b++)
        if ((active_host[b] != 0) != (ptrs[b] != nullptr))
            return false;
    return true;
}

/* Workspace regions: [finish's ratios][pointer tables]. */
extern "C" size_t shampoo_cuda_io_workspace(int64_t nblocks, int tables, int finish)
{
    if (nblocks <= 0)
        return 0;
    const size_t ratios = finish ? shampoo_cuda_finish_workspace(nblocks) : 0;
    return ratios + shampoo_align256((size_t)nblocks * sizeof(void *) * (size_t)tables);
}

static bool workspace_ok(const shampoo_cuda_env *env, int64_t nblocks, int tables, int finish)
{
    return env->workspace != nullptr &&
           env->workspace_bytes >= shampoo_cuda_io_workspace(nblocks, tables, finish);
}

/* ---- gather_io -------------------------------------------------------------------------- */

template <typename real>
__global__ static void gather_io_kernel(real *grad_blocks, real *param_blocks,
                                        void *const *ptrs, int64_t nblocks, int bf16,
                                        const int64_t *table, int use_l2, real wd,
                                        int64_t step, int64_t *fail, double *sq_norms)
{
    const int64_t b = blockIdx.x;
    const void *gs = ptrs[b], *ws = ptrs[nblocks + b];
    if (gs == nullptr)
        return; /* inactive, uniform over the thread block (the barrier below is safe) */
    const int64_t *row = shampoo_table_row(table, b);
    const int64_t off = row[SHAMPOO_BF_BLOCK_OFFSET], numel = row[SHAMPOO_BF_NUMEL];
    int bad = 0;
    double sq = 0.0; /* as gather_kernel: ||G_b||^2 in double */
    for (int64_t i = first_elem(); i < numel; i += elem_stride()) {
        const int64_t e = io_offset(row, i);
        real x = io_load<real>(gs, e, bf16);
        if (use_l2)
            x = x + wd * io_load<real>(ws, e, bf16); /* SPEC §4.3: G + wd * W */
        bad |= !isfinite(x);
        sq += (double)x * (double)x;
        if (grad_blocks != nullptr)
            grad_blocks[off + i] = x;
        if (param_blocks != nullptr)
            param_blocks[off + i] = io_load<real>(ws, e, bf16);
    }
    if (sq_norms != nullptr && sq != 0.0)
        atomicAdd(&sq_norms[b], sq); /* zeroed before the launch */
    if (fail == nullptr)
        return; /* uniform: every thread of the block leaves here, or none */
    /* as gather_kernel: one pair of atomics per thread block at most */
    if (__syncthreads_or(bad) && threadIdx.x == 0 && fail[0] >= step) {
        atomicMin((long long *)&fail[0], (long long)step);
        atomicMin((long long *)&fail[1], (long long)b);
    }
}

template <typename real>
static shampoo_status gather_io(const shampoo_cuda_env *env, real *grad_blocks,
                                real *param_blocks, const void *const *grads,
                                const void *const *params, shampoo_io_dtype dtype,
                                const int64_t *table, const int64_t *table_host,
                                int64_t nblocks, const uint8_t *active_host,
                                double l2_weight_decay, int64_t step, int64_t *fail,
                                double *sq_norms)
{
    const bool need_w = param_blocks != nullptr || l2_weight_decay != 0.0;
    if (!io_args_ok<real>(env, nblocks, table, table_host, active_host, dtype, grads) ||
        (need_w && nblocks > 0 && params == nullptr) ||
        (need_w && params != nullptr &&
         !io_args_ok<real>(env, nblocks, table, table_host, active_host, dtype, params)))
        return SHAMPOO_ERR_INVALID_ARG;
    if (nblocks == 0)
        return SHAMPOO_OK;
    if (!workspace_ok(env, nblocks, 2, 0))
        return SHAMPOO_ERR_INVALID_ARG;
    if (!grid_fits(nblocks))
        return SHAMPOO_ERR_UNSUPPORTED;
    void **ptrs = (void **)env->workspace;
    const void *const *tables[2] = {grads, need_w ? params : nullptr};
    SHAMPOO_TRY(shampoo_cuda_upload_tables(env, ptrs, tables, 2, nblocks));
    const cudaStream_t stream = shampoo_stream(env);
    if (sq_norms != nullptr)
        SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemsetAsync, sq_norms, 0,
                                       (size_t)nblocks * sizeof(double), stream));
    gather_io_kernel<real><<<block_grid(table_host, nblocks), SHAMPOO_CUDA_THREADS, 0, stream>>>(
        grad_blocks, param_blocks, ptrs, nblocks, dtype == SHAMPOO_IO_BF16, table,
        l2_weight_decay != 0.0, (real)l2_weight_decay, step, fail, sq_norms);
    return SHAMPOO_LAUNCHED("gather_io_kernel");
}

/* ---- finish_io -------------------------------------------------------------------------- */

/* Phase 1 as finish's: the grafting ratio of every block with a pointer. */
template <typename real>
__global__ static void finish_io_norms_kernel(double *ratio, const real *grads,
                                              const real *shampoo_dir, const real *V,
                                              const int64_t *table, void *const *ptrs,
                                              real bcg, real eps, const int64_t *fail)
{
    if (ptrs[blockIdx.x] == nullptr || shampoo_step_failed(fail))
        return; /* uniform over the block; phase 2 writes nothing when the step failed */
    finish_norms_block<real>(ratio, grads, shampoo_dir, V, table, bcg, eps);
}

/* finish_kernel with W read and written through the pointers: W <- W + update, rounded once
 * to the parameters' dtype (torch's add_ of the staged step). */
template <typename real>
__global__ static void finish_io_kernel(void *const *ptrs, int bf16, const real *grads,
                                        const real *shampoo_dir, const real *V,
                                        real *momentum_state, const double *ratio,
                                        const int64_t *table, finish_scalars<real> s,
                                        const int64_t *fail)
{
    const int64_t b = blockIdx.x;
    void *ws = ptrs[b];
    if (ws == nullptr || shampoo_step_failed(fail))
        return; /* a failed step writes nothing: parameters and momentum stay as they were */
    const int64_t *row = shampoo_table_row(table, b);
    const int64_t off = row[SHAMPOO_BF_BLOCK_OFFSET], numel = row[SHAMPOO_BF_NUMEL];
    const real r = ratio != nullptr ? (real)ratio[b] : (real)1;
    for (int64_t j = first_elem(); j < numel; j += elem_stride()) {
        const int64_t e = io_offset(row, j);
        const real w = io_load<real>(ws, e, bf16);
        const real u = finish_update<real>(s, grads, shampoo_dir, V, momentum_state,
                                           ratio != nullptr, r, off + j, w);
        io_store<real>(ws, e, w + u, bf16);
    }
}

template <typename real>
static shampoo_status finish_io(const shampoo_cuda_env *env, void *const *params,
                                shampoo_io_dtype dtype, const real *grads,
                                const real *shampoo_dir, const real *grafting_state,
                                real *momentum_state, const int64_t *table,
                                const int64_t *table_host, int64_t nblocks,
                                const uint8_t *active_host, const shampoo_finish_params *p,
                                const int64_t *fail)
{
    if (!io_args_ok<real>(env, nblocks, table, table_host, active_host, dtype, params) ||
        !finish_args_ok(p, grads, shampoo_dir, grafting_state, momentum_state))
        return SHAMPOO_ERR_INVALID_ARG;
    if (nblocks == 0)
        return SHAMPOO_OK;
    if (!workspace_ok(env, nblocks, 1, 1))
        return SHAMPOO_ERR_INVALID_ARG;
    if (!grid_fits(nblocks))
        return SHAMPOO_ERR_UNSUPPORTED;
    const bool rescale = !p->grafting_phase && p->graft != SHAMPOO_GRAFT_NONE;
    const real *V = p->graft == SHAMPOO_GRAFT_DIAGONAL ? grafting_state : nullptr;
    const finish_scalars<real> s = finish_scalars_of<real>(p);
    double *ratio = (double *)env->workspace;
    void **ptrs = (void **)((char *)env->workspace + shampoo_cuda_finish_workspace(nblocks));
    const void *const *tables[1] = {(const void *const *)params};
    SHAMPOO_TRY(shampoo_cuda_upload_tables(env, ptrs, tables, 1, nblocks));
    const cudaStream_t stream = shampoo_stream(env);
    if (rescale) {
        finish_io_norms_kernel<real><<<(unsigned)nblocks, SHAMPOO_CUDA_THREADS, 0, stream>>>(
            ratio, grads, shampoo_dir, V, table, ptrs, s.bcg, s.eps, fail);
        SHAMPOO_TRY(SHAMPOO_LAUNCHED("finish_io_norms_kernel"));
    }
    finish_io_kernel<real><<<block_grid(table_host, nblocks), SHAMPOO_CUDA_THREADS, 0, stream>>>(
        ptrs, dtype == SHAMPOO_IO_BF16, grads, shampoo_dir, V, momentum_state,
        rescale ? ratio : nullptr, table, s, fail);
    return SHAMPOO_LAUNCHED("finish_io_kernel");
}

/* ---- scatter_io ------------------------------------------------------------------------- */

template <typename real>
__global__ static void scatter_io_kernel(void *const *ptrs, int bf16, const real *blocks,
                                         const int64_t *table, int accumulate)
{
    const int64_t b = blockIdx.x;
    void *ws = ptrs[b];
    if (ws == nullptr)
        return;
    const int64_t *row = shampoo_table_row(table, b);
    const int64_t off = row[SHAMPOO_BF_BLOCK_OFFSET], numel = row[SHAMPOO_BF_NUMEL];
    for (int64_t i = first_elem(); i < numel; i += elem_stride()) {
        const int64_t e = io_offset(row, i);
        real x = blocks[off + i];
        if (accumulate)
            x = io_load<real>(ws, e, bf16) + x; /* torch: W.add_(x) */
        io_store<real>(ws, e, x, bf16);
    }
}

template <typename real>
static shampoo_status scatter_io(const shampoo_cuda_env *env, void *const *params,
                                 shampoo_io_dtype dtype, const real *blocks,
                                 const int64_t *table, const int64_t *table_host,
                                 int64_t nblocks, const uint8_t *active_host, int accumulate)
{
    if (!io_args_ok<real>(env, nblocks, table, table_host, active_host, dtype, params) ||
        blocks == nullptr)
        return SHAMPOO_ERR_INVALID_ARG;
    if (nblocks == 0)
        return SHAMPOO_OK;
    if (!workspace_ok(env, nblocks, 1, 0))
        return SHAMPOO_ERR_INVALID_ARG;
    if (!grid_fits(nblocks))
        return SHAMPOO_ERR_UNSUPPORTED;
    void **ptrs = (void **)env->workspace;
    const void *const *tables[1] = {(const void *const *)params};
    SHAMPOO_TRY(shampoo_cuda_upload_tables(env, ptrs, tables, 1, nblocks));
    scatter_io_kernel<real><<<block_grid(table_host, nblocks), SHAMPOO_CUDA_THREADS, 0,
                              shampoo_stream(env)>>>(ptrs, dtype == SHAMPOO_IO_BF16, blocks,
                                                     table, accumulate != 0);
    return SHAMPOO_LAUNCHED("scatter_io_kernel");
}

/* ---- C entry points --------------------------------------------------------------------- */

#define SHAMPOO_CUDA_IO_ENTRIES(real, sfx)                                                     \
    extern "C" shampoo_status shampoo_cuda_gather_io_##sfx(                                    \
        const shampoo_cuda_env *env, real *grad_blocks, real *param_blocks,                    \
        const void *const *grads, const void *const *params, shampoo_io_dtype dtype,           \
        const int64_t *table, const int64_t *table_host, int64_t nblocks,                      \
        const uint8_t *active_host, double l2_weight_decay, int64_t step, int64_t *fail,       \
        double *sq_norms)                                                                      \
    {                                                                                          \
        return gather_io<real>(env, grad_blocks, param_blocks, grads, params, dtype, table,    \
                               table_host, nblocks, active_host, l2_weight_decay, step, fail,  \
                               sq_norms);                                                      \
    }                                                                                          \
    extern "C" shampoo_status shampoo_cuda_finish_io_##sfx(                                    \
        const shampoo_cuda_env *env, void *const *params, shampoo_io_dtype dtype,              \
        const real *grads, const real *shampoo_dir, const real *grafting_state,                \
        real *momentum_state, const int64_t *table, const int64_t *table_host,                 \
        int64_t nblocks, const uint8_t *active_host, const shampoo_finish_params *p,           \
        const int64_t *fail)                                                                   \
    {                                                                                          \
        return finish_io<real>(env, params, dtype, grads, shampoo_dir, grafting_state,         \
                               momentum_state, table, table_host, nblocks, active_host, p,     \
                               fail);                                                          \
    }                                                                                          \
    extern "C" shampoo_status shampoo_cuda_scatter_io_##sfx(                                   \
        const shampoo_cuda_env *env, void *const *params, shampoo_io_dtype dtype,              \
        const real *blocks, const int64_t *table, const int64_t *table_host, int64_t nblocks,  \
        const uint8_t *active_host, int accumulate)                                            \
    {                                                                                          \
        return scatter_io<real>(env, params, dtype, blocks, table, table_host, nblocks,        \
                                active_host, accumulate);                                      \
    }

SHAMPOO_CUDA_IO_ENTRIES(float, f32)
SHAMPOO_CUDA_IO_ENTRIES(double, f64)
