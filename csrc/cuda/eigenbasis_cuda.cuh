/* Internal interface of the eigenbasis kernels (eigenbasis_cuda.cu steers a call; the
 * warm-started QR step is eigenbasis_qr_cuda.cu). Not part of soap_cuda.h. */
#ifndef SHAMPOO_EIGENBASIS_CUDA_CUH
#define SHAMPOO_EIGENBASIS_CUDA_CUH

#include "matrix_root_cuda.cuh"
#include "soap_cuda.h"

namespace shampoo_qr {

/* A flag bit beside matrix_root_cuda.cuh's FLAG_*: the factor's previous basis is nonzero. */
enum { FLAG_WARM = 16 };

using shampoo_root::fetch;
using shampoo_root::matrix_grid;

/* Device bytes of the QR step's own scratch for the factors of this table (0 when none has
 * n >= 2); asks cuSOLVER for geqrf/orgqr buffer sizes (env->solver). */
template <typename real>
shampoo_status qr_workspace(const shampoo_cuda_env *env, const int64_t *table_host,
                            int64_t nblocks, size_t *bytes);

/* Sets FLAG_WARM in flags[f] of every active factor f whose `previous` has a nonzero entry. */
template <typename real>
shampoo_status launch_warm_scan(cudaStream_t stream, const int64_t *table,
                                const int64_t *table_host, int64_t nblocks,
                                const uint8_t *active, const real *previous, int32_t *flags);

/* soap.h's QR branch for one n x n factor f (n >= 2) from its nonzero previous basis into
 * out: up to max_iterations steps of Q <- qr(F Q).Q until the relative change is <= tolerance,
 * then the columns sorted by ascending Rayleigh quotient (stable). A non-finite entry of the
 * result sets FLAG_NONFINITE_ROOT in *flag. scratch: qr_workspace() bytes. Synchronises. */
template <typename real>
shampoo_status qr_basis(const shampoo_cuda_env *env, int64_t n, const real *f, const real *prev,
                        real *out, const shampoo_eigenbasis_config *cfg, void *scratch,
                        int32_t *flag);

} // namespace shampoo_qr

#endif
