/* The CUDA kernels: the same operations as the CPU core (csrc/core), on device buffers,
 * enqueued on the caller's stream (torch's current stream). Plain C API; the bodies are CUDA
 * C in the .cu files beside this header. Every function returns a shampoo_status after enqueueing its work:
 * SHAMPOO_ERR_CUDA when a launch or a cuBLAS/cuSOLVER call failed.
 *
 * Conventions shared by all entry points:
 *   - Buffers in the block, factor and param layouts of block_table.h, float or double as the
 *     suffix says, all on the stream's device. `table` is the device copy of the block table
 *     and `table_host` the same table in host memory (the host plans launches from it and
 *     never reads device memory outside a root-inverse call).
 *   - `active`: device uint8[nblocks].
 *   - `fail`: device int64[2], the step's failure flag: fail[0] = the step at which a
 *     gradient first held NaN/Inf (INT64_MAX: none), fail[1] = the first such block of that
 *     step. gather sets it; every later kernel of a step that is given it skips all its
 *     writes to optimizer state and parameters while fail[0] != INT64_MAX, and finish then
 *     writes -0.0 as every update (x + -0.0 == x bitwise), so a step whose gradient was bad
 *     leaves parameters and state unchanged without the host waiting for the device. The
 *     flag is sticky: only the caller resets it (after reporting the failure). NULL: never
 *     skip.
 *   - Device scratch comes from the caller (`shampoo_cuda_env.workspace`, allocated through
 *     torch); the *_workspace functions say how many bytes a call needs.
 * No entry point synchronises with the host except shampoo_cuda_root_inverse_*. The
 * pointer-table passes that read gradients and write parameters in place are declared in
 * param_io_cuda.h. */
#ifndef SHAMPOO_CUDA_H
#define SHAMPOO_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "../core/elementwise.h"
#include "../core/matrix_root.h"
#include "../core/status.h"
#include "cuda_libs.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What every call shares: the stream, the loaded libraries with this device's handles, and
 * the caller's device scratch. */
typedef struct shampoo_cuda_env {
    void *stream;                      /* cudaStream_t */
    const shampoo_cuda_libs *libs;     /* NULL for calls that use no cuBLAS/cuSOLVER */
    void *blas;                        /* cublasHandle_t of the stream's device */
    void *solver;                      /* cusolverDnHandle_t of the stream's device */
    void *workspace;                   /* device scratch, 256-byte aligned */
    size_t workspace_bytes;
    void *blas_workspace;              /* handed to cublasSetWorkspace (torch-owned) */
    size_t blas_workspace_bytes;
} shampoo_cuda_env;

/* ---- elementwise (elementwise.h semantics; elementwise_cuda.cu) ----------------------- */

/* As shampoo_gather_*, but the non-finite check sets `fail` (required) for step `step`
 * instead of returning a block: fail[0] = min(fail[0], step) and fail[1] = min(fail[1], b)
 * over the active blocks b holding NaN/Inf, unless fail[0] < step already (an earlier step
 * failed: the flag is left as it is). The copies into grad_blocks/param_blocks (scratch)
 * happen either way. sq_norms (NULL: not wanted): nblocks doubles, set to ||G_b||^2 for
 * active blocks and 0 for inactive ones, as the CPU gather (summed in another order). */
shampoo_status shampoo_cuda_gather_f32(const shampoo_cuda_env *env, float *grad_blocks,
                                       float *param_blocks, const float *grad_flat,
                                       const float *param_flat, const int64_t *table,
                                       const int64_t *table_host, int64_t nblocks,
                                       const uint8_t *active, double l2_weight_decay,
                                       int64_t step, int64_t *fail, double *sq_norms);
shampoo_status shampoo_cuda_gather_f64(const shampoo_cuda_env *env, double *grad_blocks,
                                       double *param_blocks, const double *grad_flat,
                                       const double *param_flat, const int64_t *table,
                                       const int64_t *table_host, int64_t nblocks,
                                       const uint8_t *active, double l2_weight_decay,
                                       int64_t step, int64_t *fail, double *sq_norms);

shampoo_status shampoo_cuda_scatter_f32(const shampoo_cuda_env *env, float *flat,
                                        const float *blocks, const int64_t *table,
                                        const int64_t *table_host, int64_t nblocks,
                                        const uint8_t *active);
shampoo_status shampoo_cuda_scatter_f64(const shampoo_cuda_env *env, double *flat,
                                        const double *blocks, const int64_t *table,
                                        const int64_t *table_host, int64_t nblocks,
                                        const uint8_t *active);

shampoo_status shampoo_cuda_moments_f32(const shampoo_cuda_env *env, float *grads,
                                        float *grafting_state, float *filtered_grad,
                                        const int64_t *table, const int64_t *table_host,
                                        int64_t nblocks, const uint8_t *active,
                                        const shampoo_moments_params *p, const int64_t *fail);
shampoo_status shampoo_cuda_moments_f64(const shampoo_cuda_env *env, double *grads,
                                        double *grafting_state, double *filtered_grad,
                                        const int64_t *table, const int64_t *table_host,
                                        int64_t nblocks, const uint8_t *active,
                                        const shampoo_moments_params *p, const int64_t *fail);

/* Needs shampoo_cuda_finish_workspace() bytes (per-block norms). */
size_t shampoo_cuda_finish_workspace(int64_t nblocks);
shampoo_status shampoo_cuda_finish_f32(const shampoo_cuda_env *env, float *update_flat,
                                       const float *grads, const float *shampoo_dir,
                                       const float *grafting_state, const float *param_blocks,
                                       float *momentum_state, const int64_t *table,
                                       const int64_t *table_host, int64_t nblocks,
                                       const uint8_t *active, const shampoo_finish_params *p,
                                       const int64_t *fail);
shampoo_status shampoo_cuda_finish_f64(const shampoo_cuda_env *env, double *update_flat,
                                       const double *grads, const double *shampoo_dir,
                                       const double *grafting_state,
                                       const double *param_blocks, double *momentum_state,
                                       const int64_t *table, const int64_t *table_host,
                                       int64_t nblocks, const uint8_t *active,
                                       const shampoo_finish_params *p, const int64_t *fail);

/* ---- packed symmetric storage (core/sym_pack.h semantics; sym_pack_cuda.cu) ---------- */

/* packed_offsets: device int64[nblocks], each block's offset in the packed layout (the prefix
 * sums of its factors' n(n+1)/2). active (unpack): device uint8[nblocks]; mask (pack, NULL =
 * all) and commit: device uint8[factor_count]; average (pack): as sym_pack.h. */
#define SHAMPOO_CUDA_PACKED_DECLS(real, sfx)                                                   \
    shampoo_status shampoo_cuda_sym_unpack_##sfx(                                              \
        const shampoo_cuda_env *env, real *full, const real *packed, const int64_t *table,     \
        const int64_t *table_host, int64_t nblocks, const int64_t *packed_offsets,             \
        const uint8_t *active);                                                                \
    shampoo_status shampoo_cuda_sym_pack_##sfx(                                                \
        const shampoo_cuda_env *env, real *packed, const real *full, const int64_t *table,     \
        const int64_t *table_host, int64_t nblocks, const int64_t *packed_offsets,             \
        const uint8_t *mask, int average);                                                     \
    shampoo_status shampoo_cuda_packed_commit_##sfx(                                           \
        const shampoo_cuda_env *env, real *dst, real *src, const int64_t *table,               \
        const int64_t *table_host, int64_t nblocks, const int64_t *packed_offsets,             \
        const uint8_t *commit);
SHAMPOO_CUDA_PACKED_DECLS(float, f32)
SHAMPOO_CUDA_PACKED_DECLS(double, f64)

/* ---- factor accumulation (factor_update.h semantics; factor_update_cuda.cu) ------------ */

/* plan / plan_host: the batch plan of the table (batch_plan.h), device and host copies,
 * plan_length entries. The Gram matrices come from one cuBLAS batched GEMM per shape group
 * and dimension; the accumulation is one kernel over all factors (skipped while `fail` is
 * set; inactive blocks copied through). */
size_t shampoo_cuda_factor_update_workspace(const int64_t *table_host, int64_t nblocks,
                                            const int64_t *plan_host, int real_bytes);
shampoo_status shampoo_cuda_factor_update_f32(const shampoo_cuda_env *env, float *factors_out,
                                              const float *factors_in, const float *grads,
                                              const int64_t *table, const int64_t *table_host,
                                              int64_t nblocks, const int64_t *plan,
                                              const int64_t *plan_host, const uint8_t *active,
                                              double beta2, const int64_t *fail);
shampoo_status shampoo_cuda_factor_update_f64(const shampoo_cuda_env *env, double *factors_out,
                                              const double *factors_in, const double *grads,
                                              const int64_t *table, const int64_t *table_host,
                                              int64_t nblocks, const int64_t *plan,
                                              const int64_t *plan_host, const uint8_t *active,
                                              double beta2, const int64_t *fail);

/* ---- preconditioning (precondition.h semantics; precondition_cuda.cu) ------------------ */

/* One cuBLAS batched GEMM per shape group and dimension. Unlike the CPU kernel, the blocks of
 * `out` of inactive blocks are left unspecified (they are computed into scratch); `out` is
 * the optimizer's scratch. */
size_t shampoo_cuda_precondition_workspace(const int64_t *table_host, int64_t nblocks,
                                           const int64_t *plan_host, int real_bytes);
shampoo_status shampoo_cuda_precondition_f32(const shampoo_cuda_env *env, float *out,
                                             const float *grads, const float *inv_roots,
                                             const int64_t *table, const int64_t *table_host,
                                             int64_t nblocks, const int64_t *plan,
                                             const int64_t *plan_host, const uint8_t *active);
shampoo_status shampoo_cuda_precondition_f64(const shampoo_cuda_env *env, double *out,
                                             const double *grads, const double *inv_roots,
                                             const int64_t *table, const int64_t *table_host,
                                             int64_t nblocks, const int64_t *plan,
                                             const int64_t *plan_host, const uint8_t *active);

/* ---- inverse roots (matrix_root.h semantics; matrix_root_cuda.cu) ----------------------- */

/* As shampoo_root_inverse_*, method SHAMPOO_ROOT_EIGEN only (Newton and higher order:
 * SHAMPOO_ERR_UNSUPPORTED). Eigendecompositions by cuSOLVER: syevjBatched for groups of
 * factors of one size n <= 32, XsyevBatched per size when the library has it, else one syevd
 * per factor; the float64 retry of failed float32 factors; X = Q diag(s) Q^T by batched GEMM.
 * Synchronises the stream (the per-factor statuses are host data); status_out is host
 * memory, is_diagonal device memory. Needs shampoo_cuda_root_inverse_workspace() bytes. */
/* Asks cuSOLVER for its buffer sizes (env->solver), so env->workspace may be NULL here. On
 * SHAMPOO_OK *bytes is an upper bound for any active mask and diagonal flags. */
shampoo_status shampoo_cuda_root_inverse_workspace(const shampoo_cuda_env *env,
                                                   const int64_t *table_host, int64_t nblocks,
                                                   int real_bytes, size_t *bytes);
shampoo_status shampoo_cuda_root_inverse_f32(const shampoo_cuda_env *env, float *out,
                                             const float *factors, const int64_t *table,
                                             const int64_t *table_host, int64_t nblocks,
                                             const uint8_t *active,
                                             const shampoo_root_config *cfg,
                                             uint8_t *is_diagonal, int32_t *status_out);
shampoo_status shampoo_cuda_root_inverse_f64(const shampoo_cuda_env *env, double *out,
                                             const double *factors, const int64_t *table,
                                             const int64_t *table_host, int64_t nblocks,
                                             const uint8_t *active,
                                             const shampoo_root_config *cfg,
                                             uint8_t *is_diagonal, int32_t *status_out);

/* ---- device and failures (device_cuda.cu) --------------------------------------------- */

/* Makes `device` current for this thread, saving the current one in *previous (torch's:
 * the caller restores it with shampoo_cuda_device_leave); 0, or -1 with a failure recorded. */
int shampoo_cuda_device_enter(int device, int *previous);
void shampoo_cuda_device_leave(int device, int previous);

/* The first failed CUDA runtime, cuBLAS or cuSOLVER call since the last clear, on this
 * thread: every SHAMPOO_ERR_CUDA comes with one. Text "<call> returned <code> (<name>: <text>)
 * at <file>:<line>", or NULL when nothing failed. The binding clears it before each call. */
typedef enum { SHAMPOO_LIB_CUDA = 0, SHAMPOO_LIB_CUBLAS = 1, SHAMPOO_LIB_CUSOLVER = 2 } shampoo_cuda_lib;
void shampoo_cuda_record_failure(shampoo_cuda_lib lib, const char *call, int code,
                                 const char *file, int line);
const char *shampoo_cuda_failure(void);
void shampoo_cuda_clear_failure(void);

/* The SM architectures this extension was compiled for ("75;80;90"). */
const char *shampoo_cuda_built_archs(void);

#ifdef __cplusplus
}
#endif

#endif
