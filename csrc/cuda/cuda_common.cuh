/* Shared by the CUDA sources: launch geometry, error mapping, table access on the device,
 * and the failure-flag test (shampoo_cuda.h). One C++ template per kernel serves float and
 * double; the extern "C" entry points instantiate it twice. */
#ifndef SHAMPOO_CUDA_COMMON_CUH
#define SHAMPOO_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "../core/batch_plan.h"
#include "../core/block_table.h"
#include "../core/status.h"
#include "shampoo_cuda.h"

#define SHAMPOO_CUDA_THREADS 256
/* Grid limit used along y (blocks run along x, which allows 2^31 - 1). */
#define SHAMPOO_CUDA_MAX_GRID_Y 65535

static inline cudaStream_t shampoo_stream(const shampoo_cuda_env *env)
{
    return (cudaStream_t)env->stream;
}

/* Batches above this many matrices are split into several cuBLAS/cuSOLVER calls: NVIDIA's
 * batched routines are documented for int batch counts, but counts beyond the grid-y limit
 * have not been run on a GPU here, so no call relies on them. */
#define SHAMPOO_CUDA_MAX_BATCH 65535

/* A failed CUDA runtime, cuBLAS or cuSOLVER call (status codes: 0 is success in all three)
 * is recorded with its name, code and place (shampoo_cuda_failure) and becomes
 * SHAMPOO_ERR_CUDA. */
static inline shampoo_status shampoo_cuda_check(shampoo_cuda_lib lib, const char *call,
                                                int code, const char *file, int line)
{
    if (code == 0)
        return SHAMPOO_OK;
    shampoo_cuda_record_failure(lib, call, code, file, line);
    return SHAMPOO_ERR_CUDA;
}

#define SHAMPOO_CUDA_CHECK(fn, ...)                                                          \
    shampoo_cuda_check(SHAMPOO_LIB_CUDA, #fn, (int)fn(__VA_ARGS__), __FILE__, __LINE__)
#define SHAMPOO_BLAS_CHECK(name, expr)                                                       \
    shampoo_cuda_check(SHAMPOO_LIB_CUBLAS, (name), (expr), __FILE__, __LINE__)
#define SHAMPOO_SOLVER_CHECK(name, expr)                                                     \
    shampoo_cuda_check(SHAMPOO_LIB_CUSOLVER, (name), (expr), __FILE__, __LINE__)
/* After a launch: cudaGetLastError both reads and clears a launch error, so the error is
 * reported here, with the kernel's name, and not by torch's next launch check. */
#define SHAMPOO_LAUNCHED(kernel)                                                             \
    shampoo_cuda_check(SHAMPOO_LIB_CUDA, "launch of " kernel, (int)cudaGetLastError(),       \
                       __FILE__, __LINE__)
#define SHAMPOO_TRY(expr)                                                                    \
    do {                                                                                     \
        const shampoo_status try_st_ = (expr);                                               \
        if (try_st_ != SHAMPOO_OK)                                                           \
            return try_st_;                                                                  \
    } while (0)

/* Total factor elements of a table row (sum of d_k^2). */
SHAMPOO_HOST_DEVICE static inline int64_t shampoo_row_factor_numel(const int64_t *row)
{
    return shampoo_factor_elem_offset(row, row[SHAMPOO_BF_ORDER]);
}

/* Chunks of SHAMPOO_CUDA_THREADS elements needed to cover the largest block of the table
 * (host copy), counting its elements or, with `factors`, its factor elements; capped at the
 * y limit (kernels loop over the rest). At least 1. */
static inline unsigned shampoo_chunks_for(const int64_t *table_host, int64_t nblocks,
                                          bool factors = false)
{
    int64_t most = 1;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t *row = shampoo_table_row(table_host, b);
        const int64_t n = factors ? shampoo_row_factor_numel(row) : row[SHAMPOO_BF_NUMEL];
        most = n > most ? n : most;
    }
    int64_t chunks = (most + SHAMPOO_CUDA_THREADS - 1) / SHAMPOO_CUDA_THREADS;
    return (unsigned)(chunks < SHAMPOO_CUDA_MAX_GRID_Y ? chunks : SHAMPOO_CUDA_MAX_GRID_Y);
}

/* Whether a step's failure flag says: write nothing (shampoo_cuda.h). */
__device__ static inline bool shampoo_step_failed(const int64_t *fail)
{
    return fail != nullptr && fail[0] != INT64_MAX;
}

/* Param-layout offset of element i (row-major position inside the block) of a block. */
__device__ static inline int64_t shampoo_param_index(const int64_t *row, int64_t i)
{
    const int64_t order = row[SHAMPOO_BF_ORDER];
    int64_t pos = row[SHAMPOO_BF_PARAM_OFFSET];
    for (int64_t k = order - 1; k >= 0; k--) {
        const int64_t d = row[SHAMPOO_BF_DIMS + k];
        pos += (i % d) * row[SHAMPOO_BF_STRIDES + k];
        i /= d;
    }
    return pos;
}

/* Element e of a row's factor layout -> its factor k, row i and column j inside it, and the
 * factor's size n; e - (i * n + j) is the factor's own offset from the row's first. */
__device__ static inline void shampoo_factor_element(const int64_t *row, int64_t e, int64_t *k,
                                                     int64_t *i, int64_t *j, int64_t *n)
{
    int64_t kk = 0, r = e, nn = row[SHAMPOO_BF_DIMS];
    while (r >= nn * nn) {
        r -= nn * nn;
        nn = row[SHAMPOO_BF_DIMS + ++kk];
    }
    *k = kk;
    *i = r / nn;
    *j = r % nn;
    *n = nn;
}

/* Bytes rounded up so that the next workspace region stays 256-byte aligned. */
static inline size_t shampoo_align256(size_t bytes)
{
    return (bytes + 255) & ~(size_t)255;
}

/* Block-layout and factor-layout extents of a (validated) host table. */
static inline void shampoo_table_extents(const int64_t *table_host, int64_t nblocks,
                                         int64_t *block_numel, int64_t *factor_numel)
{
    *block_numel = 0;
    *factor_numel = 0;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t *row = shampoo_table_row(table_host, b);
        int64_t end = row[SHAMPOO_BF_BLOCK_OFFSET] + row[SHAMPOO_BF_NUMEL];
        *block_numel = end > *block_numel ? end : *block_numel;
        end = row[SHAMPOO_BF_FACTOR_OFFSET] + shampoo_row_factor_numel(row);
        *factor_numel = end > *factor_numel ? end : *factor_numel;
    }
}

/* Whether every group of a batch plan fits cuBLAS's int sizes and batch counts. */
static inline bool shampoo_plan_fits_blas(const int64_t *plan_host)
{
    for (int64_t g = 0; g < plan_host[0]; g++) {
        const int64_t *grp = shampoo_plan_group(plan_host, g);
        if (grp[SHAMPOO_PG_NUMEL] > INT32_MAX || grp[SHAMPOO_PG_COUNT] > INT32_MAX)
            return false;
    }
    return true;
}

/* Points cuBLAS at the call's stream and torch-owned workspace (both may change between
 * calls: torch's current stream, the caching allocator's block). */
static inline shampoo_status shampoo_blas_bind(const shampoo_cuda_env *env)
{
    const shampoo_cuda_libs *libs = env->libs;
    if (libs == NULL || env->blas == NULL)
        return SHAMPOO_ERR_INVALID_ARG;
    SHAMPOO_TRY(SHAMPOO_BLAS_CHECK("cublasSetStream", libs->cublas_set_stream(env->blas,
                                                                              env->stream)));
    if (env->blas_workspace != NULL)
        SHAMPOO_TRY(SHAMPOO_BLAS_CHECK(
            "cublasSetWorkspace",
            libs->cublas_set_workspace(env->blas, env->blas_workspace,
                                       env->blas_workspace_bytes)));
    return SHAMPOO_OK;
}

/* The cuBLAS GEMM routines of each precision, so that one template body serves both. */
template <typename real> struct shampoo_gemm_of;
template <> struct shampoo_gemm_of<float> {
    static constexpr const char *batched_name = "cublasSgemmBatched";
    static constexpr const char *strided_name = "cublasSgemmStridedBatched";
    static decltype(shampoo_cuda_libs::sgemm_batched) batched(const shampoo_cuda_libs *libs)
    {
        return libs->sgemm_batched;
    }
    static decltype(shampoo_cuda_libs::sgemm_strided) strided(const shampoo_cuda_libs *libs)
    {
        return libs->sgemm_strided;
    }
};
template <> struct shampoo_gemm_of<double> {
    static constexpr const char *batched_name = "cublasDgemmBatched";
    static constexpr const char *strided_name = "cublasDgemmStridedBatched";
    static decltype(shampoo_cuda_libs::dgemm_batched) batched(const shampoo_cuda_libs *libs)
    {
        return libs->dgemm_batched;
    }
    static decltype(shampoo_cuda_libs::dgemm_strided) strided(const shampoo_cuda_libs *libs)
    {
        return libs->dgemm_strided;
    }
};

/* Matrices in the library call that starts at matrix `at` of `batch`. */
static inline int shampoo_batch_chunk(int batch, int at)
{
    return batch - at < SHAMPOO_CUDA_MAX_BATCH ? batch - at : SHAMPOO_CUDA_MAX_BATCH;
}

/* One batched GEMM C_i = op(A_i) op(B_i) (alpha 1, beta 0) through the loaded cuBLAS, in
 * chunks of at most SHAMPOO_CUDA_MAX_BATCH matrices. */
template <typename real>
static inline shampoo_status shampoo_gemm_batched(const shampoo_cuda_libs *libs, void *handle,
                                                  int ta, int tb, int m, int n, int k,
                                                  const real *const *a, int lda,
                                                  const real *const *b, int ldb,
                                                  real *const *c, int ldc, int batch)
{
    const real one = 1, zero = 0;
    const auto gemm = shampoo_gemm_of<real>::batched(libs);
    for (int at = 0; at < batch; at += SHAMPOO_CUDA_MAX_BATCH)
        SHAMPOO_TRY(SHAMPOO_BLAS_CHECK(
            shampoo_gemm_of<real>::batched_name,
            gemm(handle, ta, tb, m, n, k, &one, a + at, lda, b + at, ldb, &zero, c + at, ldc,
                 shampoo_batch_chunk(batch, at))));
    return SHAMPOO_OK;
}

/* Strided batched GEMM over contiguous n x n matrices (alpha 1, beta 0), chunked as above. */
template <typename real>
static inline shampoo_status shampoo_gemm_strided(const shampoo_cuda_libs *libs, void *handle,
                                                  int ta, int tb, int n, const real *a,
                                                  const real *b, real *c, int batch)
{
    const real one = 1, zero = 0;
    const long long nn = (long long)n * n;
    const auto gemm = shampoo_gemm_of<real>::strided(libs);
    for (int at = 0; at < batch; at += SHAMPOO_CUDA_MAX_BATCH) {
        const long long off = (long long)at * nn;
        SHAMPOO_TRY(SHAMPOO_BLAS_CHECK(
            shampoo_gemm_of<real>::strided_name,
            gemm(handle, ta, tb, n, n, n, &one, a + off, n, nn, b + off, n, nn, &zero, c + off,
                 n, nn, shampoo_batch_chunk(batch, at))));
    }
    return SHAMPOO_OK;
}

#endif
