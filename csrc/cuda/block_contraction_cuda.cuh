/* Internal interface of the batched block contraction that preconditioning
 * (precondition_cuda.cu) and the SOAP rotations (soap_cuda.cu) share: each block of order d
 * contracted with its d matrices in turn, T <- T^T op(Q_k) (the CPU's GEMM with the
 * transposed operand), each shape group and dimension one cuBLAS batched GEMM whose pointer
 * arrays one kernel writes from the batch plan (core/batch_plan.h). Intermediates ping-pong
 * between two block-layout scratch buffers. Not part of shampoo_cuda.h. */
#ifndef SHAMPOO_BLOCK_CONTRACTION_CUDA_CUH
#define SHAMPOO_BLOCK_CONTRACTION_CUDA_CUH

#include "cuda_common.cuh"

namespace shampoo_contract {

/* Bytes of one contraction's Q, T and output pointer arrays (slot k * nitems + j for item j
 * and dimension k), aligned. */
size_t pointer_bytes(int64_t nitems);

/* One contraction's operands. has: per block, nonzero when it is contracted into dst
 * (NULL: every active block); any other block's last result goes to a free intermediate, so
 * its dst is never written. */
template <typename real> struct contraction {
    const shampoo_cuda_env *env;
    const int64_t *plan, *plan_host, *table;
    const uint8_t *active;
    const int32_t *has;
    const real *mats; /* the blocks' matrices, at each block's factor offset */
    real *ping, *pong;
};

/* dst <- src contracted with every dimension's matrix (transposed where `transpose`), for
 * the active blocks that `has`; `pointers` holds pointer_bytes(plan_host[1]) of workspace.
 * cuBLAS must be bound (shampoo_blas_bind) when the plan has items. */
template <typename real>
shampoo_status contract(const contraction<real> &c, const real *src, real *dst, char *pointers,
                        bool transpose);

} // namespace shampoo_contract

#endif
