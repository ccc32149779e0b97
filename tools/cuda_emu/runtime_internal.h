/* Internal to the emulated CUDA runtime (runtime_*.cpp, tools/cuda_emu/README.md): the state
 * its files share and the checks every API entry makes. Hidden: libshampoo_emu_cudart.so
 * exports only the CUDA API, emu::* and the emu_rt_* controls. */
#ifndef SHAMPOO_CUDA_EMU_RUNTIME_INTERNAL_H
#define SHAMPOO_CUDA_EMU_RUNTIME_INTERNAL_H

#include "cuda_runtime.h"

#include <atomic>
#include <cstdarg>
#include <cstdint>
#include <map>
#include <mutex>

#ifdef __SANITIZE_ADDRESS__
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

#define API EMU_API

#pragma GCC visibility push(hidden)
namespace emu_rt {

extern std::mutex g_mu; /* guards every g_ below (g_launches is atomic) */
extern int g_device_count;
extern unsigned g_max_grid_y, g_max_grid_z;
extern int g_no_kernel_image;
extern std::atomic<long> g_launches;

struct stream_rec {
    int device;
    unsigned flags;
};
extern std::map<void *, stream_rec> g_streams;

extern thread_local int t_device;
extern thread_local cudaError_t t_last;
/* The call under test on this host thread: its stream and device (emu_rt_begin_call). */
extern thread_local bool t_in_call;
extern thread_local void *t_call_stream;
extern thread_local int t_call_device;

/* A violation for the harness: the current call's list, or the global one outside calls. */
void violation_v(const char *fmt, va_list ap);
void violation(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Records e as this thread's last error (unless cudaSuccess) and returns it. */
cudaError_t fail(cudaError_t e);
/* An injected failure for `api` (emu_rt_fail), or cudaSuccess. */
cudaError_t injected(const char *api);
/* The sticky error (emu_rt_set_sticky), or cudaSuccess. */
cudaError_t sticky();
/* Validity of a stream on the current device, and the call-under-test check. */
cudaError_t check_stream(const char *what, void *s);
/* What every API function starts with: the sticky error, else an injected failure. */
cudaError_t api_entry(const char *name);

/* Runs block b of a launch (runtime_fiber.cpp): its CUDA threads one after another, or as
 * fibers when the kernel reaches __syncthreads (barriers). False when threads of the block
 * left the kernel while others waited at a barrier. */
bool run_block(const char *kernel, bool barriers, dim3 grid, dim3 block, uint64_t b,
               emu::thunk_fn fn, void *closure);

} // namespace emu_rt
#pragma GCC visibility pop

#endif
