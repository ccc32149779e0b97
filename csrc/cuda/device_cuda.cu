/* The CUDA runtime calls the binding needs (kept here so that the binding's C compiles
 * without CUDA headers): the current device, saved and restored around a call, and the
 * record of a call's first failure (shampoo_cuda.h). */
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

#include "cuda_common.cuh"

#ifndef SHAMPOO_CUDA_ARCHS
#define SHAMPOO_CUDA_ARCHS "unknown"
#endif

namespace {

/* One per thread: a root inverse runs with the GIL released, so two calls may be in flight
 * on two threads; each reads back its own failure. */
thread_local char failure_text[768];
thread_local bool failure_set = false;

} // namespace

extern "C" const char *shampoo_cuda_built_archs(void)
{
    return SHAMPOO_CUDA_ARCHS;
}

extern "C" void shampoo_cuda_clear_failure(void)
{
    failure_set = false;
    failure_text[0] = '\0';
}

extern "C" const char *shampoo_cuda_failure(void)
{
    return failure_set ? failure_text : NULL;
}

/* What "no kernel image" means for the user: which GPU, which architectures were built. */
static void no_image_hint(char *buf, size_t len)
{
    int device = -1, major = 0, minor = 0;
    cudaDeviceProp prop;
    const char *name = "unknown GPU";
    if (cudaGetDevice(&device) == cudaSuccess) {
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
        if (cudaGetDeviceProperties(&prop, device) == cudaSuccess)
            name = prop.name;
    }
    snprintf(buf, len,
             "; the extension has no kernel image for GPU %d (%s, sm_%d%d): it was built for "
             "SM architectures %s; rebuild with SHAMPOO_CUDA_ARCHS=\"%d%d\" (pip install "
             "--no-build-isolation -e .)",
             device, name, major, minor, SHAMPOO_CUDA_ARCHS, major, minor);
}

extern "C" void shampoo_cuda_record_failure(shampoo_cuda_lib lib, const char *call, int code,
                                            const char *file, int line)
{
    if (failure_set)
        return; /* the first failure is the cause; later ones are its consequences */
    failure_set = true;
    const char *name, *text = "";
    if (lib == SHAMPOO_LIB_CUDA) {
        name = cudaGetErrorName((cudaError_t)code);
        text = cudaGetErrorString((cudaError_t)code);
    } else if (lib == SHAMPOO_LIB_CUBLAS) {
        name = shampoo_cublas_status_name(code);
    } else {
        name = shampoo_cusolver_status_name(code);
    }
    int n = snprintf(failure_text, sizeof failure_text, "%s returned %d (%s%s%s) at %s:%d",
                     call, code, name, text[0] ? ": " : "", text, file, line);
    if (lib == SHAMPOO_LIB_CUDA && code == (int)cudaErrorNoKernelImageForDevice && n > 0 &&
        (size_t)n < sizeof failure_text)
        no_image_hint(failure_text + n, sizeof failure_text - (size_t)n);
}

extern "C" int shampoo_cuda_device_enter(int device, int *previous)
{
    *previous = -1;
    cudaError_t e = cudaGetDevice(previous);
    if (e != cudaSuccess) {
        shampoo_cuda_record_failure(SHAMPOO_LIB_CUDA, "cudaGetDevice", (int)e, __FILE__,
                                    __LINE__);
        *previous = -1;
        return -1;
    }
    if (*previous == device)
        return 0;
    e = cudaSetDevice(device);
    if (e != cudaSuccess) {
        shampoo_cuda_record_failure(SHAMPOO_LIB_CUDA, "cudaSetDevice", (int)e, __FILE__,
                                    __LINE__);
        return -1;
    }
    return 0;
}

extern "C" void shampoo_cuda_device_leave(int device, int previous)
{
    if (previous >= 0 && previous != device)
        cudaSetDevice(previous); /* torch's current device, as the caller left it */
}
