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

#endif
