/* Reference cuSOLVER (ref_solver.cpp): the 64-bit API's XsyevBatched and its parameters
 * object, in libcusolver.so.12 only (CUDA 12's libcusolver.so.11 has no XsyevBatched). */
#include "ref_solver.h"

#include <climits>
#include <cstdint>

using namespace solver;

namespace {
struct params {
    unsigned magic = 0x9a9a9a9au;
};
bool valid_params(void *p) { return p != nullptr && ((params *)p)->magic == 0x9a9a9a9au; }
size_t xsyev_device_bytes(int64_t n, int64_t batch, int type)
{
    return (size_t)syevj_lwork((int)n, (long)batch) * (type == 1 ? 8 : 4);
}
size_t xsyev_host_bytes(int64_t batch) { return (size_t)(16 * batch); }
/* The arguments both XsyevBatched routines check (after their handle and params): 0 or
 * bad(...). */
int check_xsyev_args(const char *routine, int jobz, int uplo, int64_t n, int ta, int64_t lda,
                     int tw, int tc, int64_t batch)
{
    if (n > INT_MAX)
        return bad(routine, "n too large", -1, (long)lda, (long)batch);
    if (int s = check_eig_args(routine, jobz, uplo, (int)n, (long)lda, (long)batch))
        return s;
    if ((ta != 0 && ta != 1) || tw != ta || tc != ta)
        return bad(routine, "data types of A, W and the computation differ or are unsupported",
                   (int)n, (long)lda, (long)batch);
    return 0;
}
} // namespace

API int cusolverDnCreateParams(void **p)
{
    if (int s = injected("cusolverDnCreateParams"))
        return s;
    if (p == nullptr)
        return ST_INVALID_VALUE;
    *p = new params();
    return 0;
}
API int cusolverDnDestroyParams(void *p)
{
    if (!valid_params(p))
        return ST_INVALID_VALUE;
    ((params *)p)->magic = 0;
    delete (params *)p;
    return 0;
}
API int cusolverDnXsyevBatched_bufferSize(void *hv, void *p, int jobz, int uplo, int64_t n,
                                          int ta, const void *a, int64_t lda, int tw,
                                          const void *w, int tc, size_t *device_bytes,
                                          size_t *host_bytes, int64_t batch)
{
    (void)a;
    (void)w;
    const char *routine = "cusolverDnXsyevBatched_bufferSize";
    if (int s = injected(routine))
        return s;
    handle *h = (handle *)hv;
    if (!valid(h))
        return ST_NOT_INITIALIZED;
    if (!valid_params(p) || device_bytes == nullptr || host_bytes == nullptr)
        return ST_INVALID_VALUE;
    if (int s = check_xsyev_args(routine, jobz, uplo, n, ta, lda, tw, tc, batch))
        return s;
    *device_bytes = xsyev_device_bytes(n, batch, ta);
    *host_bytes = xsyev_host_bytes(batch);
    return 0;
}
API int cusolverDnXsyevBatched(void *hv, void *p, int jobz, int uplo, int64_t n, int ta,
                               void *a, int64_t lda, int tw, void *w, int tc, void *device_buf,
                               size_t device_bytes, void *host_buf, size_t host_bytes,
                               int *info, int64_t batch)
{
    const char *routine = "cusolverDnXsyevBatched";
    ref::call<handle> entry(injected(routine), (handle *)hv, routine);
    if (entry.status != 0)
        return entry.status;
    if (!valid_params(p))
        return ST_INVALID_VALUE;
    if (int s = check_xsyev_args(routine, jobz, uplo, n, ta, lda, tw, tc, batch))
        return s;
    if (device_bytes < xsyev_device_bytes(n, batch, ta) || host_bytes < xsyev_host_bytes(batch))
        return bad(routine, "workspace below the sizes XsyevBatched_bufferSize returns", (int)n,
                   (long)lda, (long)batch);
    if (batch > 0 && (info == nullptr || a == nullptr || w == nullptr || device_buf == nullptr ||
                      (host_bytes > 0 && host_buf == nullptr)))
        return ST_INVALID_VALUE;
    g_calls_xsyev++;
    memset(host_buf, 0xff, host_bytes);
    for (int64_t i = 0; i < batch; i++) {
        if (ta == 1) {
            poison((double *)device_buf, (long)(device_bytes / 8));
            info[i] = eigh<double>((int)n, (double *)a + i * lda * n, (long)lda,
                                   (double *)w + i * n, uplo, jobz == 1, 64, 1);
        } else {
            poison((float *)device_buf, (long)(device_bytes / 4));
            info[i] = eigh<float>((int)n, (float *)a + i * lda * n, (long)lda,
                                  (float *)w + i * n, uplo, jobz == 1, 32, 1);
        }
    }
    return 0;
}
