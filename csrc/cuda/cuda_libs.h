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

/* Documented enum values (cublas_api.h, cusolver_common.h, library_types.h), as
 * X(our name, NVIDIA's name, value): tools/check_cuda_headers.py proves each equal to the
 * real one. */
#define SHAMPOO_CUDA_LIB_CONSTANTS(X)                                                      \
    X(SHAMPOO_CUBLAS_OP_N, CUBLAS_OP_N, 0)                                                 \
    X(SHAMPOO_CUBLAS_OP_T, CUBLAS_OP_T, 1)                                                 \
    X(SHAMPOO_CUBLAS_FILL_LOWER, CUBLAS_FILL_MODE_LOWER, 0)                                \
    X(SHAMPOO_CUBLAS_FILL_UPPER, CUBLAS_FILL_MODE_UPPER, 1)                                \
    X(SHAMPOO_CUBLAS_DEFAULT_MATH, CUBLAS_DEFAULT_MATH, 0)                                 \
    X(SHAMPOO_CUBLAS_PEDANTIC_MATH, CUBLAS_PEDANTIC_MATH, 2)                               \
    X(SHAMPOO_CUSOLVER_EIG_MODE_VECTOR, CUSOLVER_EIG_MODE_VECTOR, 1)                       \
    X(SHAMPOO_CUDA_R_32F, CUDA_R_32F, 0)                                                   \
    X(SHAMPOO_CUDA_R_64F, CUDA_R_64F, 1)                                                   \
    X(SHAMPOO_CUBLAS_STATUS_SUCCESS, CUBLAS_STATUS_SUCCESS, 0)                             \
    X(SHAMPOO_CUSOLVER_STATUS_SUCCESS, CUSOLVER_STATUS_SUCCESS, 0)

#define SHAMPOO_CUDA_LIB_ENUM_(ours, real, value) ours = value,
enum { SHAMPOO_CUDA_LIB_CONSTANTS(SHAMPOO_CUDA_LIB_ENUM_) SHAMPOO_CUDA_LIB_CONSTANTS_END_ };
#undef SHAMPOO_CUDA_LIB_ENUM_

/* Status codes named in error messages, as X(value, NVIDIA's name); checked like the
 * constants above. */
#define SHAMPOO_CUBLAS_STATUSES(X)                                                         \
    X(0, CUBLAS_STATUS_SUCCESS)                                                            \
    X(1, CUBLAS_STATUS_NOT_INITIALIZED)                                                    \
    X(3, CUBLAS_STATUS_ALLOC_FAILED)                                                       \
    X(7, CUBLAS_STATUS_INVALID_VALUE)                                                      \
    X(8, CUBLAS_STATUS_ARCH_MISMATCH)                                                      \
    X(11, CUBLAS_STATUS_MAPPING_ERROR)                                                     \
    X(13, CUBLAS_STATUS_EXECUTION_FAILED)                                                  \
    X(14, CUBLAS_STATUS_INTERNAL_ERROR)                                                    \
    X(15, CUBLAS_STATUS_NOT_SUPPORTED)                                                     \
    X(16, CUBLAS_STATUS_LICENSE_ERROR)
#define SHAMPOO_CUSOLVER_STATUSES(X)                                                       \
    X(0, CUSOLVER_STATUS_SUCCESS)                                                          \
    X(1, CUSOLVER_STATUS_NOT_INITIALIZED)                                                  \
    X(2, CUSOLVER_STATUS_ALLOC_FAILED)                                                     \
    X(3, CUSOLVER_STATUS_INVALID_VALUE)                                                    \
    X(4, CUSOLVER_STATUS_ARCH_MISMATCH)                                                    \
    X(5, CUSOLVER_STATUS_MAPPING_ERROR)                                                    \
    X(6, CUSOLVER_STATUS_EXECUTION_FAILED)                                                 \
    X(7, CUSOLVER_STATUS_INTERNAL_ERROR)                                                   \
    X(8, CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED)                                        \
    X(9, CUSOLVER_STATUS_NOT_SUPPORTED)

/* NVIDIA's name of a cuBLAS / cuSOLVER status ("unknown status" for others). */
const char *shampoo_cublas_status_name(int status);
const char *shampoo_cusolver_status_name(int status);

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
/* Householder QR and its explicit Q (the eigenbases' warm-started QR step). */
typedef int (*shampoo_cusolver_sgeqrf_buffer_fn)(shampoo_cusolver_handle handle, int m, int n,
                                                 float *a, int lda, int *lwork);
typedef int (*shampoo_cusolver_dgeqrf_buffer_fn)(shampoo_cusolver_handle handle, int m, int n,
                                                 double *a, int lda, int *lwork);
typedef int (*shampoo_cusolver_sgeqrf_fn)(shampoo_cusolver_handle handle, int m, int n, float *a,
                                          int lda, float *tau, float *work, int lwork,
                                          int *dev_info);
typedef int (*shampoo_cusolver_dgeqrf_fn)(shampoo_cusolver_handle handle, int m, int n, double *a,
                                          int lda, double *tau, double *work, int lwork,
                                          int *dev_info);
typedef int (*shampoo_cusolver_sorgqr_buffer_fn)(shampoo_cusolver_handle handle, int m, int n,
                                                 int k, const float *a, int lda,
                                                 const float *tau, int *lwork);
typedef int (*shampoo_cusolver_dorgqr_buffer_fn)(shampoo_cusolver_handle handle, int m, int n,
                                                 int k, const double *a, int lda,
                                                 const double *tau, int *lwork);
typedef int (*shampoo_cusolver_sorgqr_fn)(shampoo_cusolver_handle handle, int m, int n, int k,
                                          float *a, int lda, const float *tau, float *work,
                                          int lwork, int *dev_info);
typedef int (*shampoo_cusolver_dorgqr_fn)(shampoo_cusolver_handle handle, int m, int n, int k,
                                          double *a, int lda, const double *tau, double *work,
                                          int lwork, int *dev_info);
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

/* Every routine resolved, as X(library: b cuBLAS / s cuSOLVER, exported symbol, field of
 * shampoo_cuda_libs, required). cuda_libs.c resolves from this list and
 * tools/check_cuda_headers.py proves each field's type equal to the symbol's real prototype. */
#define SHAMPOO_CUDA_LIB_SYMBOLS(X)                                                        \
    X(b, cublasCreate_v2, cublas_create, 1)                                                \
    X(b, cublasDestroy_v2, cublas_destroy, 1)                                              \
    X(b, cublasSetStream_v2, cublas_set_stream, 1)                                         \
    X(b, cublasSetWorkspace_v2, cublas_set_workspace, 1)                                   \
    X(b, cublasSetMathMode, cublas_set_math_mode, 1)                                       \
    X(b, cublasSgemmBatched, sgemm_batched, 1)                                             \
    X(b, cublasDgemmBatched, dgemm_batched, 1)                                             \
    X(b, cublasSgemmStridedBatched, sgemm_strided, 1)                                      \
    X(b, cublasDgemmStridedBatched, dgemm_strided, 1)                                      \
    X(s, cusolverDnCreate, cusolver_create, 1)                                             \
    X(s, cusolverDnDestroy, cusolver_destroy, 1)                                           \
    X(s, cusolverDnSetStream, cusolver_set_stream, 1)                                      \
    X(s, cusolverDnSsyevd_bufferSize, ssyevd_buffer, 1)                                    \
    X(s, cusolverDnDsyevd_bufferSize, dsyevd_buffer, 1)                                    \
    X(s, cusolverDnSsyevd, ssyevd, 1)                                                      \
    X(s, cusolverDnDsyevd, dsyevd, 1)                                                      \
    X(s, cusolverDnCreateSyevjInfo, syevj_info_create, 1)                                  \
    X(s, cusolverDnDestroySyevjInfo, syevj_info_destroy, 1)                                \
    X(s, cusolverDnSsyevjBatched_bufferSize, ssyevj_batched_buffer, 1)                     \
    X(s, cusolverDnDsyevjBatched_bufferSize, dsyevj_batched_buffer, 1)                     \
    X(s, cusolverDnSsyevjBatched, ssyevj_batched, 1)                                       \
    X(s, cusolverDnDsyevjBatched, dsyevj_batched, 1)                                       \
    X(s, cusolverDnSgeqrf_bufferSize, sgeqrf_buffer, 1)                                    \
    X(s, cusolverDnDgeqrf_bufferSize, dgeqrf_buffer, 1)                                    \
    X(s, cusolverDnSgeqrf, sgeqrf, 1)                                                      \
    X(s, cusolverDnDgeqrf, dgeqrf, 1)                                                      \
    X(s, cusolverDnSorgqr_bufferSize, sorgqr_buffer, 1)                                    \
    X(s, cusolverDnDorgqr_bufferSize, dorgqr_buffer, 1)                                    \
    X(s, cusolverDnSorgqr, sorgqr, 1)                                                      \
    X(s, cusolverDnDorgqr, dorgqr, 1)                                                      \
    X(s, cusolverDnCreateParams, params_create, 0)                                         \
    X(s, cusolverDnDestroyParams, params_destroy, 0)                                       \
    X(s, cusolverDnXsyevBatched_bufferSize, xsyev_batched_buffer, 0)                       \
    X(s, cusolverDnXsyevBatched, xsyev_batched, 0)

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
    shampoo_cusolver_sgeqrf_buffer_fn sgeqrf_buffer;
    shampoo_cusolver_dgeqrf_buffer_fn dgeqrf_buffer;
    shampoo_cusolver_sgeqrf_fn sgeqrf;
    shampoo_cusolver_dgeqrf_fn dgeqrf;
    shampoo_cusolver_sorgqr_buffer_fn sorgqr_buffer;
    shampoo_cusolver_dorgqr_buffer_fn dorgqr_buffer;
    shampoo_cusolver_sorgqr_fn sorgqr;
    shampoo_cusolver_dorgqr_fn dorgqr;
    /* NULL when the library predates them */
    shampoo_params_create_fn params_create;
    shampoo_params_destroy_fn params_destroy;
    shampoo_xsyev_batched_buffer_fn xsyev_batched_buffer;
    shampoo_xsyev_batched_fn xsyev_batched;
} shampoo_cuda_libs;

/* dlopen()s the first loadable pair (cublas_paths[i], cusolver_paths[i]), a matched set of
 * one CUDA release, and resolves every routine. Returns 0, or -1 with a message naming the
 * library or symbol in err (errlen bytes). */
int shampoo_cuda_libs_load(shampoo_cuda_libs *libs, const char *const *cublas_paths,
                           const char *const *cusolver_paths, int npairs, char *err,
                           size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
