/* CUDA emulator runtime (tools/cuda_emu/README.md): kernel launches. A launch checks NVIDIA's
 * limits and the stream of the call under test, then runs to completion before it returns
 * (every stream is then trivially in order): its blocks are shared by the launching thread
 * and a pool of host threads, so atomics and cross-block races are real. */
#include "runtime_internal.h"

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <thread>
#include <vector>

using namespace emu_rt;

namespace {

struct job {
    emu::thunk_fn fn;
    void *closure;
    bool barriers;
    dim3 grid, block;
    const char *kernel;
    uint64_t blocks;
    std::atomic<uint64_t> next{0};
    std::atomic<uint64_t> finished{0};
    std::atomic<bool> diverged{false};
    int users = 0; /* pool workers inside work_on(this); guarded by p_mu */
};

/* Never destroyed: detached workers wait on them until the process ends. */
std::mutex &p_mu = *new std::mutex;
std::condition_variable &p_cv = *new std::condition_variable;
std::condition_variable &p_done_cv = *new std::condition_variable;
std::deque<job *> &p_jobs = *new std::deque<job *>;
std::vector<std::thread> &p_workers = *new std::vector<std::thread>;
bool p_started = false;

/* Takes blocks of j until none is left. */
void work_on(job *j)
{
    for (;;) {
        uint64_t b = j->next.fetch_add(1);
        if (b >= j->blocks)
            break;
        if (run_block(j->kernel, j->barriers, j->grid, j->block, b, j->fn, j->closure))
            j->diverged = true;
        if (j->finished.fetch_add(1) + 1 == j->blocks) {
            std::lock_guard<std::mutex> lock(p_mu);
            p_done_cv.notify_all();
        }
    }
}

void worker_main()
{
    std::unique_lock<std::mutex> lock(p_mu);
    for (;;) {
        job *j = nullptr;
        for (job *c : p_jobs)
            if (c->next.load() < c->blocks) {
                j = c;
                break;
            }
        if (j == nullptr) {
            p_cv.wait(lock);
            continue;
        }
        j->users++; /* keeps j alive: its launcher waits for users == 0 */
        lock.unlock();
        work_on(j);
        lock.lock();
        j->users--;
        p_done_cv.notify_all();
    }
}

void start_pool()
{
    if (p_started)
        return;
    p_started = true;
    int n = 2;
    if (const char *e = getenv("SHAMPOO_CUDA_EMU_WORKERS"))
        n = atoi(e);
    for (int i = 0; i < n; i++) {
        p_workers.emplace_back(worker_main);
        p_workers.back().detach();
    }
}

void run_job(job *j)
{
    {
        std::lock_guard<std::mutex> lock(p_mu);
        start_pool();
        p_jobs.push_back(j);
        p_cv.notify_all();
    }
    work_on(j);
    std::unique_lock<std::mutex> lock(p_mu);
    p_done_cv.wait(lock, [j] { return j->finished.load() == j->blocks && j->users == 0; });
    for (auto it = p_jobs.begin(); it != p_jobs.end(); ++it)
        if (*it == j) {
            p_jobs.erase(it);
            break;
        }
}

} // namespace

namespace emu {

cudaError_t launch(const char *file, int line, const char *kernel, bool barriers, dim3 grid,
                   dim3 block, size_t shmem, cudaStream_t stream, thunk_fn fn, void *closure)
{
    g_launches++;
    char what[320];
    snprintf(what, sizeof what, "launch of %s (%s:%d)", kernel, file, line);
    cudaError_t e = sticky();
    if (e != cudaSuccess)
        return fail(e);
    if ((e = check_stream(what, stream)) != cudaSuccess)
        return fail(e);
    unsigned max_y, max_z;
    int no_image;
    {
        std::lock_guard<std::mutex> lock(g_mu);
        max_y = g_max_grid_y;
        max_z = g_max_grid_z;
        no_image = g_no_kernel_image;
    }
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 ||
        block.z == 0 || grid.x > 2147483647u || grid.y > max_y || grid.z > max_z ||
        block.x > 1024 || block.y > 1024 || block.z > 64 || threads > 1024) {
        violation("%s: invalid configuration grid (%u, %u, %u) block (%u, %u, %u)", what,
                  grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return fail(cudaErrorInvalidConfiguration);
    }
    if (shmem > 48 * 1024) {
        violation("%s: %zu bytes of dynamic shared memory (limit 48 KB)", what, shmem);
        return fail(cudaErrorInvalidValue);
    }
    if (no_image)
        return fail(cudaErrorNoKernelImageForDevice);
    if ((e = injected("launch")) != cudaSuccess)
        return fail(e);
    job j;
    j.fn = fn;
    j.closure = closure;
    j.barriers = barriers;
    j.grid = grid;
    j.block = block;
    j.kernel = kernel;
    j.blocks = (uint64_t)grid.x * grid.y * grid.z;
    run_job(&j);
    if (j.diverged)
        violation("%s: threads of one block left the kernel while others waited at "
                  "__syncthreads", what);
    return cudaSuccess;
}

} // namespace emu
