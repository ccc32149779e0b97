/* Eigenvalue-corrected Shampoo (SOAP) on the GPU: the operations of core/soap.h on device
 * buffers, with shampoo_cuda.h's conventions (stream, host and device tables, batch plan,
 * caller-owned workspace). Bodies: soap_cuda.cu (direction), eigenbasis_cuda.cu and
 * eigenbasis_qr_cuda.cu (eigenbases). */
#ifndef SHAMPOO_SOAP_CUDA_H
#define SHAMPOO_SOAP_CUDA_H

#include "../core/soap.h"
#include "shampoo_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

/* As shampoo_soap_direction_*: the rotations are one cuBLAS batched GEMM per shape group and
 * dimension (as shampoo_cuda_precondition_*), the second moment and the scaling one fused
 * elementwise kernel each. Blocks of `out` that the CPU kernel leaves alone (inactive
 * blocks) are left bitwise alone. The host cannot read `active`, so a ROOT below 1 (or a
 * block beyond cuBLAS's int sizes) is refused in any row, active or not, before any launch.
 * Needs shampoo_cuda_soap_direction_workspace() bytes. */
size_t shampoo_cuda_soap_direction_workspace(const int64_t *table_host, int64_t nblocks,
                                             const int64_t *plan_host, int real_bytes);
shampoo_status shampoo_cuda_soap_direction_f32(
    const shampoo_cuda_env *env, float *out, const float *grads, const float *moment_grads,
    const float *bases, float *corrected, const int64_t *table, const int64_t *table_host,
    int64_t nblocks, const int64_t *plan, const int64_t *plan_host, const uint8_t *active,
    const shampoo_soap_params *p);
shampoo_status shampoo_cuda_soap_direction_f64(
    const shampoo_cuda_env *env, double *out, const double *grads, const double *moment_grads,
    const double *bases, double *corrected, const int64_t *table, const int64_t *table_host,
    int64_t nblocks, const int64_t *plan, const int64_t *plan_host, const uint8_t *active,
    const shampoo_soap_params *p);

/* As shampoo_eigenbasis_*: eigh's eigenvectors come from the inverse roots' eigensolver path
 * (eigensolver_cuda.cuh: syevjBatched for n <= 32, XsyevBatched or syevd above, the float64
 * retry of failed float32 factors); QR's warm-started step is cuBLAS GEMMs and cuSOLVER
 * geqrf + orgqr, one factor at a time (eigenbasis_qr_cuda.cu). `previous` (device, factor
 * layout) is required for QR, unused by eigh (may be NULL). Synchronises the stream;
 * status_out is host memory, is_diagonal device memory. Needs
 * shampoo_cuda_eigenbasis_workspace() bytes (asks cuSOLVER for buffer sizes: env->solver). */
shampoo_status shampoo_cuda_eigenbasis_workspace(const shampoo_cuda_env *env,
                                                 const int64_t *table_host, int64_t nblocks,
                                                 int real_bytes, int method, size_t *bytes);
shampoo_status shampoo_cuda_eigenbasis_f32(const shampoo_cuda_env *env, float *out,
                                           const float *factors, const float *previous,
                                           const int64_t *table, const int64_t *table_host,
                                           int64_t nblocks, const uint8_t *active,
                                           const shampoo_eigenbasis_config *cfg,
                                           uint8_t *is_diagonal, int32_t *status_out);
shampoo_status shampoo_cuda_eigenbasis_f64(const shampoo_cuda_env *env, double *out,
                                           const double *factors, const double *previous,
                                           const int64_t *table, const int64_t *table_host,
                                           int64_t nblocks, const uint8_t *active,
                                           const shampoo_eigenbasis_config *cfg,
                                           uint8_t *is_diagonal, int32_t *status_out);

#ifdef __cplusplus
}
#endif

#endif
