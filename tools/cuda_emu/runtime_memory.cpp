/* CUDA emulator runtime (tools/cuda_emu/README.md): memory (host allocations stand in for
 * device ones; copies and sets run at once), streams and events. The calls that take a
 * stream check it against the current device and the call under test. */
#include "runtime_internal.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <set>

using namespace emu_rt;

namespace {

struct event_rec {
    unsigned flags;
    bool recorded;
    int device;
    std::chrono::steady_clock::time_point when;
};
std::map<void *, event_rec> g_events;
std::set<void *> g_allocations;

} // namespace

API cudaError_t cudaMalloc(void **ptr, size_t bytes)
{
    cudaError_t e = api_entry("cudaMalloc");
    if (e != cudaSuccess)
        return e;
    if (ptr == nullptr)
        return fail(cudaErrorInvalidValue);
    void *p = aligned_alloc(256, ((bytes ? bytes : 1) + 255) / 256 * 256);
    if (p == nullptr)
        return fail(cudaErrorMemoryAllocation);
    std::lock_guard<std::mutex> lock(g_mu);
    g_allocations.insert(p);
    *ptr = p;
    return cudaSuccess;
}

API cudaError_t cudaFree(void *ptr)
{
    if (ptr == nullptr)
        return cudaSuccess;
    std::lock_guard<std::mutex> lock(g_mu);
    if (g_allocations.erase(ptr) == 0)
        return fail(cudaErrorInvalidValue);
    free(ptr);
    return cudaSuccess;
}

API cudaError_t cudaMallocHost(void **ptr, size_t bytes) { return cudaMalloc(ptr, bytes); }
API cudaError_t cudaFreeHost(void *ptr) { return cudaFree(ptr); }

static cudaError_t copy(const char *name, void *dst, const void *src, size_t bytes, int kind,
                        void *stream)
{
    cudaError_t e = api_entry(name);
    if (e != cudaSuccess)
        return e;
    if ((e = check_stream(name, stream)) != cudaSuccess)
        return fail(e);
    if (kind < 0 || kind > 4)
        return fail(cudaErrorInvalidMemcpyDirection);
    if (bytes > 0 && (dst == nullptr || src == nullptr))
        return fail(cudaErrorInvalidValue);
    if (bytes > 0)
        memmove(dst, src, bytes);
    return cudaSuccess;
}

API cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind)
{
    return copy("cudaMemcpy", dst, src, bytes, kind, nullptr);
}

API cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind,
                                cudaStream_t stream)
{
    return copy("cudaMemcpyAsync", dst, src, bytes, kind, stream);
}

static cudaError_t set(const char *name, void *dst, int value, size_t bytes, void *stream)
{
    cudaError_t e = api_entry(name);
    if (e != cudaSuccess)
        return e;
    if ((e = check_stream(name, stream)) != cudaSuccess)
        return fail(e);
    if (bytes > 0 && dst == nullptr)
        return fail(cudaErrorInvalidValue);
    if (bytes > 0)
        memset(dst, value, bytes);
    return cudaSuccess;
}

API cudaError_t cudaMemset(void *dst, int value, size_t bytes)
{
    return set("cudaMemset", dst, value, bytes, nullptr);
}

API cudaError_t cudaMemsetAsync(void *dst, int value, size_t bytes, cudaStream_t stream)
{
    return set("cudaMemsetAsync", dst, value, bytes, stream);
}

API cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned flags)
{
    cudaError_t e = api_entry("cudaStreamCreate");
    if (e != cudaSuccess)
        return e;
    if (stream == nullptr || flags > 1)
        return fail(cudaErrorInvalidValue);
    void *s = malloc(16);
    std::lock_guard<std::mutex> lock(g_mu);
    g_streams[s] = stream_rec{t_device, flags};
    *stream = (cudaStream_t)s;
    return cudaSuccess;
}

API cudaError_t cudaStreamCreate(cudaStream_t *stream)
{
    return cudaStreamCreateWithFlags(stream, 0);
}

API cudaError_t cudaStreamDestroy(cudaStream_t stream)
{
    std::lock_guard<std::mutex> lock(g_mu);
    if (g_streams.erase((void *)stream) == 0)
        return fail(cudaErrorInvalidResourceHandle);
    free((void *)stream);
    return cudaSuccess;
}

API cudaError_t cudaStreamSynchronize(cudaStream_t stream)
{
    cudaError_t e = api_entry("cudaStreamSynchronize");
    if (e != cudaSuccess)
        return e;
    return fail(check_stream("cudaStreamSynchronize", stream));
}

API cudaError_t cudaStreamQuery(cudaStream_t stream)
{
    cudaError_t e = api_entry("cudaStreamQuery");
    if (e != cudaSuccess)
        return e;
    return fail(check_stream("cudaStreamQuery", stream));
}

API cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned flags)
{
    (void)flags;
    cudaError_t e = api_entry("cudaStreamWaitEvent");
    if (e != cudaSuccess)
        return e;
    if ((e = check_stream("cudaStreamWaitEvent", stream)) != cudaSuccess)
        return fail(e);
    std::lock_guard<std::mutex> lock(g_mu);
    return g_events.count((void *)event) ? cudaSuccess : fail(cudaErrorInvalidResourceHandle);
}

API cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned flags)
{
    if (event == nullptr || flags > 7)
        return fail(cudaErrorInvalidValue);
    void *ev = malloc(16);
    std::lock_guard<std::mutex> lock(g_mu);
    g_events[ev] = event_rec{flags, false, t_device, {}};
    *event = (cudaEvent_t)ev;
    return cudaSuccess;
}

API cudaError_t cudaEventCreate(cudaEvent_t *event) { return cudaEventCreateWithFlags(event, 0); }

API cudaError_t cudaEventDestroy(cudaEvent_t event)
{
    std::lock_guard<std::mutex> lock(g_mu);
    if (g_events.erase((void *)event) == 0)
        return fail(cudaErrorInvalidResourceHandle);
    free((void *)event);
    return cudaSuccess;
}

API cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream)
{
    cudaError_t e = api_entry("cudaEventRecord");
    if (e != cudaSuccess)
        return e;
    if ((e = check_stream("cudaEventRecord", stream)) != cudaSuccess)
        return fail(e);
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_events.find((void *)event);
    if (it == g_events.end())
        return fail(cudaErrorInvalidResourceHandle);
    it->second.recorded = true;
    it->second.when = std::chrono::steady_clock::now();
    return cudaSuccess;
}

API cudaError_t cudaEventQuery(cudaEvent_t event)
{
    std::lock_guard<std::mutex> lock(g_mu);
    return g_events.count((void *)event) ? cudaSuccess : fail(cudaErrorInvalidResourceHandle);
}

API cudaError_t cudaEventSynchronize(cudaEvent_t event) { return cudaEventQuery(event); }

API cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end)
{
    std::lock_guard<std::mutex> lock(g_mu);
    auto a = g_events.find((void *)start), b = g_events.find((void *)end);
    if (ms == nullptr)
        return fail(cudaErrorInvalidValue);
    if (a == g_events.end() || b == g_events.end() ||
        ((a->second.flags | b->second.flags) & cudaEventDisableTiming))
        return fail(cudaErrorInvalidResourceHandle);
    if (!a->second.recorded || !b->second.recorded)
        return fail(cudaErrorInvalidResourceHandle);
    *ms = std::chrono::duration<float, std::milli>(b->second.when - a->second.when).count();
    return cudaSuccess;
}
