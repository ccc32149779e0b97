/* CUDA emulator runtime (tools/cuda_emu/README.md): devices, errors, streams, events, memory
 * and kernel launches on a host thread pool. Launches run to completion before they return
 * (every stream is then trivially in order); a block's CUDA threads are fibers on one host
 * thread, so __syncthreads is a real barrier, and blocks run on several host threads at once,
 * so atomics and cross-block races are real. Every launch checks NVIDIA's limits and that it
 * uses the stream of the call under test (emu_rt_begin_call); violations are collected for
 * the test harness (emu_rt_end_call). Control functions (emu_rt_*) inject failures. */
#include "cuda_runtime.h"

#include <sys/mman.h>

#include <cerrno>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace {

/* ---------------------------------------------------------------- configuration/state */

std::mutex g_mu; /* guards everything below that is not thread-local */
int g_device_count = 1;
unsigned g_max_grid_y = 65535, g_max_grid_z = 65535;
int g_no_kernel_image = 0;
int g_arch = 90;
struct pending_failure {
    std::string api; /* "launch" or a runtime function name */
    long nth;        /* fails when this reaches 1 */
    cudaError_t error;
};
std::vector<pending_failure> g_failures;
cudaError_t g_sticky = cudaSuccess;
std::vector<std::string> g_violations; /* outside any begin/end call */
std::atomic<long> g_launches{0};

struct stream_rec {
    int device;
    unsigned flags;
};
std::map<void *, stream_rec> g_streams;
struct event_rec {
    unsigned flags;
    bool recorded;
    int device;
    std::chrono::steady_clock::time_point when;
};
std::map<void *, event_rec> g_events;
std::set<void *> g_allocations;

thread_local int t_device = 0;
thread_local cudaError_t t_last = cudaSuccess;
/* The call under test on this host thread: its stream and device, and what went wrong. */
thread_local bool t_in_call = false;
thread_local void *t_call_stream = nullptr;
thread_local int t_call_device = 0;
thread_local std::vector<std::string> t_violations;

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

void violation(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
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

/* An injected failure for `api`, or cudaSuccess. */
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

bool is_special_stream(void *s)
{
    return s == nullptr || s == (void *)cudaStreamLegacy || s == (void *)cudaStreamPerThread;
}

/* Validity of a stream on the current device, and the call-under-test check. */
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

/* ---------------------------------------------------------------- fibers */

extern "C" void emu_ctx_swap(void **save_sp, void *load_sp);
asm(R"(
    .text
    .globl emu_ctx_swap
    .hidden emu_ctx_swap
    .type emu_ctx_swap,@function
emu_ctx_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_swap,.-emu_ctx_swap
)");

const size_t STACK_BYTES = EMU_ASAN ? (512u << 10) : (128u << 10);

enum fiber_state { F_READY, F_WAIT, F_DONE };

struct fiber {
    void *sp = nullptr;
    char *stack = nullptr; /* lowest address; the first page is a guard */
    fiber_state state = F_READY;
    int vote = 0;
    emu::thread_ctx ctx;
    void *fake_stack = nullptr;
};

struct block_runner;
thread_local block_runner *t_runner = nullptr;
thread_local const emu::thread_ctx *t_ctx = nullptr;
thread_local emu::thread_ctx t_plain_ctx;

struct block_runner {
    std::vector<fiber> fibers;
    void *sched_sp = nullptr;
    void *sched_fake = nullptr;
    const void *sched_bottom = nullptr;
    size_t sched_size = 0;
    int current = -1;
    emu::thunk_fn fn = nullptr;
    void *closure = nullptr;
    int r_any = 0, r_all = 1, r_count = 0; /* the last barrier's reductions */
    bool diverged = false;

    void ensure(size_t n)
    {
        while (fibers.size() < n) {
            fiber f;
            void *m = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) {
                fprintf(stderr, "cuda_emu: cannot map fiber stack %zu: %s\n", fibers.size(), strerror(errno));
                abort();
            }
            mprotect(m, 4096, PROT_NONE);
            f.stack = (char *)m;
            fibers.push_back(f);
        }
    }

    static void entry();

    void prime(fiber &f)
    {
        uintptr_t top = ((uintptr_t)(f.stack + STACK_BYTES)) & ~(uintptr_t)15;
        void **sp = (void **)(top - 64);
        for (int i = 0; i < 6; i++)
            sp[i] = nullptr;
        sp[6] = (void *)&block_runner::entry;
        sp[7] = nullptr;
        f.sp = sp;
        f.state = F_READY;
        f.fake_stack = nullptr;
    }

    void switch_in(int i)
    {
        current = i;
        t_ctx = &fibers[i].ctx;
#if EMU_ASAN
        __sanitizer_start_switch_fiber(&sched_fake, fibers[i].stack, STACK_BYTES);
#endif
        emu_ctx_swap(&sched_sp, fibers[i].sp);
#if EMU_ASAN
        __sanitizer_finish_switch_fiber(sched_fake, nullptr, nullptr);
#endif
    }

    /* From a fiber back to the scheduler (state already set). */
    void switch_out()
    {
        fiber &f = fibers[current];
#if EMU_ASAN
        __sanitizer_start_switch_fiber(f.state == F_DONE ? nullptr : &f.fake_stack, sched_bottom,
                                       sched_size);
#endif
        emu_ctx_swap(&f.sp, sched_sp);
#if EMU_ASAN
        __sanitizer_finish_switch_fiber(f.fake_stack, &sched_bottom, &sched_size);
#endif
    }

    /* Runs one block of n CUDA threads; false when its threads met different barriers. */
    bool run_block(size_t n)
    {
        ensure(n);
        for (size_t i = 0; i < n; i++)
            prime(fibers[i]);
        for (;;) {
            size_t waiting = 0, done = 0;
            for (size_t i = 0; i < n; i++) {
                if (fibers[i].state == F_READY)
                    switch_in((int)i);
                waiting += fibers[i].state == F_WAIT;
                done += fibers[i].state == F_DONE;
            }
            if (done == n)
                return true;
            if (done > 0) {
                /* some threads exited while others wait at a barrier: undefined on a GPU */
                diverged = true;
                for (size_t i = 0; i < n; i++)
                    if (fibers[i].state == F_WAIT)
                        fibers[i].state = F_READY; /* let them finish */
                continue;
            }
            r_any = 0;
            r_all = 1;
            r_count = 0;
            for (size_t i = 0; i < n; i++) {
                r_any |= fibers[i].vote;
                r_all &= fibers[i].vote;
                r_count += fibers[i].vote;
                fibers[i].state = F_READY;
            }
        }
    }
};

void block_runner::entry()
{
    block_runner *r = t_runner;
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &r->sched_bottom, &r->sched_size);
#endif
    r->fn(r->closure);
    r->fibers[r->current].state = F_DONE;
    r->switch_out();
    abort(); /* never resumed */
}

/* ---------------------------------------------------------------- the pool */

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

thread_local job *t_job = nullptr;

void run_one_block(job *j, uint64_t b)
{
    const dim3 g = j->grid, bd = j->block;
    emu::thread_ctx base;
    base.block_idx = uint3{(unsigned)(b % g.x), (unsigned)((b / g.x) % g.y),
                           (unsigned)(b / ((uint64_t)g.x * g.y))};
    base.block_dim = bd;
    base.grid_dim = g;
    const size_t n = (size_t)bd.x * bd.y * bd.z;
    if (!j->barriers) {
        for (size_t t = 0; t < n; t++) {
            t_plain_ctx = base;
            t_plain_ctx.thread_idx = uint3{(unsigned)(t % bd.x), (unsigned)((t / bd.x) % bd.y),
                                           (unsigned)(t / ((size_t)bd.x * bd.y))};
            t_ctx = &t_plain_ctx;
            j->fn(j->closure);
        }
        t_ctx = nullptr;
        return;
    }
    static thread_local block_runner runner;
    t_runner = &runner;
    runner.fn = j->fn;
    runner.closure = j->closure;
    runner.diverged = false;
    runner.ensure(n);
    for (size_t t = 0; t < n; t++) {
        runner.fibers[t].ctx = base;
        runner.fibers[t].ctx.thread_idx =
            uint3{(unsigned)(t % bd.x), (unsigned)((t / bd.x) % bd.y),
                  (unsigned)(t / ((size_t)bd.x * bd.y))};
    }
    runner.run_block(n);
    if (runner.diverged)
        j->diverged = true;
    t_runner = nullptr;
    t_ctx = nullptr;
}

/* Takes blocks of j until none is left. */
void work_on(job *j)
{
    job *outer = t_job;
    t_job = j;
    for (;;) {
        uint64_t b = j->next.fetch_add(1);
        if (b >= j->blocks)
            break;
        run_one_block(j, b);
        if (j->finished.fetch_add(1) + 1 == j->blocks) {
            std::lock_guard<std::mutex> lock(p_mu);
            p_done_cv.notify_all();
        }
    }
    t_job = outer;
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

/* ---------------------------------------------------------------- kernel side */

namespace emu {

const thread_ctx &cur()
{
    if (t_ctx == nullptr) {
        fprintf(stderr, "cuda_emu: threadIdx/blockIdx read outside a kernel\n");
        abort();
    }
    return *t_ctx;
}

int sync_threads_reduce(int kind, int predicate)
{
    block_runner *r = t_runner;
    if (r == nullptr || r->current < 0) {
        fprintf(stderr,
                "cuda_emu: __syncthreads in kernel %s, which build.py classified as "
                "barrier-free (a barrier reached through a helper it did not see)\n",
                t_job != nullptr ? t_job->kernel : "?");
        abort();
    }
    fiber &self = r->fibers[r->current];
    self.vote = predicate != 0;
    self.state = F_WAIT;
    r->switch_out();
    /* released: the scheduler reduced every thread's vote before resuming any */
    return kind == 0 ? r->r_any : kind == 1 ? r->r_all : r->r_count;
}

void sync_threads() { (void)sync_threads_reduce(2, 0); }

void note_shared(size_t) {}

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

/* ---------------------------------------------------------------- runtime API */

#define API EMU_API

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

static cudaError_t api_entry(const char *name)
{
    cudaError_t e = sticky();
    if (e == cudaSuccess)
        e = injected(name);
    return fail(e);
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
    std::string all;
    for (auto &v : t_violations)
        all += v + "\n";
    int n = (int)t_violations.size();
    t_violations.clear();
    if (buf != nullptr && len > 0)
        snprintf(buf, len, "%s", all.c_str());
    return n;
}

/* Violations seen outside any call (and clears them). */
API int emu_rt_take_violations(char *buf, size_t len)
{
    std::lock_guard<std::mutex> lock(g_mu);
    std::string all;
    for (auto &v : g_violations)
        all += v + "\n";
    int n = (int)g_violations.size();
    g_violations.clear();
    if (buf != nullptr && len > 0)
        snprintf(buf, len, "%s", all.c_str());
    return n;
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
