/* Inverse p-th roots of every factor of every active block (SPEC B §4.6, §5), written to a
 * scratch buffer with one status per factor, so that the optimizer can raise before any live
 * state changes (SPEC A.3.12) and commit only the factors that succeeded. */
#ifndef SHAMPOO_MATRIX_ROOT_H
#define SHAMPOO_MATRIX_ROOT_H

#include <stdint.h>
#include "linalg.h"
#include "status.h"

typedef enum shampoo_root_method {
    SHAMPOO_ROOT_EIGEN = 0,          /* SPEC §5.3: syevd, PSD shift, epsilon, fp64 retry */
    SHAMPOO_ROOT_NEWTON = 1,         /* SPEC §5.4: coupled inverse Newton */
    SHAMPOO_ROOT_HIGHER_ORDER = 2    /* SPEC §5.5: coupled higher-order, integer root */
} shampoo_root_method;

/* Bounds on the config values that size work or memory (the Python configs refuse larger at
 * construction, matrix_functions_types.py): with tolerance 0 Newton runs all max_iterations,
 * each a few n^3 products; order is the number of Taylor terms, one n x n product and one
 * scratch entry each per iteration. Far above what converges (defaults 100 and 3). */
#define SHAMPOO_ROOT_MAX_ITERATIONS 1000
#define SHAMPOO_ROOT_MAX_TAYLOR_ORDER 64

typedef struct shampoo_root_config {
    shampoo_root_method method;
    double epsilon;                  /* added to the spectrum / diagonal (SPEC §5) */
    double exponent_multiplier;      /* alpha = -exponent_multiplier / root */
    double bias_correction;          /* bc2: each factor is divided by it first (SPEC §4.6.2) */
    int make_positive_semidefinite;  /* eigen */
    int retry_double_precision;      /* eigen, float32 kernel only */
    int64_t max_iterations;          /* Newton, higher order: 0..SHAMPOO_ROOT_MAX_ITERATIONS */
    double tolerance;                /* Newton, higher order */
    double rel_epsilon;              /* higher order */
    int64_t order;                   /* higher order: 2..SHAMPOO_ROOT_MAX_TAYLOR_ORDER */
} shampoo_root_config;

/* For each active block b and each dim k, with F = factors[b, k] (uncorrected), r = ROOT(b):
 *   1. if is_diagonal[f] and F has a nonzero off-diagonal entry: is_diagonal[f] = 0;
 *   2. A = F / bias_correction; NaN in A -> status FACTOR_NAN, else Inf -> FACTOR_INF
 *      (nothing computed, out[f] not written);
 *   3. X = A's inverse root: a 1x1 factor uses (a + epsilon)^alpha with alpha rounded to
 *      float32 (SPEC §4.12); else is_diagonal[f] -> diagonal method (SPEC §5.2); else
 *      cfg->method;
 *   4. X non-finite -> NONFINITE (out[f] holds X anyway); method failure -> FAILED;
 *      Newton/higher order at max_iterations -> MAX_ITERS; else OK.
 * out: factor layout scratch; written only at factors with status OK, MAX_ITERS, NONFINITE.
 * factors: factor layout. is_diagonal: uint8[factor_count] in/out.
 * status_out: int32[factor_count], one shampoo_root_status per factor (INACTIVE for factors of
 * inactive blocks).
 * num_threads: the factors of all blocks are shared among this many POSIX threads, the
 *   caller included (parallel.h; <= 1: the calling thread only). Meant to run with the BLAS
 *   provider single-threaded (else its threads and ours compete for the cores); then out,
 *   is_diagonal and status_out are bitwise the same for every num_threads, provided blocks do
 *   not overlap in factor layout or factor indices (true of every table the package builds).
 * Returns SHAMPOO_OK unless an argument is invalid or scratch allocation fails (then the
 * outputs are partly written). */
shampoo_status shampoo_root_inverse_f32(const shampoo_linalg *la, float *out,
                                        const float *factors, const int64_t *table,
                                        int64_t nblocks, const uint8_t *active,
                                        const shampoo_root_config *cfg, uint8_t *is_diagonal,
                                        int32_t *status_out, int num_threads);
shampoo_status shampoo_root_inverse_f64(const shampoo_linalg *la, double *out,
                                        const double *factors, const int64_t *table,
                                        int64_t nblocks, const uint8_t *active,
                                        const shampoo_root_config *cfg, uint8_t *is_diagonal,
                                        int32_t *status_out, int num_threads);

#endif
