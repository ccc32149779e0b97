/* Shared by the reference cuBLAS / cuSOLVER (ref_blas.cpp, ref_solver.cpp): failure
 * injection ("fail the nth next call of routine R with status S", also from the environment
 * variable SHAMPOO_CUDA_EMU_FAIL="R:nth:S,...") and the handle checks both libraries make. */
#ifndef SHAMPOO_CUDA_EMU_REF_COMMON_H
#define SHAMPOO_CUDA_EMU_REF_COMMON_H

#include "cuda_runtime.h"

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace ref {

struct injection {
    std::string routine;
    long nth;
    int status;
};

struct injector {
    std::mutex mu;
    std::vector<injection> pending;
    bool env_read = false;

    /* Entries of SHAMPOO_CUDA_EMU_FAIL whose routine starts with `prefix`. */
    void read_env(const char *prefix)
    {
        if (env_read)
            return;
        env_read = true;
        const char *e = getenv("SHAMPOO_CUDA_EMU_FAIL");
        if (e == nullptr)
            return;
        std::string all(e);
        size_t at = 0;
        while (at < all.size()) {
            size_t end = all.find(',', at);
            std::string item = all.substr(at, end == std::string::npos ? std::string::npos : end - at);
            at = end == std::string::npos ? all.size() : end + 1;
            char name[128];
            long nth;
            int status;
            if (sscanf(item.c_str(), "%127[^:]:%ld:%d", name, &nth, &status) == 3 &&
                strncmp(name, prefix, strlen(prefix)) == 0)
                pending.push_back(injection{name, nth, status});
        }
    }

    /* The injected status for this call of `routine`, or 0. */
    int take(const char *prefix, const char *routine)
    {
        std::lock_guard<std::mutex> lock(mu);
        read_env(prefix);
        for (size_t i = 0; i < pending.size(); i++)
            if (pending[i].routine == routine && --pending[i].nth <= 0) {
                int s = pending[i].status;
                pending.erase(pending.begin() + (long)i);
                return s;
            }
        return 0;
    }

    void add(const char *routine, long nth, int status)
    {
        std::lock_guard<std::mutex> lock(mu);
        pending.push_back(injection{routine, nth, status});
    }

    void clear()
    {
        std::lock_guard<std::mutex> lock(mu);
        pending.clear();
        env_read = true;
    }
};

/* The current host thread's id, for "one handle used by two threads" checks. */
static inline unsigned long self_id()
{
    static thread_local char marker;
    return (unsigned long)(uintptr_t)&marker;
}

/* What a cuBLAS or cuSOLVER handle holds that both libraries check alike: its library's magic
 * number while live, the device it was created on, its stream, the host thread that bound
 * that stream, and how many host threads are inside it. */
struct handle_base {
    unsigned magic = 0;
    int device = 0;
    void *stream = nullptr;
    unsigned long bound_by = 0;
    std::atomic<int> busy{0};
};

/* The handle entry points alike in both libraries, for a handle type H deriving from
 * handle_base with its library's name H::LIBRARY, H::MAGIC and statuses H::NOT_INITIALIZED
 * and H::INVALID_VALUE; each library defines check_handle(H *, const char *routine).
 * live: h is a handle of H's library that has not been destroyed. */
template <typename H> bool live(const H *h) { return h != nullptr && h->magic == H::MAGIC; }

/* cu*Create: a new handle on the current device, bound to the calling host thread. */
template <typename H> int create_handle(void **out)
{
    if (out == nullptr)
        return H::INVALID_VALUE;
    H *h = new H();
    h->magic = H::MAGIC;
    cudaGetDevice(&h->device);
    h->bound_by = self_id();
    *out = h;
    return 0;
}

/* cu*Destroy (the magic is cleared, so a later use of the handle reads as not initialised). */
template <typename H> int destroy_handle(void *hv)
{
    H *h = (H *)hv;
    if (!live(h))
        return H::NOT_INITIALIZED;
    h->magic = 0;
    delete h;
    return 0;
}

/* cu*SetStream: the stream, bound by the calling host thread; then H's own on_set_stream(). */
template <typename H> int set_handle_stream(void *hv, void *stream)
{
    H *h = (H *)hv;
    if (!live(h))
        return H::NOT_INITIALIZED;
    h->stream = stream;
    h->bound_by = self_id();
    h->on_set_stream();
    return 0;
}

/* cu*GetStream. */
template <typename H> int handle_stream(void *hv, void **stream)
{
    H *h = (H *)hv;
    if (!live(h))
        return H::NOT_INITIALIZED;
    if (stream == nullptr)
        return H::INVALID_VALUE;
    *stream = h->stream;
    return 0;
}

/* Holds a handle in use by this host thread from enter() until the routine returns: two host
 * threads inside one handle at once is a violation. */
struct use {
    handle_base *h = nullptr;
    use() = default;
    use(const use &) = delete;
    use &operator=(const use &) = delete;
    void enter(handle_base *hh, const char *library, const char *routine)
    {
        h = hh;
        if (h->busy.fetch_add(1) != 0)
            emu_rt_violation("%s: %s handle %p used by two host threads at once", routine,
                             library, (void *)h);
    }
    ~use()
    {
        if (h != nullptr)
            h->busy.fetch_sub(1);
    }
};

/* A computing routine's entry checks, in order: an injected failure (`injected`: the status
 * to fail with, or 0), a dead handle, then the library's check_handle(h, routine); status is
 * 0 when the routine goes on. From check_handle on, the handle is held in use until the
 * routine returns. */
template <typename H> struct call : use {
    int status;
    call(int injected, H *h, const char *routine) : status(injected)
    {
        if (status == 0 && !live(h))
            status = H::NOT_INITIALIZED;
        if (status == 0) {
            enter(h, H::LIBRARY, routine);
            status = check_handle(h, routine);
        }
    }
};

/* What every computing routine checks of a live handle: created on the current device and
 * bound to its stream by this host thread (violations otherwise), and that stream valid on
 * the current device (false: the routine fails with EXECUTION_FAILED). */
static inline bool bound_here(const handle_base *h, const char *routine)
{
    int dev = -1;
    cudaGetDevice(&dev);
    if (dev != h->device)
        emu_rt_violation("%s: handle created on device %d used with device %d current", routine,
                         h->device, dev);
    if (h->bound_by != self_id())
        emu_rt_violation("%s: handle %p was bound to its stream by another host thread",
                         routine, (void *)h);
    return emu_rt_check_stream(routine, h->stream) == 0;
}

} // namespace ref

#endif
