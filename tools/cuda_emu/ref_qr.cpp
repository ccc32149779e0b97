/* Reference cuSOLVER geqrf / orgqr (Householder QR and its explicit Q), part of the reference
 * cuSOLVER (ref_solver.cpp). LAPACK's unblocked algorithms (dgeqr2 with dlarfg's sign
 * convention, dorg2r), so Q's signs are LAPACK's as NVIDIA's are. Arguments are checked as
 * NVIDIA documents them: m, n >= 0, k <= n <= m for orgqr, lda >= max(1, m), lwork at least
 * the buffer-size query; the work buffer is overwritten with NaN. */
#include "ref_solver.h"

#include <climits>

using namespace solver;

namespace {

/* Applies H = I - tau v v^T (v = [1; a[j+1:m, j]]) from the left to columns c0..n-1 of a. */
template <typename T> void apply_reflector(T *a, long lda, int m, int n, int j, int c0, T tau)
{
    if (tau == (T)0)
        return;
    T *v = a + (long)j * lda;
    for (int c = c0; c < n; c++) {
        T *col = a + (long)c * lda;
        T w = col[j];
        for (int i = j + 1; i < m; i++)
            w += v[i] * col[i];
        w *= tau;
        col[j] -= w;
        for (int i = j + 1; i < m; i++)
            col[i] -= w * v[i];
    }
}

template <typename T> void householder_qr(int m, int n, T *a, long lda, T *tau)
{
    const int k = m < n ? m : n;
    for (int j = 0; j < k; j++) {
        T *col = a + (long)j * lda;
        T xnorm = 0;
        for (int i = j + 1; i < m; i++)
            xnorm = std::hypot(xnorm, col[i]);
        const T alpha = col[j];
        if (xnorm == (T)0) {
            tau[j] = 0;
            continue;
        }
        const T beta = -std::copysign(std::hypot(alpha, xnorm), alpha);
        tau[j] = (beta - alpha) / beta;
        const T scale = (T)1 / (alpha - beta);
        for (int i = j + 1; i < m; i++)
            col[i] *= scale;
        col[j] = beta; /* R's diagonal; the reflector's leading 1 stays implicit */
        apply_reflector(a, lda, m, n, j, j + 1, tau[j]);
    }
}

template <typename T> void explicit_q(int m, int n, int k, T *a, long lda, const T *tau)
{
    for (int j = k; j < n; j++) {
        T *col = a + (long)j * lda;
        for (int i = 0; i < m; i++)
            col[i] = 0;
        col[j] = 1;
    }
    for (int j = k - 1; j >= 0; j--) {
        T *col = a + (long)j * lda;
        if (j < n - 1) {
            col[j] = 1;
            apply_reflector(a, lda, m, n, j, j + 1, tau[j]);
        }
        for (int i = j + 1; i < m; i++)
            col[i] *= -tau[j];
        col[j] = (T)1 - tau[j];
        for (int i = 0; i < j; i++)
            col[i] = 0;
    }
}

long qr_lwork(int n) { return n > 1 ? n : 1; }

int check_qr_args(const char *routine, int m, int n, int k, long lda, bool orgqr)
{
    if (m < 0 || n < 0 || k < 0)
        return bad(routine, "negative size", n, lda, 1);
    if (orgqr && (n > m || k > n))
        return bad(routine, "orgqr needs k <= n <= m", n, lda, 1);
    if (lda < (m > 1 ? m : 1))
        return bad(routine, "lda < max(1, m)", n, lda, 1);
    return 0;
}

template <typename T>
int buffer(const char *routine, handle *h, int m, int n, int k, long lda, bool orgqr, int *lwork)
{
    if (int s = injected(routine))
        return s;
    if (!valid(h))
        return ST_NOT_INITIALIZED;
    if (lwork == nullptr)
        return ST_INVALID_VALUE;
    if (int s = check_qr_args(routine, m, n, k, lda, orgqr))
        return s;
    *lwork = (int)qr_lwork(n);
    return 0;
}

template <typename T>
int geqrf(const char *routine, handle *h, int m, int n, T *a, int lda, T *tau, T *work,
          int lwork, int *info)
{
    ref::call<handle> entry(injected(routine), h, routine);
    if (entry.status != 0)
        return entry.status;
    if (int s = check_qr_args(routine, m, n, 0, lda, false))
        return s;
    if (lwork < qr_lwork(n))
        return bad(routine, "lwork below the size geqrf_bufferSize returns", n, lda, 1);
    if (info == nullptr || (m > 0 && n > 0 && (a == nullptr || tau == nullptr || work == nullptr)))
        return ST_INVALID_VALUE;
    poison(work, lwork);
    householder_qr<T>(m, n, a, lda, tau);
    *info = 0;
    return 0;
}

template <typename T>
int orgqr(const char *routine, handle *h, int m, int n, int k, T *a, int lda, const T *tau,
          T *work, int lwork, int *info)
{
    ref::call<handle> entry(injected(routine), h, routine);
    if (entry.status != 0)
        return entry.status;
    if (int s = check_qr_args(routine, m, n, k, lda, true))
        return s;
    if (lwork < qr_lwork(n))
        return bad(routine, "lwork below the size orgqr_bufferSize returns", n, lda, 1);
    if (info == nullptr || (n > 0 && (a == nullptr || work == nullptr)) || (k > 0 && tau == nullptr))
        return ST_INVALID_VALUE;
    poison(work, lwork);
    explicit_q<T>(m, n, k, a, lda, tau);
    *info = 0;
    return 0;
}

} // namespace

API int cusolverDnSgeqrf_bufferSize(void *h, int m, int n, float *a, int lda, int *lwork)
{
    (void)a;
    return buffer<float>("cusolverDnSgeqrf_bufferSize", (handle *)h, m, n, 0, lda, false, lwork);
}
API int cusolverDnDgeqrf_bufferSize(void *h, int m, int n, double *a, int lda, int *lwork)
{
    (void)a;
    return buffer<double>("cusolverDnDgeqrf_bufferSize", (handle *)h, m, n, 0, lda, false, lwork);
}
API int cusolverDnSgeqrf(void *h, int m, int n, float *a, int lda, float *tau, float *work,
                         int lwork, int *info)
{
    return geqrf<float>("cusolverDnSgeqrf", (handle *)h, m, n, a, lda, tau, work, lwork, info);
}
API int cusolverDnDgeqrf(void *h, int m, int n, double *a, int lda, double *tau, double *work,
                         int lwork, int *info)
{
    return geqrf<double>("cusolverDnDgeqrf", (handle *)h, m, n, a, lda, tau, work, lwork, info);
}
API int cusolverDnSorgqr_bufferSize(void *h, int m, int n, int k, const float *a, int lda,
                                    const float *tau, int *lwork)
{
    (void)a;
    (void)tau;
    return buffer<float>("cusolverDnSorgqr_bufferSize", (handle *)h, m, n, k, lda, true, lwork);
}
API int cusolverDnDorgqr_bufferSize(void *h, int m, int n, int k, const double *a, int lda,
                                    const double *tau, int *lwork)
{
    (void)a;
    (void)tau;
    return buffer<double>("cusolverDnDorgqr_bufferSize", (handle *)h, m, n, k, lda, true, lwork);
}
API int cusolverDnSorgqr(void *h, int m, int n, int k, float *a, int lda, const float *tau,
                         float *work, int lwork, int *info)
{
    return orgqr<float>("cusolverDnSorgqr", (handle *)h, m, n, k, a, lda, tau, work, lwork, info);
}
API int cusolverDnDorgqr(void *h, int m, int n, int k, double *a, int lda, const double *tau,
                         double *work, int lwork, int *info)
{
    return orgqr<double>("cusolverDnDorgqr", (handle *)h, m, n, k, a, lda, tau, work, lwork, info);
}
