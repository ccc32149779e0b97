/* Shared by the reference cuBLAS / cuSOLVER (ref_blas.cpp, ref_solver.cpp): failure
 * injection ("fail the nth next call of routine R with status S", also from the environment
 * variable SHAMPOO_CUDA_EMU_FAIL="R:nth:S,...") and argument-violation reporting. */
#ifndef SHAMPOO_CUDA_EMU_REF_COMMON_H
#define SHAMPOO_CUDA_EMU_REF_COMMON_H

#include "cuda_runtime.h"

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

} // namespace ref

#endif
