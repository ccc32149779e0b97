/* cuBLAS and cuSOLVER, resolved at run time. The extension does not link them: it dlopen()s
 * the copies that torch's CUDA build already ships and loads (cuda_libs.c), and calls them
 * through this table, as the CPU core calls SciPy's BLAS through linalg.h. So the CUDA
 * sources compile with nvcc alone (no cuBLAS/cuSOLVER headers or libraries at build time),
 * and the extension uses the same library versions as torch in the same process.
 *
 * The types below restate the documented C ABI of the routines used: handles and opaque
 * parameter objects are pointers, enums are C ints with the documented values. */
#ifndef SHAMPOO_CUDA_LIBS_H
#define SHAMPOO_CUDA_LIBS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Documented enum values (cublas_api.h, cusolver_common.h, library_types.h). */
enum {
    SHAMPOO_CUBLAS_OP_N = 0,
    SHAMPOO_CUBLAS_OP_T = 1,
    SHAMPOO_CUBLAS_FILL_LOWER = 0,
    SHAMPOO_CUBLAS_FILL_UPPER = 1,
    SHAMPOO_CUBLAS_DEFAULT_MATH = 0,
    SHAMPOO_CUBLAS_PEDANTIC_MATH = 2,
    SHAMPOO_CUSOLVER_EIG_MODE_VECTOR = 1,
    SHAMPOO_CUDA_R_32F = 0,
    SHAMPOO_CUDA_R_64F = 1
};

typedef void *shampoo_cublas_handle;    /* cublasHandle_t */
typedef void *shampoo_cusolver_handle;  /* cusolverDnHandle_t */
typedef void *shampoo_cusolver_params;  /* cusolverDnParams_t */
typedef void *shampoo_syevj_info;       /* syevjInfo_t */

/* Every routine returns its library's status enum: 0 is success. */
typedef int (*shampoo_cublas_create_fn)(shampoo_cublas_handle *handle);
typedef int (*shampoo_cublas_destroy_fn)(shampoo_cublas_handle handle);
typedef int (*shampoo_cublas_set_stream_fn)(shampoo_cublas_handle handle, void *stream);
typedef int (*shampoo_cublas_set_workspace_fn)(shampoo_cublas_handle handle, void *workspace,
                                               size_t bytes);
typedef int (*shampoo_cublas_set_math_mode_fn)(shampoo_cublas_handle handle, int mode);
typedef int (*shampoo_cublas_sgemm_batched_fn)(shampoo_cublas_handle handle, int transa,
                                               int transb, int m, int n, int k,
                                               const float *alpha, const float *const a[],
                                               int lda, const float *const b[], int ldb,
                                               const float *beta, float *const c[], int ldc,
                                               int batch_count);
typedef int (*shampoo_cublas_dgemm_batched_fn)(shampoo_cublas_handle handle, int transa,
                                               int transb, int m, int n, int k,
                                               const double *alpha, const double *const a[],
                                               int lda, const double *const b[], int ldb,
                                               const double *beta, double *const c[], int ldc,
                                               int batch_count);
typedef int (*shampoo_cublas_sgemm_strided_fn)(shampoo_cublas_handle handle, int transa,
                                               int transb, int m, int n, int k,
                                               const float *alpha, const float *a, int lda,
                                               long long stride_a, const float *b, int ldb,
                                               long long stride_b, const float *beta, float *c,
                                               int ldc, long long stride_c, int batch_count);
typedef int (*shampoo_cublas_dgemm_strided_fn)(shampoo_cublas_handle handle, int transa,
                                               int transb, int m, int n, int k,
                                               const double *alpha, const double *a, int lda,
                                               long long stride_a, const double *b, int ldb,
                                               long long stride_b, const double *beta,
                                               double *c, int ldc, long long stride_c,
                                               int batch_count);

typedef int (*shampoo_cusolver_create_fn)(shampoo_cusolver_handle *handle);
typedef int (*shampoo_cusolver_destroy_fn)(shampoo_cusolver_handle handle);
typedef int (*shampoo_cusolver_set_stream_fn)(shampoo_cusolver_handle handle, void *stream);
typedef int (*shampoo_cusolver_ssyevd_buffer_fn)(shampoo_cusolver_handle handle, int jobz, int uplo,
                                        int n, const float *a, int lda, const float *w,
                                        int *lwork);
typedef int (*shampoo_cusolver_dsyevd_buffer_fn)(shampoo_cusolver_handle handle, int jobz, int uplo,
                                        int n, const double *a, int lda, const double *w,
                                        int *lwork);
typedef int (*shampoo_cusolver_ssyevd_fn)(shampoo_cusolver_handle handle, int jobz, int uplo, int n,
                                 float *a, int lda, float *w, float *work, int lwork,
                                 int *dev_info);
typedef int (*shampoo_cusolver_dsyevd_fn)(shampoo_cusolver_handle handle, int jobz, int uplo, int n,
                                 double *a, int lda, double *w, double *work, int lwork,
                                 int *dev_info);
typedef int (*shampoo_syevj_info_create_fn)(shampoo_syevj_info *info);
typedef int (*shampoo_syevj_info_destroy_fn)(shampoo_syevj_info info);
typedef int (*shampoo_ssyevj_batched_buffer_fn)(shampoo_cusolver_handle handle, int jobz,
                                                int uplo, int n, const float *a, int lda,
                                                const float *w, int *lwork,
                                                shampoo_syevj_info params, int batch);
typedef int (*shampoo_dsyevj_batched_buffer_fn)(shampoo_cusolver_handle handle, int jobz,
                                                int uplo, int n, const double *a, int lda,
                                                const double *w, int *lwork,
                                                shampoo_syevj_info params, int batch);
typedef int (*shampoo_ssyevj_batched_fn)(shampoo_cusolver_handle handle, int jobz, int uplo,
                                         int n, float *a, int lda, float *w, float *work,
                                         int lwork, int *info, shampoo_syevj_info params,
                                         int batch);
typedef int (*shampoo_dsyevj_batched_fn)(shampoo_cusolver_handle handle, int jobz, int uplo,
                                         int n, double *a, int lda, double *w, double *work,
                                         int lwork, int *info, shampoo_syevj_info params,
                                         int batch);
/* Optional (cuSOLVER 11.7+): the 64-bit batched symmetric eigensolver. */
typedef int (*shampoo_params_create_fn)(shampoo_cusolver_params *params);
typedef int (*shampoo_params_destroy_fn)(shampoo_cusolver_params params);
typedef int (*shampoo_xsyev_batched_buffer_fn)(shampoo_cusolver_handle handle,
                                               shampoo_cusolver_params params, int jobz,
                                               int uplo, int64_t n, int type_a, const void *a,
                                               int64_t lda, int type_w, const void *w,
                                               int compute_type, size_t *device_bytes,
                                               size_t *host_bytes, int64_t batch);
typedef int (*shampoo_xsyev_batched_fn)(shampoo_cusolver_handle handle,
                                        shampoo_cusolver_params params, int jobz, int uplo,
                                        int64_t n, int type_a, void *a, int64_t lda, int type_w,
                                        void *w, int compute_type, void *device_buffer,
                                        size_t device_bytes, void *host_buffer,
                                        size_t host_bytes, int *info, int64_t batch);

typedef struct shampoo_cuda_libs {
    void *cublas_lib;                   /* dlopen handles */
    void *cusolver_lib;
    shampoo_cublas_create_fn cublas_create;
    shampoo_cublas_destroy_fn cublas_destroy;
    shampoo_cublas_set_stream_fn cublas_set_stream;
    shampoo_cublas_set_workspace_fn cublas_set_workspace;
    shampoo_cublas_set_math_mode_fn cublas_set_math_mode;
    shampoo_cublas_sgemm_batched_fn sgemm_batched;
    shampoo_cublas_dgemm_batched_fn dgemm_batched;
    shampoo_cublas_sgemm_strided_fn sgemm_strided;
    shampoo_cublas_dgemm_strided_fn dgemm_strided;
    shampoo_cusolver_create_fn cusolver_create;
    shampoo_cusolver_destroy_fn cusolver_destroy;
    shampoo_cusolver_set_stream_fn cusolver_set_stream;
    shampoo_cusolver_ssyevd_buffer_fn ssyevd_buffer;
    shampoo_cusolver_dsyevd_buffer_fn dsyevd_buffer;
    shampoo_cusolver_ssyevd_fn ssyevd;
    shampoo_cusolver_dsyevd_fn dsyevd;
    shampoo_syevj_info_create_fn syevj_info_create;
    shampoo_syevj_info_destroy_fn syevj_info_destroy;
    shampoo_ssyevj_batched_buffer_fn ssyevj_batched_buffer;
    shampoo_dsyevj_batched_buffer_fn dsyevj_batched_buffer;
    shampoo_ssyevj_batched_fn ssyevj_batched;
    shampoo_dsyevj_batched_fn dsyevj_batched;
    /* NULL when the library predates them */
    shampoo_params_create_fn params_create;
    shampoo_params_destroy_fn params_destroy;
    shampoo_xsyev_batched_buffer_fn xsyev_batched_buffer;
    shampoo_xsyev_batched_fn xsyev_batched;
} shampoo_cuda_libs;

/* dlopen()s the first loadable path of each list and resolves every routine. Returns 0, or
 * -1 with a message naming the library or symbol in err (errlen bytes). */
int shampoo_cuda_libs_load(shampoo_cuda_libs *libs, const char *const *cublas_paths,
                           int n_cublas, const char *const *cusolver_paths, int n_cusolver,
                           char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
