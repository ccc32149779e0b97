/* Host-to-device uploads of the pointer-table passes' per-block tables (param_io_cuda.cu;
 * bodies in io_staging_cuda.cu). Internal: not part of param_io_cuda.h. */
#ifndef SHAMPOO_IO_STAGING_CUDA_CUH
#define SHAMPOO_IO_STAGING_CUDA_CUH

#include "cuda_common.cuh"

/* The `ntables` host tables of nblocks pointers each (a NULL table: all NULL) into dst
 * (device memory, ntables * nblocks pointers), on env's stream, without waiting for the
 * GPU: they are copied into a pinned staging buffer that is reused only once the copy's
 * event has completed, so the caller's arrays may go when this returns. */
shampoo_status shampoo_cuda_upload_tables(const shampoo_cuda_env *env, void **dst,
                                          const void *const *const *tables, int ntables,
                                          int64_t nblocks);

#endif
