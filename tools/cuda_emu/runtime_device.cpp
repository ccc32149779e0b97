/* CUDA emulator runtime (tools/cuda_emu/README.md): error codes and texts, the last error,
 * devices (count, current, properties and attributes: an arch-90 part with NVIDIA's launch
 * limits, grid y/z as emu_rt_set_grid_limits says) and kernel attributes. */
#include "runtime_internal.h"

#include <cstdio>
#include <cstring>

using namespace emu_rt;

namespace {
const int g_arch = 90;
}

static const char *error_name(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNoKernelImageForDevice: return "cudaErrorNoKernelImageForDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaErrorUnknown";
    }
}

/* NVIDIA's texts (cudaGetErrorString) for the codes above. */
static const char *error_text(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNoKernelImageForDevice:
        return "no kernel image is available for execution on the device";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
    }
}

API const char *cudaGetErrorName(cudaError_t e) { return error_name(e); }
API const char *cudaGetErrorString(cudaError_t e) { return error_text(e); }

API cudaError_t cudaGetLastError(void)
{
    cudaError_t s = sticky();
    cudaError_t e = t_last;
    t_last = cudaSuccess;
    return s != cudaSuccess ? s : e;
}

API cudaError_t cudaPeekAtLastError(void)
{
    cudaError_t s = sticky();
    return s != cudaSuccess ? s : t_last;
}

API cudaError_t cudaGetDevice(int *device)
{
    if (device == nullptr)
        return fail(cudaErrorInvalidValue);
    *device = t_device;
    return cudaSuccess;
}

API cudaError_t cudaSetDevice(int device)
{
    cudaError_t e = api_entry("cudaSetDevice");
    if (e != cudaSuccess)
        return e;
    std::lock_guard<std::mutex> lock(g_mu);
    if (device < 0 || device >= g_device_count)
        return fail(cudaErrorInvalidDevice);
    t_device = device;
    return cudaSuccess;
}

API cudaError_t cudaGetDeviceCount(int *count)
{
    if (count == nullptr)
        return fail(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> lock(g_mu);
    *count = g_device_count;
    return cudaSuccess;
}

static bool device_ok(int d)
{
    std::lock_guard<std::mutex> lock(g_mu);
    return d >= 0 && d < g_device_count;
}

API cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int device)
{
    if (p == nullptr)
        return fail(cudaErrorInvalidValue);
    if (!device_ok(device))
        return fail(cudaErrorInvalidDevice);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "CUDA emulator (tools/cuda_emu), device %d", device);
    p->totalGlobalMem = (size_t)16 << 30;
    p->sharedMemPerBlock = 48 * 1024;
    p->sharedMemPerBlockOptin = 48 * 1024;
    p->regsPerBlock = 65536;
    p->warpSize = 32;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsDim[0] = 1024;
    p->maxThreadsDim[1] = 1024;
    p->maxThreadsDim[2] = 64;
    std::lock_guard<std::mutex> lock(g_mu);
    p->maxGridSize[0] = 2147483647;
    p->maxGridSize[1] = (int)g_max_grid_y;
    p->maxGridSize[2] = (int)g_max_grid_z;
    p->major = g_arch / 10;
    p->minor = g_arch % 10;
    p->multiProcessorCount = 2;
    p->pciBusID = device;
    return cudaSuccess;
}

API cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device)
{
    cudaDeviceProp p;
    if (value == nullptr)
        return fail(cudaErrorInvalidValue);
    cudaError_t e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess)
        return e;
    switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = p.maxThreadsPerBlock; break;
    case cudaDevAttrMaxBlockDimX: *value = p.maxThreadsDim[0]; break;
    case cudaDevAttrMaxBlockDimY: *value = p.maxThreadsDim[1]; break;
    case cudaDevAttrMaxBlockDimZ: *value = p.maxThreadsDim[2]; break;
    case cudaDevAttrMaxGridDimX: *value = p.maxGridSize[0]; break;
    case cudaDevAttrMaxGridDimY: *value = p.maxGridSize[1]; break;
    case cudaDevAttrMaxGridDimZ: *value = p.maxGridSize[2]; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = (int)p.sharedMemPerBlock; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = (int)p.sharedMemPerBlockOptin; break;
    case cudaDevAttrWarpSize: *value = p.warpSize; break;
    case cudaDevAttrMultiProcessorCount: *value = p.multiProcessorCount; break;
    case cudaDevAttrComputeCapabilityMajor: *value = p.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = p.minor; break;
    default: return fail(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}

API cudaError_t emu_func_get_attributes(cudaFuncAttributes *attr, const void *func)
{
    if (attr == nullptr || func == nullptr)
        return fail(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> lock(g_mu);
    if (g_no_kernel_image)
        return fail(cudaErrorNoKernelImageForDevice);
    memset(attr, 0, sizeof *attr);
    attr->maxThreadsPerBlock = 1024;
    attr->numRegs = 32;
    attr->ptxVersion = g_arch;
    attr->binaryVersion = g_arch;
    attr->maxDynamicSharedSizeBytes = 48 * 1024;
    return cudaSuccess;
}

API cudaError_t cudaDeviceSynchronize(void)
{
    if (t_in_call)
        violation("cudaDeviceSynchronize inside a call on stream %p (waits for every stream)",
                  t_call_stream);
    return api_entry("cudaDeviceSynchronize");
}
