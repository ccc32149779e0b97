/* Internal to the reference cuSOLVER (ref_solver.cpp, ref_eigh.cpp, ref_xsyev.cpp; see
 * ref_solver.cpp): statuses, the handle and the checks every routine makes. Hidden: the
 * libraries export only cuSOLVER's API and the emu_solver_* controls. */
#ifndef SHAMPOO_CUDA_EMU_REF_SOLVER_H
#define SHAMPOO_CUDA_EMU_REF_SOLVER_H

#include "ref_common.h"

#include <atomic>
#include <cmath>

#define API extern "C" __attribute__((visibility("default")))

#pragma GCC visibility push(hidden)
namespace solver {

enum {
    ST_SUCCESS = 0,
    ST_NOT_INITIALIZED = 1,
    ST_ALLOC_FAILED = 2,
    ST_INVALID_VALUE = 3,
    ST_EXECUTION_FAILED = 6,
    ST_INTERNAL_ERROR = 7,
    ST_NOT_SUPPORTED = 9
};

const long PER_MATRIX = 512; /* syevjBatched's per-matrix workspace constant (elements) */

struct handle : ref::handle_base {
    static constexpr const char *LIBRARY = "cuSOLVER";
    static constexpr unsigned MAGIC = 0x501fe501u;
    static constexpr int NOT_INITIALIZED = ST_NOT_INITIALIZED, INVALID_VALUE = ST_INVALID_VALUE;
    void on_set_stream() {}
};

extern std::atomic<long> g_calls_xsyev;

/* An injected status for this call of `routine` (emu_solver_fail), or 0. */
int injected(const char *routine);

inline bool valid(handle *h) { return ref::live(h); }

/* 0, or the status for a bad handle, device, binding thread or stream. */
int check_handle(handle *h, const char *routine);
/* Reports a violation and returns ST_INVALID_VALUE. */
int bad(const char *routine, const char *why, int n, long lda, long batch);
/* jobz, uplo, n, lda and batch as NVIDIA documents them: 0 or bad(...). */
int check_eig_args(const char *routine, int jobz, int uplo, int n, long lda, long batch);
/* Whether a matrix with (0,0) entry a00 of `bits` precision is to report non-convergence
 * (emu_solver_fail_matrix, emu_solver_fail_all_float32). */
bool marked(double a00, int bits);
long syevj_lwork(int n, long batch);

/* Eigen-decomposition of the symmetric matrix whose `uplo` triangle (column-major, lda) is
 * in a: ascending eigenvalues into w, eigenvectors (columns) over a when vectors. Returns
 * the info value: 0, or `fail_info` when the matrix is marked or Jacobi did not converge. */
template <typename T>
int eigh(int n, T *a, long lda, T *w, int uplo, bool vectors, int bits, int fail_info);

/* Work buffers are overwritten with NaN, so a short buffer or data kept in one shows. */
template <typename T> void poison(T *work, long lwork)
{
    for (long i = 0; i < lwork; i++)
        work[i] = (T)NAN;
}

} // namespace solver
#pragma GCC visibility pop

#endif
