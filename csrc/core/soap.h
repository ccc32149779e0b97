/* Eigenvalue-corrected Shampoo (SOAP, arXiv 2409.11321) over the block table (issue 14).
 *
 * Eigenbases live in factor layout, stored whole (they are not symmetric): Q_k for dim k of a
 * block, n_k x n_k row-major, column j the eigenvector of the j-th smallest eigenvalue. The
 * corrected second moment D lives in block layout (one entry per gradient element).
 * R(X) = X x_0 Q_0 ... x_{d-1} Q_{d-1}: each mode contracted with Q_k's first index (the
 * coordinates Q_k^T X of every mode); R^T contracts with the second index (rotates back).
 * A block whose Q_0 is all zero has no eigenbasis yet: R is then the identity. */
#ifndef SHAMPOO_SOAP_H
#define SHAMPOO_SOAP_H

#include <stdint.h>
#include "linalg.h"
#include "status.h"

typedef struct shampoo_soap_params {
    double beta2;           /* D <- beta2 D + (1 - beta2) R(G)^2; 1: D <- D + R(G)^2 */
    double bias_correction; /* bc2 > 0, finite */
    double epsilon;         /* >= 0 */
} shampoo_soap_params;

/* For every active block (the integer root r = ROOT of its row, >= 1):
 *   if moment_grads: D <- beta2 D + (1 - beta2) R(moment_grads)^2;
 *   if out: out = R^T( R(grads) / (D / bc2 + epsilon)^(1/r) )   (with the updated D).
 * moment_grads may be the same buffer as grads (rotated once then). At least one of
 * moment_grads and out is given; grads is required with out. Order-0 blocks: R = identity.
 * out, grads, moment_grads, corrected: block layout (out disjoint from the others);
 * bases: factor layout. Scratch (two block-sized buffers per thread) is malloc'ed inside.
 * num_threads: blocks are shared among this many POSIX threads (parallel.h); results are
 * bitwise the same for every num_threads with the BLAS provider single-threaded.
 * SHAMPOO_ERR_UNSUPPORTED (a block beyond BLAS's 32-bit ints) is found before any write. */
shampoo_status shampoo_soap_direction_f32(const shampoo_linalg *la, float *out,
                                          const float *grads, const float *moment_grads,
                                          const float *bases, float *corrected,
                                          const int64_t *table, int64_t nblocks,
                                          const uint8_t *active, const shampoo_soap_params *p,
                                          int num_threads);
shampoo_status shampoo_soap_direction_f64(const shampoo_linalg *la, double *out,
                                          const double *grads, const double *moment_grads,
                                          const double *bases, double *corrected,
                                          const int64_t *table, int64_t nblocks,
                                          const uint8_t *active, const shampoo_soap_params *p,
                                          int num_threads);

typedef enum shampoo_eigenbasis_method {
    SHAMPOO_EIGENBASIS_EIGH = 0, /* syevd (float64 retry for float32 if asked) */
    SHAMPOO_EIGENBASIS_QR = 1    /* orthogonal iteration from `previous`; eigh if it is zero */
} shampoo_eigenbasis_method;

typedef struct shampoo_eigenbasis_config {
    shampoo_eigenbasis_method method;
    int retry_double_precision; /* eigh, float32 kernel only */
    int64_t max_iterations;     /* QR: 0..SHAMPOO_ROOT_MAX_ITERATIONS (matrix_root.h) */
    double tolerance;           /* QR: stop once ||Q_old - Q||_F / ||Q_old||_F <= tolerance */
} shampoo_eigenbasis_config;

/* For each active block b and dim k, F = factors[b, k] (n x n, symmetric):
 *   1. if is_diagonal[f] and F has a nonzero off-diagonal entry: is_diagonal[f] = 0;
 *   2. NaN in F -> status FACTOR_NAN, else Inf -> FACTOR_INF (out[f] not written);
 *   3. n == 1: Q = [1]; is_diagonal[f]: Q = I; eigh: Q = syevd's eigenvectors (ascending);
 *      QR with previous[f] all zero: as eigh; else Q = previous[f], up to max_iterations
 *      steps of Q <- qr(F Q).Q (LAPACK geqrf + orgqr) until the relative change is <= tolerance, then
 *      the columns sorted by ascending Rayleigh quotient q^T F q (stable for ties);
 *   4. syevd not converging (after the retry) -> FAILED; Q non-finite -> NONFINITE (out[f]
 *      holds it); float32 syevd failing and the retry succeeding -> RETRIED_DOUBLE; else OK.
 * out, previous (QR only, may be NULL for eigh), factors: factor layout; out is disjoint from
 * factors and previous. is_diagonal: uint8[factor_count] in/out; status_out: int32 per factor
 * (INACTIVE for inactive blocks). Factors are shared among num_threads threads (parallel.h). */
shampoo_status shampoo_eigenbasis_f32(const shampoo_linalg *la, float *out, const float *factors,
                                      const float *previous, const int64_t *table,
                                      int64_t nblocks, const uint8_t *active,
                                      const shampoo_eigenbasis_config *cfg, uint8_t *is_diagonal,
                                      int32_t *status_out, int num_threads);
shampoo_status shampoo_eigenbasis_f64(const shampoo_linalg *la, double *out,
                                      const double *factors, const double *previous,
                                      const int64_t *table, int64_t nblocks,
                                      const uint8_t *active,
                                      const shampoo_eigenbasis_config *cfg, uint8_t *is_diagonal,
                                      int32_t *status_out, int num_threads);

#endif
