/* The step's last pass on the device (elementwise.h's shampoo_finish; shampoo_cuda.h): the
 * grafting ratio per block, then the CPU's elementwise loop, launched over the whole table as
 * the other elementwise ops (elementwise_cuda.cu) and with the same -fmad=false arithmetic. */
#include "elementwise_cuda.cuh"

/* ---- finish ---------------------------------------------------------------------------- */

/* Phase 1: the grafting ratio of every active block (finish_norms_block). */
template <typename real>
__global__ static void finish_norms_kernel(double *ratio, const real *grads,
                                           const real *shampoo_dir, const real *V,
                                           const int64_t *table, const uint8_t *active,
                                           real bcg, real eps, const int64_t *fail)
{
    if (!active[blockIdx.x] || shampoo_step_failed(fail))
        return; /* phase 2 writes -0.0 without the ratio when the step failed */
    finish_norms_block<real>(ratio, grads, shampoo_dir, V, table, bcg, eps);
}

/* Phase 2: the CPU's elementwise loop; ratio is NULL when the CPU does not rescale. */
template <typename real>
__global__ static void finish_kernel(real *update_flat, const real *grads,
                                     const real *shampoo_dir, const real *V,
                                     const real *param_blocks, real *momentum_state,
                                     const double *ratio, const int64_t *table,
                                     const uint8_t *active, finish_scalars<real> s,
                                     const int64_t *fail)
{
    const int64_t b = blockIdx.x;
    if (!active[b])
        return;
    const int64_t *row = shampoo_table_row(table, b);
    const int64_t off = row[SHAMPOO_BF_BLOCK_OFFSET], numel = row[SHAMPOO_BF_NUMEL];
    if (shampoo_step_failed(fail)) {
        /* x + -0.0 == x bitwise: the caller's add leaves the parameters as they were. */
        for (int64_t j = first_elem(); j < numel; j += elem_stride())
            update_flat[shampoo_param_index(row, j)] = -(real)0;
        return;
    }
    const real r = ratio != nullptr ? (real)ratio[b] : (real)1;
    for (int64_t j = first_elem(); j < numel; j += elem_stride()) {
        const int64_t i = off + j;
        const real w = s.use_wd ? param_blocks[i] : (real)0;
        update_flat[shampoo_param_index(row, j)] =
            finish_update<real>(s, grads, shampoo_dir, V, momentum_state, ratio != nullptr, r, i, w);
    }
}

extern "C" size_t shampoo_cuda_finish_workspace(int64_t nblocks)
{
    if (nblocks <= 0)
        return 0;
    return ((size_t)nblocks * sizeof(double) + 255) / 256 * 256;
}

template <typename real>
static shampoo_status finish(const shampoo_cuda_env *env, real *update_flat, const real *grads,
                             const real *shampoo_dir, const real *grafting_state,
                             const real *param_blocks, real *momentum_state,
                             const int64_t *table, const int64_t *table_host, int64_t nblocks,
                             const uint8_t *active, const shampoo_finish_params *p,
                             const int64_t *fail)
{
    if (!table_args_ok(env, nblocks, table, table_host, active) || update_flat == nullptr ||
        !finish_args_ok(p, grads, shampoo_dir, grafting_state, momentum_state) ||
        (p->decoupled_weight_decay != 0.0 && param_blocks == nullptr))
        return SHAMPOO_ERR_INVALID_ARG;
    if (nblocks == 0)
        return SHAMPOO_OK;
    /* Phase 1 (the CPU's rescale) needs one double per block of scratch. */
    const bool rescale = !p->grafting_phase && p->graft != SHAMPOO_GRAFT_NONE;
    if (rescale && (env->workspace == nullptr ||
                    env->workspace_bytes < shampoo_cuda_finish_workspace(nblocks)))
        return SHAMPOO_ERR_INVALID_ARG;
    if (!grid_fits(nblocks))
        return SHAMPOO_ERR_UNSUPPORTED;
    const real *V = p->graft == SHAMPOO_GRAFT_DIAGONAL ? grafting_state : nullptr;
    const finish_scalars<real> s = finish_scalars_of<real>(p);
    double *ratio = rescale ? (double *)env->workspace : nullptr;
    const cudaStream_t stream = shampoo_stream(env);
    if (rescale) {
        finish_norms_kernel<real><<<(unsigned)nblocks, SHAMPOO_CUDA_THREADS, 0, stream>>>(
            ratio, grads, shampoo_dir, V, table, active, s.bcg, s.eps, fail);
        /* finish must not run on norms that were never computed */
        SHAMPOO_TRY(SHAMPOO_LAUNCHED("finish_norms_kernel"));
    }
    finish_kernel<real><<<block_grid(table_host, nblocks), SHAMPOO_CUDA_THREADS, 0, stream>>>(
        update_flat, grads, shampoo_dir, V, param_blocks, momentum_state, ratio, table, active,
        s, fail);
    return SHAMPOO_LAUNCHED("finish_kernel");
}

/* ---- C entry points -------------------------------------------------------------------- */

#define SHAMPOO_CUDA_FINISH_ENTRIES(real, sfx)                                                 \
    extern "C" shampoo_status shampoo_cuda_finish_##sfx(                                       \
        const shampoo_cuda_env *env, real *update_flat, const real *grads,                     \
        const real *shampoo_dir, const real *grafting_state, const real *param_blocks,         \
        real *momentum_state, const int64_t *table, const int64_t *table_host,                 \
        int64_t nblocks, const uint8_t *active, const shampoo_finish_params *p,                \
        const int64_t *fail)                                                                   \
    {                                                                                          \
        return finish<real>(env, update_flat, grads, shampoo_dir, grafting_state,              \
                            param_blocks, momentum_state, table, table_host, nblocks, active,  \
                            p, fail);                                                          \
    }

SHAMPOO_CUDA_FINISH_ENTRIES(float, f32)
SHAMPOO_CUDA_FINISH_ENTRIES(double, f64)
