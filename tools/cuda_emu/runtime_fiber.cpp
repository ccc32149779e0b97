/* CUDA emulator runtime (tools/cuda_emu/README.md): one block of a launch on the current host
 * thread. Kernels that build.py found barrier-free run their CUDA threads one after another
 * on this stack; the others run each CUDA thread as a fiber (its own stack, switched by
 * emu_ctx_swap), so __syncthreads is a real barrier and its reductions see every vote. */
#include "runtime_internal.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

namespace {

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

/* The kernel whose block runs on this host thread, for the barrier-misclassified message. */
thread_local const char *t_kernel = nullptr;

struct kernel_scope {
    const char *outer;
    explicit kernel_scope(const char *k) : outer(t_kernel) { t_kernel = k; }
    ~kernel_scope() { t_kernel = outer; }
};

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

} // namespace

namespace emu_rt {

bool run_block(const char *kernel, bool barriers, dim3 g, dim3 bd, uint64_t b,
               emu::thunk_fn fn, void *closure)
{
    kernel_scope named(kernel);
    emu::thread_ctx base;
    base.block_idx = uint3{(unsigned)(b % g.x), (unsigned)((b / g.x) % g.y),
                           (unsigned)(b / ((uint64_t)g.x * g.y))};
    base.block_dim = bd;
    base.grid_dim = g;
    const size_t n = (size_t)bd.x * bd.y * bd.z;
    if (!barriers) {
        for (size_t t = 0; t < n; t++) {
            t_plain_ctx = base;
            t_plain_ctx.thread_idx = uint3{(unsigned)(t % bd.x), (unsigned)((t / bd.x) % bd.y),
                                           (unsigned)(t / ((size_t)bd.x * bd.y))};
            t_ctx = &t_plain_ctx;
            fn(closure);
        }
        t_ctx = nullptr;
        return false;
    }
    static thread_local block_runner runner;
    t_runner = &runner;
    runner.fn = fn;
    runner.closure = closure;
    runner.diverged = false;
    runner.ensure(n);
    for (size_t t = 0; t < n; t++) {
        runner.fibers[t].ctx = base;
        runner.fibers[t].ctx.thread_idx =
            uint3{(unsigned)(t % bd.x), (unsigned)((t / bd.x) % bd.y),
                  (unsigned)(t / ((size_t)bd.x * bd.y))};
    }
    runner.run_block(n);
    t_runner = nullptr;
    t_ctx = nullptr;
    return runner.diverged;
}

} // namespace emu_rt

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
                t_kernel != nullptr ? t_kernel : "?");
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

} // namespace emu
