/* Reference cuSOLVER (dense) for the CUDA emulator (tools/cuda_emu/README.md), built as
 * libcusolver.so.12 (with XsyevBatched, ref_xsyev.cpp) and libcusolver.so.11 (without).
 * Eigendecompositions by cyclic Jacobi in double (ref_eigh.cpp), reading only the `uplo`
 * triangle; every argument is checked as NVIDIA documents it (n <= 32 for syevjBatched,
 * lda >= n, lwork at least what the buffer-size query returned), the work buffers are
 * overwritten with NaN (so a short buffer or data kept in one shows), and any routine can be
 * told to fail, or to report non-convergence for chosen matrices (emu_solver_*). */
#include "ref_solver.h"

#include <climits>
#include <mutex>
#include <vector>

namespace solver {

std::atomic<long> g_calls_xsyev{0};

namespace {

ref::injector g_inject;
std::mutex g_mu;
/* Matrices whose (0,0) entry equals a marker (per precision) report non-convergence. */
std::vector<double> g_markers32, g_markers64;
std::atomic<int> g_fail_all32{0};
std::atomic<long> g_calls_syevd{0}, g_calls_syevj{0};

} // namespace

int injected(const char *routine) { return g_inject.take("cusolver", routine); }

int check_handle(handle *h, const char *routine)
{
    if (!valid(h))
        return ST_NOT_INITIALIZED;
    return ref::bound_here(h, routine) ? 0 : ST_EXECUTION_FAILED;
}

int bad(const char *routine, const char *why, int n, long lda, long batch)
{
    emu_rt_violation("%s: %s (n %d lda %ld batch %ld)", routine, why, n, lda, batch);
    return ST_INVALID_VALUE;
}

bool marked(double a00, int bits)
{
    if (bits == 32 && g_fail_all32.load())
        return true;
    std::lock_guard<std::mutex> lock(g_mu);
    for (double m : bits == 32 ? g_markers32 : g_markers64)
        if (a00 == m)
            return true;
    return false;
}

static long syevd_lwork(int n) { return 1 + 6L * n + 2L * n * n; }
long syevj_lwork(int n, long batch) { return batch * ((long)n * n + 2L * n + PER_MATRIX); }

int check_eig_args(const char *routine, int jobz, int uplo, int n, long lda, long batch)
{
    if (jobz != 0 && jobz != 1)
        return bad(routine, "jobz is neither CUSOLVER_EIG_MODE_NOVECTOR nor _VECTOR", n, lda,
                   batch);
    if (uplo != 0 && uplo != 1)
        return bad(routine, "uplo is neither CUBLAS_FILL_MODE_LOWER nor _UPPER", n, lda, batch);
    if (n < 0 || batch < 0)
        return bad(routine, "negative size", n, lda, batch);
    if (lda < (n > 1 ? n : 1))
        return bad(routine, "lda < max(1, n)", n, lda, batch);
    return 0;
}

namespace {

template <typename T>
int syevd_buffer(const char *routine, handle *h, int jobz, int uplo, int n, const T *a,
                 int lda, const T *w, int *lwork)
{
    (void)a;
    (void)w;
    if (int s = injected(routine))
        return s;
    if (!valid(h))
        return ST_NOT_INITIALIZED;
    if (lwork == nullptr)
        return ST_INVALID_VALUE;
    if (int s = check_eig_args(routine, jobz, uplo, n, lda, 1))
        return s;
    const long need = syevd_lwork(n);
    if (need > INT_MAX)
        return bad(routine, "workspace size overflows int", n, lda, 1);
    *lwork = (int)need;
    return 0;
}

template <typename T>
int syevd(const char *routine, handle *h, int jobz, int uplo, int n, T *a, int lda, T *w,
          T *work, int lwork, int *info, int bits)
{
    ref::call<handle> entry(injected(routine), h, routine);
    if (entry.status != 0)
        return entry.status;
    if (int s = check_eig_args(routine, jobz, uplo, n, lda, 1))
        return s;
    if (lwork < syevd_lwork(n))
        return bad(routine, "lwork below the size syevd_bufferSize returns", n, lda, 1);
    if (info == nullptr || (n > 0 && (a == nullptr || w == nullptr || work == nullptr)))
        return ST_INVALID_VALUE;
    g_calls_syevd++;
    poison(work, lwork);
    *info = eigh<T>(n, a, lda, w, uplo, jobz == 1, bits, 1);
    return 0;
}

struct syevj_info {
    unsigned magic = 0x5e7e5e7eu;
    double tol = 0.0;
    int sweeps = 100;
};

bool valid_info(void *p) { return p != nullptr && ((syevj_info *)p)->magic == 0x5e7e5e7eu; }

/* check_eig_args and syevjBatched's size limit. */
int check_syevj_args(const char *routine, int jobz, int uplo, int n, long lda, long batch)
{
    if (int s = check_eig_args(routine, jobz, uplo, n, lda, batch))
        return s;
    if (n > 32)
        return bad(routine, "n > 32 (syevjBatched's limit)", n, lda, batch);
    return 0;
}

template <typename T>
int syevj_buffer(const char *routine, handle *h, int jobz, int uplo, int n, const T *a,
                 int lda, const T *w, int *lwork, void *params, int batch)
{
    (void)a;
    (void)w;
    if (int s = injected(routine))
        return s;
    if (!valid(h))
        return ST_NOT_INITIALIZED;
    if (lwork == nullptr || !valid_info(params))
        return ST_INVALID_VALUE;
    if (int s = check_syevj_args(routine, jobz, uplo, n, lda, batch))
        return s;
    const long need = syevj_lwork(n, batch);
    if (need > INT_MAX)
        return bad(routine, "workspace size overflows int", n, lda, batch);
    *lwork = (int)need;
    return 0;
}

template <typename T>
int syevj(const char *routine, handle *h, int jobz, int uplo, int n, T *a, int lda, T *w,
          T *work, int lwork, int *info, void *params, int batch, int bits)
{
    ref::call<handle> entry(injected(routine), h, routine);
    if (entry.status != 0)
        return entry.status;
    if (!valid_info(params))
        return ST_INVALID_VALUE;
    if (int s = check_syevj_args(routine, jobz, uplo, n, lda, batch))
        return s;
    if ((long)lwork < syevj_lwork(n, batch))
        return bad(routine, "lwork below the size syevjBatched_bufferSize returns", n, lda,
                   batch);
    if (batch > 0 && (info == nullptr || a == nullptr || w == nullptr || work == nullptr))
        return ST_INVALID_VALUE;
    g_calls_syevj++;
    poison(work, lwork);
    for (int i = 0; i < batch; i++)
        info[i] = eigh<T>(n, a + (size_t)i * lda * n, lda, w + (size_t)i * n, uplo, jobz == 1,
                          bits, n + 1);
    return 0;
}

} // namespace

} // namespace solver

using namespace solver;

API int cusolverDnCreate(void **out)
{
    if (int s = injected("cusolverDnCreate"))
        return s;
    return ref::create_handle<handle>(out);
}

API int cusolverDnDestroy(void *hv) { return ref::destroy_handle<handle>(hv); }

API int cusolverDnSetStream(void *hv, void *stream)
{
    if (int s = injected("cusolverDnSetStream"))
        return s;
    return ref::set_handle_stream<handle>(hv, stream);
}

API int cusolverDnGetStream(void *hv, void **stream)
{
    return ref::handle_stream<handle>(hv, stream);
}

API int cusolverDnSsyevd_bufferSize(void *h, int jobz, int uplo, int n, const float *a, int lda,
                                    const float *w, int *lwork)
{
    return syevd_buffer<float>("cusolverDnSsyevd_bufferSize", (handle *)h, jobz, uplo, n, a,
                               lda, w, lwork);
}
API int cusolverDnDsyevd_bufferSize(void *h, int jobz, int uplo, int n, const double *a,
                                    int lda, const double *w, int *lwork)
{
    return syevd_buffer<double>("cusolverDnDsyevd_bufferSize", (handle *)h, jobz, uplo, n, a,
                                lda, w, lwork);
}
API int cusolverDnSsyevd(void *h, int jobz, int uplo, int n, float *a, int lda, float *w,
                         float *work, int lwork, int *info)
{
    return syevd<float>("cusolverDnSsyevd", (handle *)h, jobz, uplo, n, a, lda, w, work, lwork,
                        info, 32);
}
API int cusolverDnDsyevd(void *h, int jobz, int uplo, int n, double *a, int lda, double *w,
                         double *work, int lwork, int *info)
{
    return syevd<double>("cusolverDnDsyevd", (handle *)h, jobz, uplo, n, a, lda, w, work, lwork,
                         info, 64);
}

API int cusolverDnCreateSyevjInfo(void **info)
{
    if (int s = injected("cusolverDnCreateSyevjInfo"))
        return s;
    if (info == nullptr)
        return ST_INVALID_VALUE;
    *info = new syevj_info();
    return 0;
}
API int cusolverDnDestroySyevjInfo(void *info)
{
    if (!valid_info(info))
        return ST_INVALID_VALUE;
    ((syevj_info *)info)->magic = 0;
    delete (syevj_info *)info;
    return 0;
}
API int cusolverDnXsyevjSetTolerance(void *info, double tol)
{
    if (!valid_info(info))
        return ST_INVALID_VALUE;
    ((syevj_info *)info)->tol = tol;
    return 0;
}
API int cusolverDnXsyevjSetMaxSweeps(void *info, int sweeps)
{
    if (!valid_info(info) || sweeps < 1)
        return ST_INVALID_VALUE;
    ((syevj_info *)info)->sweeps = sweeps;
    return 0;
}

API int cusolverDnSsyevjBatched_bufferSize(void *h, int jobz, int uplo, int n, const float *a,
                                           int lda, const float *w, int *lwork, void *params,
                                           int batch)
{
    return syevj_buffer<float>("cusolverDnSsyevjBatched_bufferSize", (handle *)h, jobz, uplo, n,
                               a, lda, w, lwork, params, batch);
}
API int cusolverDnDsyevjBatched_bufferSize(void *h, int jobz, int uplo, int n, const double *a,
                                           int lda, const double *w, int *lwork, void *params,
                                           int batch)
{
    return syevj_buffer<double>("cusolverDnDsyevjBatched_bufferSize", (handle *)h, jobz, uplo,
                                n, a, lda, w, lwork, params, batch);
}
API int cusolverDnSsyevjBatched(void *h, int jobz, int uplo, int n, float *a, int lda, float *w,
                                float *work, int lwork, int *info, void *params, int batch)
{
    return syevj<float>("cusolverDnSsyevjBatched", (handle *)h, jobz, uplo, n, a, lda, w, work,
                        lwork, info, params, batch, 32);
}
API int cusolverDnDsyevjBatched(void *h, int jobz, int uplo, int n, double *a, int lda,
                                double *w, double *work, int lwork, int *info, void *params,
                                int batch)
{
    return syevj<double>("cusolverDnDsyevjBatched", (handle *)h, jobz, uplo, n, a, lda, w, work,
                         lwork, info, params, batch, 64);
}

/* ---- control (ctypes) ---- */
API void emu_solver_fail(const char *routine, long nth, int status)
{
    g_inject.add(routine, nth, status);
}
/* Matrices (of `bits` precision) whose (0,0) entry is `marker` report non-convergence. */
API void emu_solver_fail_matrix(double marker, int bits)
{
    std::lock_guard<std::mutex> lock(g_mu);
    (bits == 32 ? g_markers32 : g_markers64).push_back(marker);
}
API void emu_solver_fail_all_float32(int on) { g_fail_all32 = on; }
API void emu_solver_reset(void)
{
    g_inject.clear();
    std::lock_guard<std::mutex> lock(g_mu);
    g_markers32.clear();
    g_markers64.clear();
    g_fail_all32 = 0;
    g_calls_syevd = g_calls_syevj = g_calls_xsyev = 0;
}
API long emu_solver_calls(const char *which)
{
    if (strcmp(which, "syevd") == 0)
        return g_calls_syevd.load();
    if (strcmp(which, "syevj") == 0)
        return g_calls_syevj.load();
    return g_calls_xsyev.load();
}
