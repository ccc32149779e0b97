/* Shampoo preconditioning of every active block (SPEC B §4.8):
 *   P[j_0..j_{d-1}] = sum_i G[i_0..i_{d-1}] Q_0[i_0, j_0] ... Q_{d-1}[i_{d-1}, j_{d-1}]
 * done as d contractions "dimension 0 with Q_k's first index, result index moved last"
 * (GEMM with the transposed operand). Order-0 blocks: P = G. */
#ifndef SHAMPOO_PRECONDITION_H
#define SHAMPOO_PRECONDITION_H

#include <stdint.h>
#include "linalg.h"
#include "status.h"

/* out, grads: block layout, disjoint. inv_roots: factor layout. Inactive blocks of out are not
 * written. CPU scratch (two block-sized buffers per thread) is malloc'ed and freed inside.
 * num_threads: blocks are shared among this many POSIX threads, the caller included
 *   (parallel.h; <= 1: the calling thread only). Meant to run with the BLAS provider
 *   single-threaded (else its threads and ours compete for the cores); then out is bitwise
 *   the same for every num_threads, provided blocks do not overlap in out (true of every table
 *   the package builds).
 * On SHAMPOO_ERR_* out is unspecified; SHAMPOO_ERR_UNSUPPORTED (a block beyond BLAS's 32-bit
 * ints) is found before any write. */
shampoo_status shampoo_precondition_f32(const shampoo_linalg *la, float *out, const float *grads,
                                        const float *inv_roots, const int64_t *table,
                                        int64_t nblocks, const uint8_t *active,
                                        int num_threads);
shampoo_status shampoo_precondition_f64(const shampoo_linalg *la, double *out,
                                        const double *grads, const double *inv_roots,
                                        const int64_t *table, int64_t nblocks,
                                        const uint8_t *active, int num_threads);

#endif
