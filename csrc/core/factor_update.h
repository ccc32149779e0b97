/* Shampoo factor accumulation over the block table (SPEC B §4.4):
 *   C_k = U_k U_k^T (U_k the mode-k unfolding of the block's gradient),
 *   F_k <- F_k + C_k                         if beta2 == 1
 *   F_k <- beta2 F_k + (1 - beta2) C_k       otherwise.
 * SYRK/GEMM through the linalg table; every factor written in full (both triangles). */
#ifndef SHAMPOO_FACTOR_UPDATE_H
#define SHAMPOO_FACTOR_UPDATE_H

#include <stdint.h>
#include "linalg.h"
#include "status.h"

/* factors_out, factors_in: factor layout (may be the same pointer: in place; otherwise
 *   disjoint). Inactive blocks: out = in (copied when distinct).
 * grads: block layout, the block gradients (after L2).
 * active: uint8[nblocks], nonzero = block takes part this step.
 * num_threads: the factors of all blocks are shared among this many POSIX threads, the
 *   caller included (parallel.h; <= 1: the calling thread only). Meant to run with the BLAS
 *   provider single-threaded (else its threads and ours compete for the cores); then results
 *   are bitwise the same for every num_threads, provided blocks do not overlap in factors_out
 *   (true of every table the package builds).
 * On SHAMPOO_ERR_* the contents of factors_out are unspecified (callers write to scratch);
 * SHAMPOO_ERR_UNSUPPORTED (a size beyond BLAS's 32-bit ints) is found before any write. */
shampoo_status shampoo_factor_update_f32(const shampoo_linalg *la, float *factors_out,
                                         const float *factors_in, const float *grads,
                                         const int64_t *table, int64_t nblocks,
                                         const uint8_t *active, double beta2,
                                         int num_threads);
shampoo_status shampoo_factor_update_f64(const shampoo_linalg *la, double *factors_out,
                                         const double *factors_in, const double *grads,
                                         const int64_t *table, int64_t nblocks,
                                         const uint8_t *active, double beta2,
                                         int num_threads);

/* The same update with factors_out / factors_in in the packed layout (sym_pack.h): each
 * entry of a factor's upper triangle computed exactly as the full update computes it, the
 * lower triangle neither read nor stored (issue 11). */
shampoo_status shampoo_factor_update_packed_f32(const shampoo_linalg *la, float *factors_out,
                                                const float *factors_in, const float *grads,
                                                const int64_t *table, int64_t nblocks,
                                                const uint8_t *active, double beta2,
                                                int num_threads);
shampoo_status shampoo_factor_update_packed_f64(const shampoo_linalg *la, double *factors_out,
                                                const double *factors_in, const double *grads,
                                                const int64_t *table, int64_t nblocks,
                                                const uint8_t *active, double beta2,
                                                int num_threads);

#endif
