/* CUDA emulator runtime (tools/cuda_emu/README.md): the state its files share, violation
 * reporting and failure injection, what the reference cuBLAS / cuSOLVER call back into, and
 * the emu_rt_* controls the test harness calls through ctypes. Every launch, copy and library
 * call checks that it uses the stream and device of the call under test (emu_rt_begin_call);
 * violations are collected for the harness (emu_rt_end_call). */
#include "runtime_internal.h"

#include <cstdio>
#include <string>
#include <vector>

namespace emu_rt {

std::mutex g_mu;
int g_device_count = 1;
unsigned g_max_grid_y = 65535, g_max_grid_z = 65535;
int g_no_kernel_image = 0;
std::atomic<long> g_launches{0};
std::map<void *, stream_rec> g_streams;

thread_local int t_device = 0;
thread_local cudaError_t t_last = cudaSuccess;
thread_local bool t_in_call = false;
thread_local void *t_call_stream = nullptr;
thread_local int t_call_device = 0;

namespace {

struct pending_failure {
    std::string api; /* "launch" or a runtime function name */
    long nth;        /* fails when this reaches 1 */
    cudaError_t error;
};
std::vector<pending_failure> g_failures;
cudaError_t g_sticky = cudaSuccess;
std::vector<std::string> g_violations; /* outside any begin/end call */
thread_local std::vector<std::string> t_violations;

/* Empties `list` into buf (its texts joined by newlines, cut to len) and returns its size. */
int take_violations(std::vector<std::string> &list, char *buf, size_t len)
{
    std::string all;
    for (auto &v : list)
        all += v + "\n";
    int n = (int)list.size();
    list.clear();
    if (buf != nullptr && len > 0)
        snprintf(buf, len, "%s", all.c_str());
    return n;
}

bool is_special_stream(void *s)
{
    return s == nullptr || s == (void *)cudaStreamLegacy || s == (void *)cudaStreamPerThread;
}

} // namespace

void violation_v(const char *fmt, va_list ap)
{
    char buf[768];
    vsnprintf(buf, sizeof buf, fmt, ap);
    if (t_in_call) {
        t_violations.push_back(buf);
    } else {
        std::lock_guard<std::mutex> lock(g_mu);
        g_violations.push_back(buf);
    }
}

void violation(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    violation_v(fmt, ap);
    va_end(ap);
}

cudaError_t fail(cudaError_t e)
{
    if (e != cudaSuccess)
        t_last = e;
    return e;
}

cudaError_t injected(const char *api)
{
    std::lock_guard<std::mutex> lock(g_mu);
    for (size_t i = 0; i < g_failures.size(); i++) {
        if (g_failures[i].api == api && --g_failures[i].nth <= 0) {
            cudaError_t e = g_failures[i].error;
            g_failures.erase(g_failures.begin() + (long)i);
            return e;
        }
    }
    return cudaSuccess;
}

cudaError_t sticky()
{
    std::lock_guard<std::mutex> lock(g_mu);
    return g_sticky;
}

cudaError_t check_stream(const char *what, void *s)
{
    if (!is_special_stream(s)) {
        std::lock_guard<std::mutex> lock(g_mu);
        auto it = g_streams.find(s);
        if (it == g_streams.end())
            return cudaErrorInvalidResourceHandle;
        if (it->second.device != t_device) {
            violation("%s: stream %p belongs to device %d but device %d is current", what, s,
                      it->second.device, t_device);
            return cudaErrorInvalidResourceHandle;
        }
    }
    if (t_in_call) {
        if (s != t_call_stream)
            violation("%s used stream %p, not the caller's stream %p", what, s, t_call_stream);
        if (t_device != t_call_device)
            violation("%s ran with device %d current, the call's buffers are on device %d",
                      what, t_device, t_call_device);
    }
    return cudaSuccess;
}

cudaError_t api_entry(const char *name)
{
    cudaError_t e = sticky();
    if (e == cudaSuccess)
        e = injected(name);
    return fail(e);
}

} // namespace emu_rt

using namespace emu_rt;

/* ---------------------------------------------------------------- for the reference libs */

API int emu_rt_check_stream(const char *what, void *stream)
{
    return check_stream(what, stream) == cudaSuccess ? 0 : -1;
}

API void emu_rt_violation(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    violation_v(fmt, ap);
    va_end(ap);
}

API void emu_rt_set_sticky(cudaError_t error)
{
    std::lock_guard<std::mutex> lock(g_mu);
    if (g_sticky == cudaSuccess)
        g_sticky = error;
}

/* ---------------------------------------------------------------- control (ctypes) */

/* Starts the call under test on this host thread: its stream and device. */
API void emu_rt_begin_call(uint64_t stream, int device)
{
    t_in_call = true;
    t_call_stream = (void *)(uintptr_t)stream;
    t_call_device = device;
    t_violations.clear();
}

/* Ends it: the number of violations, their text joined by newlines into buf. */
API int emu_rt_end_call(char *buf, size_t len)
{
    t_in_call = false;
    return take_violations(t_violations, buf, len);
}

/* Violations seen outside any call (and clears them). */
API int emu_rt_take_violations(char *buf, size_t len)
{
    std::lock_guard<std::mutex> lock(g_mu);
    return take_violations(g_violations, buf, len);
}

/* The nth next call of `api` ("launch", "cudaMemcpyAsync", ...) fails with `error`. */
API void emu_rt_fail(const char *api, long nth, int error)
{
    std::lock_guard<std::mutex> lock(g_mu);
    g_failures.push_back(pending_failure{api, nth, (cudaError_t)error});
}

/* Clears injected failures, the sticky error and this thread's last error. */
API void emu_rt_reset(void)
{
    std::lock_guard<std::mutex> lock(g_mu);
    g_failures.clear();
    g_sticky = cudaSuccess;
    g_no_kernel_image = 0;
    t_last = cudaSuccess;
}

API void emu_rt_set_device_count(int n)
{
    std::lock_guard<std::mutex> lock(g_mu);
    g_device_count = n;
}

API void emu_rt_set_grid_limits(unsigned max_y, unsigned max_z)
{
    std::lock_guard<std::mutex> lock(g_mu);
    g_max_grid_y = max_y;
    g_max_grid_z = max_z;
}

API void emu_rt_set_no_kernel_image(int on)
{
    std::lock_guard<std::mutex> lock(g_mu);
    g_no_kernel_image = on;
}

API long emu_rt_launch_count(void) { return g_launches.load(); }

API int emu_rt_current_device(void) { return t_device; }

API uint64_t emu_rt_stream_create(int device)
{
    int saved = t_device;
    t_device = device;
    cudaStream_t s = nullptr;
    cudaError_t e = cudaStreamCreateWithFlags(&s, 0);
    t_device = saved;
    return e == cudaSuccess ? (uint64_t)(uintptr_t)s : 0;
}

API int emu_rt_stream_destroy(uint64_t s) { return (int)cudaStreamDestroy((cudaStream_t)(uintptr_t)s); }
