/* BLAS/LAPACK function table. The binding fills it once at import from SciPy's exported
 * Fortran routines (scipy.linalg.cython_blas / cython_lapack capsules, 32-bit ints, column
 * major, every argument by pointer) after checking each capsule's signature; the core only
 * ever calls through this table, so the provider can change in one place. */
#ifndef SHAMPOO_LINALG_H
#define SHAMPOO_LINALG_H

typedef void (*shampoo_sgemm_fn)(char *transa, char *transb, int *m, int *n, int *k,
                                 float *alpha, float *a, int *lda, float *b, int *ldb,
                                 float *beta, float *c, int *ldc);
typedef void (*shampoo_dgemm_fn)(char *transa, char *transb, int *m, int *n, int *k,
                                 double *alpha, double *a, int *lda, double *b, int *ldb,
                                 double *beta, double *c, int *ldc);
typedef void (*shampoo_ssyrk_fn)(char *uplo, char *trans, int *n, int *k, float *alpha,
                                 float *a, int *lda, float *beta, float *c, int *ldc);
typedef void (*shampoo_dsyrk_fn)(char *uplo, char *trans, int *n, int *k, double *alpha,
                                 double *a, int *lda, double *beta, double *c, int *ldc);
typedef void (*shampoo_ssyevd_fn)(char *jobz, char *uplo, int *n, float *a, int *lda, float *w,
                                  float *work, int *lwork, int *iwork, int *liwork, int *info);
typedef void (*shampoo_dsyevd_fn)(char *jobz, char *uplo, int *n, double *a, int *lda,
                                  double *w, double *work, int *lwork, int *iwork, int *liwork,
                                  int *info);

/* QR (eigenvalue-corrected Shampoo's warm-started eigenbases, soap.h): geqrf, then orgqr. */
typedef void (*shampoo_sgeqrf_fn)(int *m, int *n, float *a, int *lda, float *tau, float *work,
                                  int *lwork, int *info);
typedef void (*shampoo_dgeqrf_fn)(int *m, int *n, double *a, int *lda, double *tau,
                                  double *work, int *lwork, int *info);
typedef void (*shampoo_sorgqr_fn)(int *m, int *n, int *k, float *a, int *lda, float *tau,
                                  float *work, int *lwork, int *info);
typedef void (*shampoo_dorgqr_fn)(int *m, int *n, int *k, double *a, int *lda, double *tau,
                                  double *work, int *lwork, int *info);

typedef struct shampoo_linalg {
    shampoo_sgemm_fn sgemm;
    shampoo_dgemm_fn dgemm;
    shampoo_ssyrk_fn ssyrk;
    shampoo_dsyrk_fn dsyrk;
    shampoo_ssyevd_fn ssyevd;
    shampoo_dsyevd_fn dsyevd;
    shampoo_sgeqrf_fn sgeqrf;
    shampoo_dgeqrf_fn dgeqrf;
    shampoo_sorgqr_fn sorgqr;
    shampoo_dorgqr_fn dorgqr;
} shampoo_linalg;

#endif
