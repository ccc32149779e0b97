/* Reference cuSOLVER (ref_solver.cpp): the eigendecomposition every routine uses, cyclic
 * Jacobi in double precision whatever the data type. */
#include "ref_solver.h"

#include <vector>

#pragma GCC visibility push(hidden)
namespace solver {

template <typename T>
int eigh(int n, T *a, long lda, T *w, int uplo, bool vectors, int bits, int fail_info)
{
    if (n == 0)
        return 0;
    std::vector<double> m((size_t)n * n), v((size_t)n * n, 0.0);
    for (int j = 0; j < n; j++)
        for (int i = 0; i < n; i++) {
            /* only the uplo triangle is read: (i, j) with i <= j for upper (1) */
            const bool in = uplo == 1 ? i <= j : i >= j;
            const double x = in ? (double)a[i + j * lda] : (double)a[j + i * lda];
            m[i + (size_t)j * n] = x;
        }
    const double a00 = (double)a[0];
    for (int i = 0; i < n; i++)
        v[i + (size_t)i * n] = 1.0;
    bool converged = false;
    for (int sweep = 0; sweep < 100 && !converged; sweep++) {
        double off = 0.0, total = 0.0;
        for (int j = 0; j < n; j++)
            for (int i = 0; i < n; i++) {
                const double x = m[i + (size_t)j * n] * m[i + (size_t)j * n];
                total += x;
                if (i != j)
                    off += x;
            }
        if (off <= 1e-28 * total || off == 0.0) { /* off-diagonal norm <= 1e-14 of the whole */
            converged = true;
            break;
        }
        for (int p = 0; p < n - 1; p++)
            for (int q = p + 1; q < n; q++) {
                const double apq = m[p + (size_t)q * n];
                if (apq == 0.0)
                    continue;
                const double app = m[p + (size_t)p * n], aqq = m[q + (size_t)q * n];
                const double theta = (aqq - app) / (2.0 * apq);
                const double t = (theta >= 0 ? 1.0 : -1.0) /
                                 (fabs(theta) + sqrt(theta * theta + 1.0));
                const double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
                for (int k = 0; k < n; k++) { /* columns p, q */
                    const double mkp = m[k + (size_t)p * n], mkq = m[k + (size_t)q * n];
                    m[k + (size_t)p * n] = c * mkp - s * mkq;
                    m[k + (size_t)q * n] = s * mkp + c * mkq;
                }
                for (int k = 0; k < n; k++) { /* rows p, q */
                    const double mpk = m[p + (size_t)k * n], mqk = m[q + (size_t)k * n];
                    m[p + (size_t)k * n] = c * mpk - s * mqk;
                    m[q + (size_t)k * n] = s * mpk + c * mqk;
                }
                for (int k = 0; k < n; k++) {
                    const double vkp = v[k + (size_t)p * n], vkq = v[k + (size_t)q * n];
                    v[k + (size_t)p * n] = c * vkp - s * vkq;
                    v[k + (size_t)q * n] = s * vkp + c * vkq;
                }
            }
    }
    if (!converged || marked(a00, bits)) {
        /* outputs are undefined on failure: make any use of them show */
        for (int j = 0; j < n; j++) {
            w[j] = (T)NAN;
            if (vectors)
                for (int i = 0; i < n; i++)
                    a[i + j * lda] = (T)NAN;
        }
        return fail_info;
    }
    std::vector<int> order(n);
    for (int i = 0; i < n; i++)
        order[i] = i;
    for (int i = 1; i < n; i++) /* ascending eigenvalues, stable */
        for (int j = i; j > 0 && m[order[j - 1] * ((size_t)n + 1)] > m[order[j] * ((size_t)n + 1)]; j--)
            std::swap(order[j], order[j - 1]);
    for (int j = 0; j < n; j++) {
        w[j] = (T)m[order[j] * ((size_t)n + 1)];
        if (vectors)
            for (int i = 0; i < n; i++)
                a[i + j * lda] = (T)v[i + (size_t)order[j] * n];
    }
    return 0;
}

template int eigh<float>(int, float *, long, float *, int, bool, int, int);
template int eigh<double>(int, double *, long, double *, int, bool, int, int);

} // namespace solver
#pragma GCC visibility pop
