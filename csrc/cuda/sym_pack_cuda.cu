/* The packed symmetric storage kernels (core/sym_pack.h) on the device: unpack, pack and the
 * packed root commit (shampoo_cuda.h). One launch over the whole table: grid.x = table block,
 * grid.y = chunks of SHAMPOO_CUDA_THREADS elements of its largest factor. The packed offset of
 * each block comes from `packed_offsets` (device int64[nblocks], checked on the host copy by
 * the binding), so no thread scans the table. Pure copies: results equal the CPU's bit for bit. */
#include <stddef.h>
#include <stdint.h>

#include "cuda_common.cuh"

/* Offset of (i, j), i <= j, in an n x n upper triangle stored by rows. */
__device__ static inline int64_t packed_index(int64_t n, int64_t i, int64_t j)
{
    return i * n - i * (i - 1) / 2 + (j - i);
}

__device__ static inline int64_t first_elem(void)
{
    return (int64_t)blockIdx.y * SHAMPOO_CUDA_THREADS + threadIdx.x;
}

__device__ static inline int64_t elem_stride(void)
{
    return (int64_t)gridDim.y * SHAMPOO_CUDA_THREADS;
}

/* mode 0: full <- packed (blocks with active[b]); 1: packed <- full (factors with mask[f], or
 * all when mask is NULL), 3: the same with the symmetric part 0.5 F_ij + 0.5 F_ji (as the CPU);
 * 2: commit[f] ? dst <- src : src <- dst, both packed. */
template <typename real>
__global__ static void packed_kernel(int mode, real *a, real *b, const int64_t *table,
                                     const int64_t *packed_offsets, const uint8_t *mask)
{
    const int64_t *row = shampoo_table_row(table, blockIdx.x);
    if (mode == 0 && mask != nullptr && !mask[blockIdx.x])
        return;
    int64_t full_at = row[SHAMPOO_BF_FACTOR_OFFSET], packed_at = packed_offsets[blockIdx.x];
    for (int64_t k = 0; k < row[SHAMPOO_BF_ORDER]; k++) {
        const int64_t n = row[SHAMPOO_BF_DIMS + k];
        const bool take = mode == 0 || mask == nullptr || mask[row[SHAMPOO_BF_FACTOR_INDEX] + k];
        if (mode == 2) {
            real *to = take ? a + packed_at : b + packed_at;
            const real *from = take ? b + packed_at : a + packed_at;
            for (int64_t t = first_elem(); t < n * (n + 1) / 2; t += elem_stride())
                to[t] = from[t];
        } else if (take) {
            for (int64_t e = first_elem(); e < n * n; e += elem_stride()) {
                const int64_t i = e / n, j = e % n;
                if (mode == 0)
                    a[full_at + e] = b[packed_at + (i <= j ? packed_index(n, i, j) : packed_index(n, j, i))];
                else if (i <= j)
                    a[packed_at + packed_index(n, i, j)] =
                        mode == 1 ? b[full_at + e]
                                  : (real)0.5 * b[full_at + e] + (real)0.5 * b[full_at + j * n + i];
            }
        }
        full_at += n * n;
        packed_at += n * (n + 1) / 2;
    }
}

template <typename real>
static shampoo_status launch(const shampoo_cuda_env *env, int mode, real *a, real *b,
                             const int64_t *table, const int64_t *table_host, int64_t nblocks,
                             const int64_t *packed_offsets, const uint8_t *mask)
{
    if (env == nullptr || nblocks < 0 ||
        (nblocks > 0 && (table == nullptr || table_host == nullptr || packed_offsets == nullptr ||
                         a == nullptr || b == nullptr)) ||
        (mode == 2 && nblocks > 0 && mask == nullptr))
        return SHAMPOO_ERR_INVALID_ARG;
    if (nblocks == 0)
        return SHAMPOO_OK;
    if (nblocks > (int64_t)INT32_MAX)
        return SHAMPOO_ERR_UNSUPPORTED;
    /* the binding has validated table_host and the offsets against it */
    const dim3 grid((unsigned)nblocks, shampoo_chunks_for(table_host, nblocks, true));
    packed_kernel<real><<<grid, SHAMPOO_CUDA_THREADS, 0, shampoo_stream(env)>>>(
        mode, a, b, table, packed_offsets, mask);
    return SHAMPOO_LAUNCHED("packed_kernel");
}

#define SHAMPOO_CUDA_PACKED_ENTRIES(real, sfx)                                                 \
    extern "C" shampoo_status shampoo_cuda_sym_unpack_##sfx(                                   \
        const shampoo_cuda_env *env, real *full, const real *packed, const int64_t *table,     \
        const int64_t *table_host, int64_t nblocks, const int64_t *packed_offsets,             \
        const uint8_t *active)                                                                 \
    {                                                                                          \
        return launch<real>(env, 0, full, (real *)packed, table, table_host, nblocks,          \
                            packed_offsets, active);                                           \
    }                                                                                          \
    extern "C" shampoo_status shampoo_cuda_sym_pack_##sfx(                                     \
        const shampoo_cuda_env *env, real *packed, const real *full, const int64_t *table,     \
        const int64_t *table_host, int64_t nblocks, const int64_t *packed_offsets,             \
        const uint8_t *mask, int average)                                                      \
    {                                                                                          \
        return launch<real>(env, average ? 3 : 1, packed, (real *)full, table, table_host,     \
                            nblocks, packed_offsets, mask);                                    \
    }                                                                                          \
    extern "C" shampoo_status shampoo_cuda_packed_commit_##sfx(                                \
        const shampoo_cuda_env *env, real *dst, real *src, const int64_t *table,               \
        const int64_t *table_host, int64_t nblocks, const int64_t *packed_offsets,             \
        const uint8_t *commit)                                                                 \
    {                                                                                          \
        return launch<real>(env, 2, dst, src, table, table_host, nblocks, packed_offsets,      \
                            commit);                                                           \
    }

SHAMPOO_CUDA_PACKED_ENTRIES(float, f32)
SHAMPOO_CUDA_PACKED_ENTRIES(double, f64)
