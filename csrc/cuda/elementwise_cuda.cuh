/* What the elementwise kernels share (elementwise_cuda.cu: gather, scatter, moments, root
 * commit; finish_cuda.cu: finish): argument checks, launch grids, the per-thread element
 * walk, and the CPU's scalar helpers repeated for the device (elementwise.inc). */
#ifndef SHAMPOO_ELEMENTWISE_CUDA_CUH
#define SHAMPOO_ELEMENTWISE_CUDA_CUH

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "cuda_common.cuh"

/* gridDim.x is at most 2^31 - 1, and every launch puts one table block on each x index. */
static inline bool grid_fits(int64_t nblocks)
{
    return nblocks <= (int64_t)INT32_MAX;
}

/* The checks every op shares: the CPU's nblocks/table/active checks, plus env and the host
 * copy of the table that plans the launch. */
static inline bool table_args_ok(const shampoo_cuda_env *env, int64_t nblocks, const int64_t *table,
                          const int64_t *table_host, const uint8_t *active)
{
    return env != nullptr && nblocks >= 0 &&
           (nblocks == 0 || (table != nullptr && table_host != nullptr && active != nullptr));
}

static inline dim3 block_grid(const int64_t *table_host, int64_t nblocks)
{
    return dim3((unsigned)nblocks, shampoo_chunks_for(table_host, nblocks));
}

/* The first element of a block this thread visits, and the stride to the next one. */
__device__ static inline int64_t first_elem(void)
{
    return (int64_t)blockIdx.y * SHAMPOO_CUDA_THREADS + threadIdx.x;
}

__device__ static inline int64_t elem_stride(void)
{
    return (int64_t)gridDim.y * SHAMPOO_CUDA_THREADS;
}

/* As the CPU root2: sqrt in double, then rounded (exactly sqrtf for floats). */
template <typename real> __device__ static inline real root2(real x)
{
    return (real)sqrt((double)x);
}

/* torch.lerp, exactly as the CPU lerp. */
template <typename real> __device__ static inline real lerp(real a, real b, real w)
{
    return fabs((double)w) < 0.5 ? a + w * (b - a) : b - (b - a) * ((real)1 - w);
}

/* graft(G_hat) for one element, as the CPU graft (V NULL: SGD). */
template <typename real>
__device__ static inline real graft(real g, const real *V, int64_t i, real bcg, real eps)
{
    return V != nullptr ? g / (root2<real>(V[i] / bcg) + eps) : g;
}

/* ---- finish, shared by finish (finish_cuda.cu) and finish_io (param_io_cuda.cu) -------- */

/* The CPU's scalars of shampoo_finish, converted to `real` once on the host. */
template <typename real> struct finish_scalars {
    int grafting_phase, use_wd, nesterov;
    real bcg, eps, wd, mom, one_minus_damp, neg_lr;
};

template <typename real> static inline finish_scalars<real> finish_scalars_of(const shampoo_finish_params *p)
{
    finish_scalars<real> s;
    s.grafting_phase = p->grafting_phase != 0;
    s.use_wd = p->decoupled_weight_decay != 0.0;
    s.nesterov = p->nesterov != 0;
    s.bcg = (real)p->grafting_bias_correction;
    s.eps = (real)p->grafting_epsilon;
    s.wd = (real)p->decoupled_weight_decay;
    s.mom = (real)p->momentum;
    s.one_minus_damp = (real)(1.0 - p->dampening);
    s.neg_lr = (real)-p->lr;
    return s;
}

/* The CPU finish's argument checks that do not depend on where W is read or written. */
static inline bool finish_args_ok(const shampoo_finish_params *p, const void *grads,
                                  const void *shampoo_dir, const void *grafting_state,
                                  const void *momentum_state)
{
    return grads != nullptr && p != nullptr &&
           (p->graft == SHAMPOO_GRAFT_NONE || p->graft == SHAMPOO_GRAFT_SGD ||
            p->graft == SHAMPOO_GRAFT_DIAGONAL) &&
           !(p->grafting_phase && p->graft == SHAMPOO_GRAFT_NONE) &&
           !(p->graft == SHAMPOO_GRAFT_DIAGONAL && grafting_state == nullptr) &&
           !(!p->grafting_phase && shampoo_dir == nullptr) &&
           (p->momentum != 0.0) == (momentum_state != nullptr);
}

/* Phase 1, the body of each op's norms kernel (launched from the op's own file): one
 * thread block per table block writes its grafting ratio (SPEC §4.8) into ratio[b].
 * Deterministic: each thread sums a fixed strided subset in order, then a fixed tree
 * combines the partial sums. Every thread of the block calls it (it has barriers). */
template <typename real>
__device__ static inline void finish_norms_block(double *ratio, const real *grads,
                                                 const real *shampoo_dir, const real *V,
                                                 const int64_t *table, real bcg, real eps)
{
    __shared__ double gs[SHAMPOO_CUDA_THREADS], ps[SHAMPOO_CUDA_THREADS];
    const int64_t b = blockIdx.x;
    const int64_t *row = shampoo_table_row(table, b);
    const int64_t off = row[SHAMPOO_BF_BLOCK_OFFSET], numel = row[SHAMPOO_BF_NUMEL];
    const unsigned t = threadIdx.x;
    double gsum = 0.0, psum = 0.0;
    for (int64_t i = off + t; i < off + numel; i += SHAMPOO_CUDA_THREADS) {
        const real q = graft<real>(grads[i], V, i, bcg, eps);
        gsum += (double)q * (double)q;
        psum += (double)shampoo_dir[i] * (double)shampoo_dir[i];
    }
    gs[t] = gsum;
    ps[t] = psum;
    __syncthreads();
    for (unsigned half = SHAMPOO_CUDA_THREADS / 2; half > 0; half /= 2) {
        if (t < half) {
            gs[t] += gs[t + half];
            ps[t] += ps[t + half];
        }
        __syncthreads();
    }
    if (t == 0) {
        const real gnorm = (real)sqrt(gs[0]), pnorm = (real)sqrt(ps[0]);
        ratio[b] = (double)(gnorm / (pnorm + (real)1e-16));
    }
}

/* Phase 2's arithmetic for block-layout element i, the CPU's elementwise loop: the update
 * -lr * P (SPEC §4.8-§4.11), momentum_state[i] written. w: the parameter (read only with
 * decoupled weight decay). One body for both ops, so both give the same bits. */
template <typename real>
__device__ static inline real finish_update(const finish_scalars<real> &s, const real *grads,
                                            const real *shampoo_dir, const real *V,
                                            real *momentum_state, bool rescale, real r,
                                            int64_t i, real w)
{
    real x;
    if (s.grafting_phase)
        x = graft<real>(grads[i], V, i, s.bcg, s.eps);
    else
        x = rescale ? shampoo_dir[i] * r : shampoo_dir[i];
    if (s.use_wd)
        x = x + s.wd * w;                               /* §4.9 */
    if (momentum_state != nullptr) {                    /* §4.10 */
        real m = momentum_state[i] * s.mom;
        m = m + s.one_minus_damp * x;
        momentum_state[i] = m;
        x = s.nesterov ? x * s.one_minus_damp + s.mom * m : m;
    }
    return s.neg_lr * x;                                /* §4.11 */
}

#endif
