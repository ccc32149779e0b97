/* Uploads of the pointer-table passes' per-block tables (io_staging_cuda.cuh). Why pinned
 * buffers in a pool: a copy from pageable memory may make the host wait for the stream (the
 * driver stages it), and a step must not wait for the GPU; cudaFreeHost synchronises the
 * device, so a pinned buffer is never freed, only reused once the event recorded after its
 * last copy has completed (looked at, never waited for). The pool grows to the number of
 * uploads the GPU is behind on, per device; its buffers are small (16 bytes per block). */
#include <stdlib.h>
#include <string.h>

#include <mutex>

#include "io_staging_cuda.cuh"

namespace {

struct staging_buffer {
    void *host;        /* pinned, cap bytes */
    size_t cap;
    cudaEvent_t done;  /* recorded after the buffer's last copy */
    int device;
    bool busy;         /* that copy may still read it */
};

std::mutex g_mu;
staging_buffer *g_pool = nullptr;
size_t g_n = 0, g_cap = 0;

/* Marks every buffer whose copy has completed free again (g_mu held). */
void reap_locked()
{
    for (size_t i = 0; i < g_n; i++) {
        if (!g_pool[i].busy)
            continue;
        const cudaError_t e = cudaEventQuery(g_pool[i].done);
        if (e == cudaSuccess)
            g_pool[i].busy = false;
        else if (e == cudaErrorNotReady)
            (void)cudaGetLastError(); /* "not yet" is no failure: keep it out of launch checks */
        /* other errors: the buffer stays busy (never reused while a copy may read it) */
    }
}

/* A free buffer of `device` with at least `bytes`, marked busy, or a new one (g_mu held);
 * a failed allocation is recorded (SHAMPOO_ERR_CUDA) or SHAMPOO_ERR_NO_MEMORY. */
shampoo_status take_locked(int device, size_t bytes, staging_buffer **out)
{
    for (size_t i = 0; i < g_n; i++) {
        staging_buffer *b = &g_pool[i];
        if (!b->busy && b->device == device && b->cap >= bytes) {
            b->busy = true;
            *out = b;
            return SHAMPOO_OK;
        }
    }
    if (g_n == g_cap) {
        const size_t cap = g_cap ? 2 * g_cap : 16;
        staging_buffer *grown = (staging_buffer *)realloc(g_pool, cap * sizeof(staging_buffer));
        if (grown == nullptr)
            return SHAMPOO_ERR_NO_MEMORY;
        g_pool = grown;
        g_cap = cap;
    }
    size_t cap = 4096; /* rounded up to a power of two: buffers serve later, larger tables */
    while (cap < bytes)
        cap *= 2;
    staging_buffer b = {nullptr, cap, nullptr, device, true};
    SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaMallocHost, &b.host, cap));
    const shampoo_status st = SHAMPOO_CUDA_CHECK(cudaEventCreateWithFlags, &b.done,
                                                 cudaEventDisableTiming);
    if (st != SHAMPOO_OK) {
        cudaFreeHost(b.host); /* never used by a copy: nothing to wait for but the call */
        return st;
    }
    g_pool[g_n] = b;
    *out = &g_pool[g_n++];
    return SHAMPOO_OK;
}

} // namespace

shampoo_status shampoo_cuda_upload_tables(const shampoo_cuda_env *env, void **dst,
                                          const void *const *const *tables, int ntables,
                                          int64_t nblocks)
{
    const size_t per = (size_t)nblocks * sizeof(void *), bytes = per * (size_t)ntables;
    if (bytes == 0)
        return SHAMPOO_OK;
    int device = 0;
    SHAMPOO_TRY(SHAMPOO_CUDA_CHECK(cudaGetDevice, &device)); /* the binding made it current */
    const cudaStream_t stream = shampoo_stream(env);
    std::lock_guard<std::mutex> lock(g_mu);
    reap_locked();
    staging_buffer *b = nullptr;
    SHAMPOO_TRY(take_locked(device, bytes, &b));
    for (int t = 0; t < ntables; t++) {
        if (tables[t] != nullptr)
            memcpy((char *)b->host + per * t, tables[t], per);
        else
            memset((char *)b->host + per * t, 0, per);
    }
    shampoo_status st = SHAMPOO_CUDA_CHECK(cudaMemcpyAsync, dst, b->host, bytes,
                                           cudaMemcpyHostToDevice, stream);
    if (st != SHAMPOO_OK) {
        b->busy = false; /* nothing was enqueued */
        return st;
    }
    st = SHAMPOO_CUDA_CHECK(cudaEventRecord, b->done, stream);
    if (st != SHAMPOO_OK && cudaStreamSynchronize(stream) == cudaSuccess)
        b->busy = false; /* no event to look at: the copy is known done only after a wait */
    return st;
}
