/* Inverse p-th roots of every factor of every active block (SPEC B §4.6, §5). The BLAS/LAPACK
 * adaptors and table checks live here; the numerics are written once in
 * matrix_root_methods.inc and matrix_root.inc, instantiated for double then float. */
#include "matrix_root.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "block_table.h"
#include "int_math.h"
#include "parallel.h"

/* Growth factor of the error above which the higher-order iteration stops early, and the
 * error below which a stalled iteration counts as done (SPEC §5.5 step 7). */
#define SHAMPOO_ROOT_EARLY_STOP_GROWTH 1.2
#define SHAMPOO_ROOT_STALL_ERROR 1e-3
/* Largest max|A_r X^p - I| a higher-order result may have (SPEC §5.5 step 8). */
#define SHAMPOO_ROOT_TRUE_ERROR_LIMIT 0.1

/* Square gemm on n x n column-major matrices: c = op(a) op(b). */
static void root_gemm_f32(const shampoo_linalg *la, char transa, char transb, int n,
                          const float *a, const float *b, float *c)
{
    float one = 1.0f, zero = 0.0f;
    la->sgemm(&transa, &transb, &n, &n, &n, &one, (float *)a, &n, (float *)b, &n, &zero, c, &n);
}

static void root_gemm_f64(const shampoo_linalg *la, char transa, char transb, int n,
                          const double *a, const double *b, double *c)
{
    double one = 1.0, zero = 0.0;
    la->dgemm(&transa, &transb, &n, &n, &n, &one, (double *)a, &n, (double *)b, &n, &zero, c,
              &n);
}

/* syevd, jobz 'V', uplo 'U' (see root_eigen), on the n x n matrix a; returns LAPACK's info.
 * lwork = liwork = -1 is the workspace query. */
static int root_syevd_f32(const shampoo_linalg *la, int n, float *a, float *w, float *work,
                          int lwork, int *iwork, int liwork)
{
    char jobz = 'V', uplo = 'U';
    int info = 0;
    la->ssyevd(&jobz, &uplo, &n, a, &n, w, work, &lwork, iwork, &liwork, &info);
    return info;
}

static int root_syevd_f64(const shampoo_linalg *la, int n, double *a, double *w, double *work,
                          int lwork, int *iwork, int liwork)
{
    char jobz = 'V', uplo = 'U';
    int info = 0;
    la->dsyevd(&jobz, &uplo, &n, a, &n, w, work, &lwork, iwork, &liwork, &info);
    return info;
}

/* Nonzero if a routine this precision needs is missing from the table (the float32 kernel
 * also needs the double ones for its float64 retry). */
static int root_linalg_missing_f64(const shampoo_linalg *la)
{
    return la->dgemm == NULL || la->dsyrk == NULL || la->dsyevd == NULL;
}

static int root_linalg_missing_f32(const shampoo_linalg *la)
{
    return la->sgemm == NULL || la->ssyrk == NULL || la->ssyevd == NULL ||
           root_linalg_missing_f64(la);
}

static int root_config_valid(const shampoo_root_config *cfg)
{
    if (cfg->method != SHAMPOO_ROOT_EIGEN && cfg->method != SHAMPOO_ROOT_NEWTON &&
        cfg->method != SHAMPOO_ROOT_HIGHER_ORDER) {
        return 0;
    }
    if (!isfinite(cfg->bias_correction) || cfg->bias_correction == 0.0 ||
        isnan(cfg->epsilon) || isnan(cfg->exponent_multiplier) || isnan(cfg->tolerance) ||
        cfg->max_iterations < 0 || cfg->max_iterations > SHAMPOO_ROOT_MAX_ITERATIONS) {
        return 0;
    }
    if (cfg->method == SHAMPOO_ROOT_HIGHER_ORDER &&
        (cfg->order < 2 || cfg->order > SHAMPOO_ROOT_MAX_TAYLOR_ORDER ||
         isnan(cfg->rel_epsilon))) {
        return 0;
    }
    return 1;
}

/* Checks the fields the root kernels read from every row (the binding checks the rows
 * against the buffer sizes) and returns the largest factor dim and the factor count.
 * LAPACK takes int sizes, and scratch holds a few n*n matrices. */
static shampoo_status root_table_scan(const int64_t *table, int64_t nblocks, int64_t *max_dim,
                                      int64_t *nfactors)
{
    const int64_t dim_limit = 46340; /* largest n with n*n <= INT_MAX */
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t *row = shampoo_table_row(table, b);
        int64_t order = row[SHAMPOO_BF_ORDER];
        if (order < 0 || order > SHAMPOO_MAX_ORDER || row[SHAMPOO_BF_FACTOR_OFFSET] < 0 ||
            row[SHAMPOO_BF_FACTOR_INDEX] < 0) {
            return SHAMPOO_ERR_INVALID_ARG;
        }
        for (int64_t k = 0; k < order; k++) {
            int64_t n = row[SHAMPOO_BF_DIMS + k];
            if (n < 0 || n > dim_limit) {
                return SHAMPOO_ERR_INVALID_ARG;
            }
            *max_dim = n > *max_dim ? n : *max_dim;
        }
        *nfactors += order;
    }
    return SHAMPOO_OK;
}

/* The double instantiation comes first: the float32 eigen path retries in root_eigen_f64. */
#define SHAMPOO_REAL_IS_DOUBLE 1
#include "real_template.h"
#include "matrix_root_methods.inc"
#include "matrix_root.inc"
#include "real_template_end.h"

#define SHAMPOO_REAL_IS_DOUBLE 0
#include "real_template.h"
#include "matrix_root_methods.inc"
#include "matrix_root.inc"
#include "real_template_end.h"
