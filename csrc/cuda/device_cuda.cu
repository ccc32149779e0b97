/* The few CUDA runtime calls the binding needs, kept here so that the binding's C compiles
 * without CUDA headers. */
#include <cuda_runtime.h>

#include "shampoo_cuda.h"

extern "C" int shampoo_cuda_set_device(int device)
{
    return cudaSetDevice(device) == cudaSuccess ? 0 : -1;
}

extern "C" const char *shampoo_cuda_last_error(void)
{
    return cudaGetErrorString(cudaGetLastError());
}
