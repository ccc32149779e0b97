/* The elementwise passes (elementwise.h) on the device: gather, scatter, moments
 * (shampoo_cuda.h; finish is in finish_cuda.cu). Each
 * op is one launch over the whole table: grid.x = table block, grid.y = chunks of
 * SHAMPOO_CUDA_THREADS elements, each thread striding along y over the rest of its block.
 * The arithmetic repeats the CPU bodies (elementwise.inc) op for op in
 * `real`; the build passes -fmad=false so no product is fused into an add, as on the CPU. */
#include "elementwise_cuda.cuh"

/* ---- gather ---------------------------------------------------------------------------- */

template <typename real>
__global__ static void gather_kernel(real *grad_blocks, real *param_blocks,
                                     const real *grad_flat, const real *param_flat,
                                     const int64_t *table, const uint8_t *active, int use_l2,
                                     real wd, int64_t step, int64_t *fail, double *sq_norms)
{
    const int64_t b = blockIdx.x;
    if (!active[b])
        return; /* uniform over the thread block, so the __syncthreads_or below is safe */
    const int64_t *row = shampoo_table_row(table, b);
    const int64_t off = row[SHAMPOO_BF_BLOCK_OFFSET], numel = row[SHAMPOO_BF_NUMEL];
    int bad = 0;
    double sq = 0.0; /* ||G_b||^2 in double, as the CPU gather (the no-overflow check) */
    for (int64_t i = first_elem(); i < numel; i += elem_stride()) {
        const int64_t p = shampoo_param_index(row, i);
        real x = grad_flat[p];
        if (use_l2)
            x = x + wd * param_flat[p]; /* SPEC §4.3: G + wd * W */
        bad |= !isfinite(x);
        sq += (double)x * (double)x;
        grad_blocks[off + i] = x;
        if (param_blocks != nullptr)
            param_blocks[off + i] = param_flat[p];
    }
    if (sq_norms != nullptr && sq != 0.0)
        atomicAdd(&sq_norms[b], sq); /* zeroed before the launch */
    /* One pair of atomics per thread block at most, even when every element is bad. Only
     * this kernel writes the flag during the launch, and only down to `step`, so the
     * "earlier step failed" test cannot change under us. */
    if (__syncthreads_or(bad) && threadIdx.x == 0 && fail[0] >= step) {
        atomicMin((long long *)&fail[0], (long long)step);
        atomicMin((long long *)&fail[1], (long long)b);
    }
}

template <typename real>
static shampoo_status gather(const shampoo_cuda_env *env, real *grad_blocks, real *param_blocks,
                             const real *grad_flat, const real *param_flat,
                             const int64_t *table, const int64_t *table_host, int64_t nblocks,
                             const uint8_t *active, double l2_weight_decay, int64_t step,
                             int64_t *fail, double *sq_norms)
{
    if (!table_args_ok(env, nblocks, table, table_host, active) || grad_blocks == nullptr ||
        grad_flat == nullptr || fail == nullptr ||
        ((param_blocks != nullptr || l2_weight_decay != 0.0) && param_flat == nullptr))
        return SHAMPOO_ERR_INVALID_ARG;
    if (nblocks == 0)
        return SHAMPOO_OK;
    if (!grid_fits(nblocks))
        return SHAMPOO_ERR_UNSUPPORTED;
    if (sq_norms != nullptr)
        SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMemsetAsync, sq_norms, 0,
                                       (size_t)nblocks * sizeof(double), shampoo_stream(env)));
    gather_kernel<real><<<block_grid(table_host, nblocks), SHAMPOO_CUDA_THREADS, 0,
                          shampoo_stream(env)>>>(
        grad_blocks, param_blocks, grad_flat, param_flat, table, active,
        l2_weight_decay != 0.0, (real)l2_weight_decay, step, fail, sq_norms);
    return SHAMPOO_LAUNCHED("gather_kernel");
}

/* ---- scatter --------------------------------------------------------------------------- */

template <typename real>
__global__ static void scatter_kernel(real *flat, const real *blocks, const int64_t *table,
                                      const uint8_t *active)
{
    const int64_t b = blockIdx.x;
    if (!active[b])
        return;
    const int64_t *row = shampoo_table_row(table, b);
    const int64_t off = row[SHAMPOO_BF_BLOCK_OFFSET], numel = row[SHAMPOO_BF_NUMEL];
    for (int64_t i = first_elem(); i < numel; i += elem_stride())
        flat[shampoo_param_index(row, i)] = blocks[off + i];
}

template <typename real>
static shampoo_status scatter(const shampoo_cuda_env *env, real *flat, const real *blocks,
                              const int64_t *table, const int64_t *table_host, int64_t nblocks,
                              const uint8_t *active)
{
    if (!table_args_ok(env, nblocks, table, table_host, active) || flat == nullptr ||
        blocks == nullptr)
        return SHAMPOO_ERR_INVALID_ARG;
    if (nblocks == 0)
        return SHAMPOO_OK;
    if (!grid_fits(nblocks))
        return SHAMPOO_ERR_UNSUPPORTED;
    scatter_kernel<real><<<block_grid(table_host, nblocks), SHAMPOO_CUDA_THREADS, 0,
                           shampoo_stream(env)>>>(flat, blocks, table, active);
    return SHAMPOO_LAUNCHED("scatter_kernel");
}

/* ---- moments --------------------------------------------------------------------------- */

/* The CPU's scalars of shampoo_moments, converted to `real` once on the host. */
template <typename real> struct moments_scalars {
    int v_sum, use_bc1;
    real b2, one_minus_b2, w1, w3, bc1;
};

template <typename real>
__global__ static void moments_kernel(real *grads, real *V, real *filtered_grad,
                                      const int64_t *table, const uint8_t *active,
                                      moments_scalars<real> s, const int64_t *fail)
{
    const int64_t b = blockIdx.x;
    if (!active[b] || shampoo_step_failed(fail))
        return;
    const int64_t *row = shampoo_table_row(table, b);
    const int64_t off = row[SHAMPOO_BF_BLOCK_OFFSET], numel = row[SHAMPOO_BF_NUMEL];
    for (int64_t j = first_elem(); j < numel; j += elem_stride()) {
        const int64_t i = off + j;
        real g = grads[i];
        if (V != nullptr) {
            real v = V[i];
            if (s.v_sum) {
                v = v + g * g;
            } else {
                v = v * s.b2;                       /* _foreach_mul_ */
                v = v + s.one_minus_b2 * g * g;     /* _foreach_addcmul_ */
            }
            V[i] = v;
        }
        if (filtered_grad != nullptr) {
            const real f = filtered_grad[i];
            const real g_hat = lerp<real>(f, g, s.w3);
            filtered_grad[i] = lerp<real>(f, g, s.w1);
            g = g_hat;
        }
        if (s.use_bc1)
            g = g / s.bc1;
        grads[i] = g;
    }
}

template <typename real>
static shampoo_status moments(const shampoo_cuda_env *env, real *grads, real *grafting_state,
                              real *filtered_grad, const int64_t *table,
                              const int64_t *table_host, int64_t nblocks,
                              const uint8_t *active, const shampoo_moments_params *p,
                              const int64_t *fail)
{
    if (!table_args_ok(env, nblocks, table, table_host, active) || grads == nullptr ||
        p == nullptr || (p->update_grafting_state && grafting_state == nullptr) ||
        ((p->beta1 != 0.0) != (filtered_grad != nullptr)))
        return SHAMPOO_ERR_INVALID_ARG;
    if (nblocks == 0)
        return SHAMPOO_OK;
    if (!grid_fits(nblocks))
        return SHAMPOO_ERR_UNSUPPORTED;
    moments_scalars<real> s;
    s.v_sum = p->grafting_beta2 == 1.0; /* AdaGrad: plain sum, no decay (§4.5) */
    s.use_bc1 = p->bias_correction1 != 1.0;
    s.b2 = (real)p->grafting_beta2;
    s.one_minus_b2 = (real)(1.0 - p->grafting_beta2);
    s.w1 = (real)(1.0 - p->beta1);
    s.w3 = (real)(1.0 - p->beta3);
    s.bc1 = (real)p->bias_correction1;
    moments_kernel<real><<<block_grid(table_host, nblocks), SHAMPOO_CUDA_THREADS, 0,
                           shampoo_stream(env)>>>(
        grads, p->update_grafting_state ? grafting_state : nullptr, filtered_grad, table,
        active, s, fail);
    return SHAMPOO_LAUNCHED("moments_kernel");
}

/* ---- C entry points -------------------------------------------------------------------- */

#define SHAMPOO_CUDA_ELEMENTWISE_ENTRIES(real, sfx)                                            \
    extern "C" shampoo_status shampoo_cuda_gather_##sfx(                                       \
        const shampoo_cuda_env *env, real *grad_blocks, real *param_blocks,                    \
        const real *grad_flat, const real *param_flat, const int64_t *table,                   \
        const int64_t *table_host, int64_t nblocks, const uint8_t *active,                     \
        double l2_weight_decay, int64_t step, int64_t *fail, double *sq_norms)                 \
    {                                                                                          \
        return gather<real>(env, grad_blocks, param_blocks, grad_flat, param_flat, table,      \
                            table_host, nblocks, active, l2_weight_decay, step, fail,          \
                            sq_norms);                                                         \
    }                                                                                          \
    extern "C" shampoo_status shampoo_cuda_scatter_##sfx(                                      \
        const shampoo_cuda_env *env, real *flat, const real *blocks, const int64_t *table,     \
        const int64_t *table_host, int64_t nblocks, const uint8_t *active)                     \
    {                                                                                          \
        return scatter<real>(env, flat, blocks, table, table_host, nblocks, active);           \
    }                                                                                          \
    extern "C" shampoo_status shampoo_cuda_moments_##sfx(                                      \
        const shampoo_cuda_env *env, real *grads, real *grafting_state, real *filtered_grad,   \
        const int64_t *table, const int64_t *table_host, int64_t nblocks,                      \
        const uint8_t *active, const shampoo_moments_params *p, const int64_t *fail)           \
    {                                                                                          \
        return moments<real>(env, grads, grafting_state, filtered_grad, table, table_host,     \
                             nblocks, active, p, fail);                                        \
    }

SHAMPOO_CUDA_ELEMENTWISE_ENTRIES(float, f32)
SHAMPOO_CUDA_ELEMENTWISE_ENTRIES(double, f64)
