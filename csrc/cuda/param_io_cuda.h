/* The pointer-table passes (core/param_io.h) on the device: gradients read and parameters
 * written where they are, so a CUDA step holds no param-layout copy of either (issue 11).
 * shampoo_cuda.h's conventions (stream, device and host tables, caller-owned workspace);
 * bodies in param_io_cuda.cu.
 *
 * Pointer tables: `grads`, `params` are HOST arrays of nblocks device pointers, built by the
 * binding from its tensor list: ptrs[b] points at block b's first element (the element at
 * the row's PARAM_OFFSET) in the tensor holding it, NULL exactly for inactive blocks (the
 * binding has proved every active block inside its tensor). The call copies them into its
 * workspace on the stream through a pinned staging buffer that is reused only once that
 * copy has completed (io_staging_cuda.cu; never waited for), so the caller's arrays may go
 * at once. There is
 * no device `active` mask: a block takes part when it has a pointer (`active_host`, the
 * mask the binding built the tables from, is checked against them on the host).
 *
 * `dtype` as in param_io.h: the kernels' float/double, or bfloat16 with float kernels only. */
#ifndef SHAMPOO_PARAM_IO_CUDA_H
#define SHAMPOO_PARAM_IO_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "../core/param_io.h"
#include "shampoo_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Workspace bytes of one call over nblocks blocks with `tables` pointer tables (gather_io:
 * 1 or 2, finish_io / scatter_io: 1), plus finish's per-block ratios when `finish`. */
size_t shampoo_cuda_io_workspace(int64_t nblocks, int tables, int finish);

/* As shampoo_gather_io_*, but the non-finite check goes into `fail` for step `step` as
 * shampoo_cuda_gather_* does (fail NULL: no check, e.g. a second read of gradients already
 * checked), and nothing is returned to the host. grad_blocks and param_blocks may be NULL
 * (not written); sq_norms (NULL: not wanted) as shampoo_cuda_gather_*. */
shampoo_status shampoo_cuda_gather_io_f32(const shampoo_cuda_env *env, float *grad_blocks,
                                          float *param_blocks, const void *const *grads,
                                          const void *const *params, shampoo_io_dtype dtype,
                                          const int64_t *table, const int64_t *table_host,
                                          int64_t nblocks, const uint8_t *active_host,
                                          double l2_weight_decay, int64_t step, int64_t *fail,
                                          double *sq_norms);
shampoo_status shampoo_cuda_gather_io_f64(const shampoo_cuda_env *env, double *grad_blocks,
                                          double *param_blocks, const void *const *grads,
                                          const void *const *params, shampoo_io_dtype dtype,
                                          const int64_t *table, const int64_t *table_host,
                                          int64_t nblocks, const uint8_t *active_host,
                                          double l2_weight_decay, int64_t step, int64_t *fail,
                                          double *sq_norms);

/* As shampoo_finish_io_*: W <- W + update in place, the update computed exactly as
 * shampoo_cuda_finish_* computes it. While `fail` records a failure nothing is written
 * (neither parameters nor momentum). */
shampoo_status shampoo_cuda_finish_io_f32(const shampoo_cuda_env *env, void *const *params,
                                          shampoo_io_dtype dtype, const float *grads,
                                          const float *shampoo_dir,
                                          const float *grafting_state, float *momentum_state,
                                          const int64_t *table, const int64_t *table_host,
                                          int64_t nblocks, const uint8_t *active_host,
                                          const shampoo_finish_params *p, const int64_t *fail);
shampoo_status shampoo_cuda_finish_io_f64(const shampoo_cuda_env *env, void *const *params,
                                          shampoo_io_dtype dtype, const double *grads,
                                          const double *shampoo_dir,
                                          const double *grafting_state, double *momentum_state,
                                          const int64_t *table, const int64_t *table_host,
                                          int64_t nblocks, const uint8_t *active_host,
                                          const shampoo_finish_params *p, const int64_t *fail);

/* As shampoo_scatter_io_*: W <- W + x (accumulate) or W <- x for every active block. */
shampoo_status shampoo_cuda_scatter_io_f32(const shampoo_cuda_env *env, void *const *params,
                                           shampoo_io_dtype dtype, const float *blocks,
                                           const int64_t *table, const int64_t *table_host,
                                           int64_t nblocks, const uint8_t *active_host,
                                           int accumulate);
shampoo_status shampoo_cuda_scatter_io_f64(const shampoo_cuda_env *env, void *const *params,
                                           shampoo_io_dtype dtype, const double *blocks,
                                           const int64_t *table, const int64_t *table_host,
                                           int64_t nblocks, const uint8_t *active_host,
                                           int accumulate);

#ifdef __cplusplus
}
#endif

#endif
