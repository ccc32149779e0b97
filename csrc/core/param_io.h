/* The elementwise passes that read gradients and write parameters where they are (issue 11):
 * through a per-block pointer table instead of a model-sized param-layout copy.
 *
 * ptrs[b] (one per block, NULL allowed for inactive blocks) points at the block's first
 * element (the element at the row's PARAM_OFFSET) inside the tensor holding it; the block's
 * other elements follow the row's strides from there, exactly as in a param-layout buffer
 * (block_walk.h), so a row's PARAM_OFFSET only fixes where the block starts. The binding
 * proves every active block inside its tensor before a kernel runs.
 *
 * `dtype` says how those tensors store their elements: SHAMPOO_IO_REAL (the kernel's own
 * float or double) or SHAMPOO_IO_BF16 (bfloat16, float kernels only: widened exactly on read,
 * rounded to nearest even on write, as torch's bfloat16 arithmetic does). The arithmetic is
 * that of gather / finish / scatter (elementwise.h), element for element. The CUDA twins
 * (csrc/cuda/param_io_cuda.h) read and write CUDA parameters in place the same way. */
#ifndef SHAMPOO_PARAM_IO_H
#define SHAMPOO_PARAM_IO_H

#include <stdint.h>

#include "elementwise.h"
#include "status.h"

typedef enum shampoo_io_dtype {
    SHAMPOO_IO_REAL = 0,
    SHAMPOO_IO_BF16 = 1
} shampoo_io_dtype;

/* gather through pointers: for every active block, x = G + l2_weight_decay * W (SPEC §4.3),
 *   grad_blocks <- x          (block layout; NULL: not written, a read-only check)
 *   param_blocks <- W         (block layout; NULL: not written)
 *   sq_norms[b] <- ||x||_F^2  (double; NULL: not wanted; 0 for inactive blocks)
 *   *first_nonfinite_block <- first active block with a NaN or Inf x, or -1.
 * grads: per-block pointers. params: per-block pointers, NULL allowed unless
 * l2_weight_decay != 0 or param_blocks is given. */
shampoo_status shampoo_gather_io_f32(float *grad_blocks, float *param_blocks,
                                     const void *const *grads, const void *const *params,
                                     shampoo_io_dtype dtype, const int64_t *table,
                                     int64_t nblocks, const uint8_t *active,
                                     double l2_weight_decay, int64_t *first_nonfinite_block,
                                     double *sq_norms);
shampoo_status shampoo_gather_io_f64(double *grad_blocks, double *param_blocks,
                                     const void *const *grads, const void *const *params,
                                     shampoo_io_dtype dtype, const int64_t *table,
                                     int64_t nblocks, const uint8_t *active,
                                     double l2_weight_decay, int64_t *first_nonfinite_block,
                                     double *sq_norms);

/* finish fused with the parameter update: computes P exactly as shampoo_finish, with the
 * decoupled weight decay's W read from the parameters themselves, then writes
 *   W <- W + (-lr * P)   (rounded once to the parameters' dtype, as torch's add_)
 * in place. Every element is read before it is written. grads, shampoo_dir, grafting_state,
 * momentum_state: block layout, as for shampoo_finish. */
shampoo_status shampoo_finish_io_f32(void *const *params, shampoo_io_dtype dtype,
                                     const float *grads, const float *shampoo_dir,
                                     const float *grafting_state, float *momentum_state,
                                     const int64_t *table, int64_t nblocks,
                                     const uint8_t *active, const shampoo_finish_params *p);
shampoo_status shampoo_finish_io_f64(void *const *params, shampoo_io_dtype dtype,
                                     const double *grads, const double *shampoo_dir,
                                     const double *grafting_state, double *momentum_state,
                                     const int64_t *table, int64_t nblocks,
                                     const uint8_t *active, const shampoo_finish_params *p);

/* blocks (block layout) into the parameters for every active block: W <- W + x when
 * accumulate, else W <- x (DDP: the gathered updates, or the gathered parameters). */
shampoo_status shampoo_scatter_io_f32(void *const *params, shampoo_io_dtype dtype,
                                      const float *blocks, const int64_t *table,
                                      int64_t nblocks, const uint8_t *active, int accumulate);
shampoo_status shampoo_scatter_io_f64(void *const *params, shampoo_io_dtype dtype,
                                      const double *blocks, const int64_t *table,
                                      int64_t nblocks, const uint8_t *active, int accumulate);

#endif
