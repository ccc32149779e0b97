/* CUDA emulator (tools/cuda_emu/README.md): the CUDA runtime API and kernel language that
 * csrc/cuda uses, for compiling the unmodified .cu sources as host C++. Kernels run on the
 * emulator's thread pool (runtime_launch.cpp); launches reach it through
 * emu::cfg(...).run(...), which build.py writes in place of every <<<...>>>. Host memory
 * stands in for device memory.
 * Enum values are NVIDIA's (driver_types.h), so status codes read as on a GPU. */
#ifndef SHAMPOO_CUDA_EMU_RUNTIME_H
#define SHAMPOO_CUDA_EMU_RUNTIME_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
#include <tuple>
#include <type_traits>
#include <utility>
#endif

#define EMU_API extern "C" __attribute__((visibility("default")))

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint3 {
    unsigned x, y, z;
};

typedef struct CUstream_st *cudaStream_t;
typedef struct CUevent_st *cudaEvent_t;

enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorInvalidDeviceFunction = 98,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorNoKernelImageForDevice = 209,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorLaunchFailure = 719,
    cudaErrorUnknown = 999
};
typedef enum cudaError cudaError_t;

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
};

enum cudaDeviceAttr {
    cudaDevAttrMaxThreadsPerBlock = 1,
    cudaDevAttrMaxBlockDimX = 2,
    cudaDevAttrMaxBlockDimY = 3,
    cudaDevAttrMaxBlockDimZ = 4,
    cudaDevAttrMaxGridDimX = 5,
    cudaDevAttrMaxGridDimY = 6,
    cudaDevAttrMaxGridDimZ = 7,
    cudaDevAttrMaxSharedMemoryPerBlock = 8,
    cudaDevAttrWarpSize = 10,
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76,
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};

struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    int regsPerBlock;
    int warpSize;
    int maxThreadsPerBlock;
    int maxThreadsDim[3];
    int maxGridSize[3];
    int major;
    int minor;
    int multiProcessorCount;
    size_t sharedMemPerBlockOptin;
    int pciBusID;
    int pciDeviceID;
};

struct cudaFuncAttributes {
    size_t sharedSizeBytes;
    size_t constSizeBytes;
    size_t localSizeBytes;
    int maxThreadsPerBlock;
    int numRegs;
    int ptxVersion;
    int binaryVersion;
    int maxDynamicSharedSizeBytes;
};

#define cudaStreamLegacy ((cudaStream_t)0x1)
#define cudaStreamPerThread ((cudaStream_t)0x2)
#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
#define cudaEventDefault 0x00
#define cudaEventBlockingSync 0x01
#define cudaEventDisableTiming 0x02

#ifdef __cplusplus
extern "C" {
#endif
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char *cudaGetErrorName(cudaError_t error);
const char *cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetDevice(int *device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *prop, int device);
cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaMalloc(void **ptr, size_t bytes);
cudaError_t cudaFree(void *ptr);
cudaError_t cudaMallocHost(void **ptr, size_t bytes);
cudaError_t cudaFreeHost(void *ptr);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind,
                            cudaStream_t stream);
cudaError_t cudaMemset(void *dst, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void *dst, int value, size_t bytes, cudaStream_t stream);
cudaError_t cudaStreamCreate(cudaStream_t *stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaStreamQuery(cudaStream_t stream);
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned flags);
cudaError_t cudaEventCreate(cudaEvent_t *event);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream);
cudaError_t cudaEventQuery(cudaEvent_t event);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t emu_func_get_attributes(struct cudaFuncAttributes *attr, const void *func);
/* For the reference libraries: checks that a library call uses the current call's stream
 * and device (records a violation otherwise); returns 0 when the stream handle is valid. */
int emu_rt_check_stream(const char *what, void *stream);
/* Records a violation (a message the test harness turns into a failure). */
void emu_rt_violation(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Makes the context's error sticky (as a faulting kernel does on a GPU). */
void emu_rt_set_sticky(cudaError_t error);
#ifdef __cplusplus
}

template <class T> static inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *attr, T *func)
{
    return emu_func_get_attributes(attr, (const void *)func);
}
template <class T>
static inline cudaError_t cudaMalloc(T **ptr, size_t bytes)
{
    return cudaMalloc((void **)ptr, bytes);
}
#endif

/* ---- the kernel language ------------------------------------------------------------ */
#ifdef __cplusplus
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
/* One copy per host thread: a block's CUDA threads all run on one host thread, and blocks
 * that share a host thread run one after another. */
#define __shared__ static thread_local

namespace emu {

struct thread_ctx {
    uint3 thread_idx, block_idx;
    dim3 block_dim, grid_dim;
};
/* The CUDA thread running on this host thread. */
const thread_ctx &cur();
void sync_threads();
int sync_threads_reduce(int kind, int predicate); /* 0 or, 1 and, 2 count */
void note_shared(size_t bytes);

typedef void (*thunk_fn)(void *closure);
cudaError_t launch(const char *file, int line, const char *kernel, bool barriers, dim3 grid,
                   dim3 block, size_t shmem, cudaStream_t stream, thunk_fn fn, void *closure);

/* One launch configuration; run() converts the arguments to the kernel's parameter types
 * once, on the host, as a launch does, and runs every CUDA thread of the grid on them. */
struct launch_cfg {
    const char *file;
    int line;
    dim3 grid, block;
    size_t shmem;
    cudaStream_t stream;

    template <class... P, class... A>
    void run(const char *kernel, bool barriers, void (*k)(P...), A &&...args) const
    {
        struct closure {
            void (*k)(P...);
            std::tuple<std::decay_t<P>...> args;
        } c{k, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
        launch(file, line, kernel, barriers, grid, block, shmem, stream,
               [](void *p) {
                   closure *cl = (closure *)p;
                   std::apply(cl->k, cl->args);
               },
               &c);
    }
};

static inline launch_cfg cfg(const char *file, int line, dim3 grid, dim3 block,
                             size_t shmem = 0, cudaStream_t stream = 0)
{
    return launch_cfg{file, line, grid, block, shmem, stream};
}

} // namespace emu

#define threadIdx (::emu::cur().thread_idx)
#define blockIdx (::emu::cur().block_idx)
#define blockDim (::emu::cur().block_dim)
#define gridDim (::emu::cur().grid_dim)

static inline void __syncthreads(void) { ::emu::sync_threads(); }
static inline int __syncthreads_or(int p) { return ::emu::sync_threads_reduce(0, p); }
static inline int __syncthreads_and(int p) { return ::emu::sync_threads_reduce(1, p); }
static inline int __syncthreads_count(int p) { return ::emu::sync_threads_reduce(2, p); }
static inline void __threadfence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* Atomics: real ones, since blocks run on several host threads. */
#define EMU_ATOMIC_INT(T)                                                                     \
    static inline T atomicAdd(T *p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); } \
    static inline T atomicSub(T *p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); } \
    static inline T atomicOr(T *p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }   \
    static inline T atomicAnd(T *p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); } \
    static inline T atomicXor(T *p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); } \
    static inline T atomicExch(T *p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); } \
    static inline T atomicCAS(T *p, T cmp, T v)                                               \
    {                                                                                         \
        __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);   \
        return cmp;                                                                           \
    }                                                                                         \
    static inline T atomicMin(T *p, T v)                                                      \
    {                                                                                         \
        T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                         \
        while (v < old &&                                                                     \
               !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) \
            ;                                                                                 \
        return old;                                                                           \
    }                                                                                         \
    static inline T atomicMax(T *p, T v)                                                      \
    {                                                                                         \
        T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                         \
        while (v > old &&                                                                     \
               !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) \
            ;                                                                                 \
        return old;                                                                           \
    }
EMU_ATOMIC_INT(int)
EMU_ATOMIC_INT(unsigned)
EMU_ATOMIC_INT(long long)
EMU_ATOMIC_INT(unsigned long long)
#undef EMU_ATOMIC_INT

template <class T, class B> static inline T emu_atomic_add_real(T *p, T v)
{
    static_assert(sizeof(T) == sizeof(B), "bit width");
    B *bp = (B *)p, old = __atomic_load_n(bp, __ATOMIC_SEQ_CST), next;
    T x;
    do {
        __builtin_memcpy(&x, &old, sizeof x);
        x = x + v;
        __builtin_memcpy(&next, &x, sizeof x);
    } while (!__atomic_compare_exchange_n(bp, &old, next, true, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    __builtin_memcpy(&x, &old, sizeof x);
    return x;
}
static inline float atomicAdd(float *p, float v) { return emu_atomic_add_real<float, uint32_t>(p, v); }
static inline double atomicAdd(double *p, double v) { return emu_atomic_add_real<double, uint64_t>(p, v); }
#endif /* __cplusplus */

#endif
