/* Reference cuBLAS for the CUDA emulator (tools/cuda_emu/README.md), built as
 * libcublas.so.13 with cuBLAS's symbol names. Plain loops with double accumulation; every
 * argument is checked as NVIDIA documents it (cublas<t>gemmBatched, cublasSetWorkspace),
 * handles must be bound to the caller's stream and workspace, and any routine can be told
 * to fail (emu_blas_fail, SHAMPOO_CUDA_EMU_FAIL). */
#include "ref_common.h"

#include <atomic>
#include <climits>
#include <cstdint>

#define API extern "C" __attribute__((visibility("default")))

namespace {

enum {
    ST_SUCCESS = 0,
    ST_NOT_INITIALIZED = 1,
    ST_ALLOC_FAILED = 3,
    ST_INVALID_VALUE = 7,
    ST_EXECUTION_FAILED = 13,
    ST_NOT_SUPPORTED = 15
};

struct handle : ref::handle_base {
    static constexpr const char *LIBRARY = "cuBLAS";
    static constexpr unsigned MAGIC = 0xb1a5b1a5u;
    static constexpr int NOT_INITIALIZED = ST_NOT_INITIALIZED, INVALID_VALUE = ST_INVALID_VALUE;
    void *workspace = nullptr;
    size_t workspace_bytes = 0;
    int math_mode = 0;
    /* as documented: setting the stream resets the workspace to the default pool */
    void on_set_stream()
    {
        workspace = nullptr;
        workspace_bytes = 0;
    }
};

ref::injector g_inject;
std::atomic<long> g_max_batch{INT_MAX};
std::atomic<int> g_require_workspace{1};
std::atomic<long> g_gemm_calls{0}, g_largest_batch{0};

int injected(const char *routine) { return g_inject.take("cublas", routine); }

bool valid(handle *h) { return ref::live(h); }

/* What every computing routine checks about its handle; 0 or a status. */
int check_handle(handle *h, const char *routine)
{
    if (!valid(h))
        return ST_NOT_INITIALIZED;
    if (!ref::bound_here(h, routine))
        return ST_EXECUTION_FAILED;
    if (g_require_workspace.load() && h->workspace == nullptr)
        emu_rt_violation("%s: no workspace bound (cublasSetWorkspace after cublasSetStream, "
                         "which resets it)", routine);
    return 0;
}

/* TF32: inputs rounded to 10 explicit mantissa bits (CUBLAS_TF32_TENSOR_OP_MATH). */
inline double tf32(float x)
{
    uint32_t b;
    memcpy(&b, &x, 4);
    b = (b + 0x1000u) & ~0x1fffu;
    float y;
    memcpy(&y, &b, 4);
    return y;
}
inline double tf32(double x) { return x; }

template <typename T>
void gemm_one(int ta, int tb, int m, int n, int k, T alpha, const T *a, int lda, const T *b,
              int ldb, T beta, T *c, int ldc, bool round_tf32)
{
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double s = 0.0;
            for (int p = 0; p < k; p++) {
                T x = ta == 0 ? a[i + (int64_t)p * lda] : a[p + (int64_t)i * lda];
                T y = tb == 0 ? b[p + (int64_t)j * ldb] : b[j + (int64_t)p * ldb];
                s += round_tf32 ? tf32(x) * tf32(y) : (double)x * (double)y;
            }
            T *cij = c + i + (int64_t)j * ldc;
            *cij = beta == (T)0 ? (T)((double)alpha * s)
                                : (T)((double)alpha * s + (double)beta * (double)*cij);
        }
}

/* The documented argument checks of cublas<t>gemm{Batched,StridedBatched} (counted in
 * emu_blas_gemm_calls when they pass), then alpha and beta; 0 or a status. */
int check_gemm(const char *routine, int ta, int tb, int m, int n, int k, int lda, int ldb,
               int ldc, long batch, const void *alpha, const void *beta)
{
    auto bad = [&](const char *why) {
        emu_rt_violation("%s: %s (transa %d transb %d m %d n %d k %d lda %d ldb %d ldc %d "
                         "batch %ld)", routine, why, ta, tb, m, n, k, lda, ldb, ldc, batch);
        return ST_INVALID_VALUE;
    };
    auto mx = [](int x) { return x > 1 ? x : 1; };
    if (ta < 0 || ta > 2 || tb < 0 || tb > 2)
        return bad("invalid operation");
    if (m < 0 || n < 0 || k < 0 || batch < 0)
        return bad("negative size");
    if (lda < mx(ta == 0 ? m : k))
        return bad("lda below the rows of A as stored (op(A) is m x k)");
    if (ldb < mx(tb == 0 ? k : n))
        return bad("ldb below the rows of B as stored (op(B) is k x n)");
    if (ldc < mx(m))
        return bad("ldc < max(1, m)");
    if (batch > g_max_batch.load())
        return bad("batch count above the emulator's configured cap");
    g_gemm_calls++;
    long prev = g_largest_batch.load();
    while (batch > prev && !g_largest_batch.compare_exchange_weak(prev, batch))
        ;
    if (alpha == nullptr || beta == nullptr)
        return ST_INVALID_VALUE;
    return 0;
}

/* TF32 math mode (CUBLAS_TF32_TENSOR_OP_MATH) rounds float inputs only. */
template <typename T> bool rounds_tf32(const handle *h)
{
    return sizeof(T) == 4 && (h->math_mode & 0xf) == 3;
}

template <typename T>
int gemm_batched(const char *routine, handle *h, int ta, int tb, int m, int n, int k,
                 const T *alpha, const T *const a[], int lda, const T *const b[], int ldb,
                 const T *beta, T *const c[], int ldc, int batch)
{
    ref::call<handle> entry(injected(routine), h, routine);
    if (entry.status != 0)
        return entry.status;
    if (int s = check_gemm(routine, ta, tb, m, n, k, lda, ldb, ldc, batch, alpha, beta))
        return s;
    if (batch > 0 && m > 0 && n > 0 && (a == nullptr || b == nullptr || c == nullptr)) {
        emu_rt_violation("%s: NULL pointer array", routine);
        emu_rt_set_sticky(cudaErrorIllegalAddress);
        return 0;
    }
    for (int i = 0; i < batch; i++) {
        if (m == 0 || n == 0)
            break;
        if ((k > 0 && (a[i] == nullptr || b[i] == nullptr)) || c[i] == nullptr) {
            emu_rt_violation("%s: NULL matrix pointer at batch index %d", routine, i);
            emu_rt_set_sticky(cudaErrorIllegalAddress);
            return 0; /* on a GPU the kernel faults after the call returned */
        }
        gemm_one<T>(ta, tb, m, n, k, *alpha, a[i], lda, b[i], ldb, *beta, c[i], ldc,
                    rounds_tf32<T>(h));
    }
    return 0;
}

template <typename T>
int gemm_strided(const char *routine, handle *h, int ta, int tb, int m, int n, int k,
                 const T *alpha, const T *a, int lda, long long sa, const T *b, int ldb,
                 long long sb, const T *beta, T *c, int ldc, long long sc, int batch)
{
    ref::call<handle> entry(injected(routine), h, routine);
    if (entry.status != 0)
        return entry.status;
    if (int s = check_gemm(routine, ta, tb, m, n, k, lda, ldb, ldc, batch, alpha, beta))
        return s;
    for (int i = 0; i < batch; i++)
        gemm_one<T>(ta, tb, m, n, k, *alpha, a + i * sa, lda, b + i * sb, ldb, *beta,
                    c + i * sc, ldc, rounds_tf32<T>(h));
    return 0;
}

} // namespace

API int cublasCreate_v2(void **out)
{
    if (int s = injected("cublasCreate_v2"))
        return s;
    return ref::create_handle<handle>(out);
}

API int cublasDestroy_v2(void *hv) { return ref::destroy_handle<handle>(hv); }

API int cublasSetStream_v2(void *hv, void *stream)
{
    if (int s = injected("cublasSetStream_v2"))
        return s;
    return ref::set_handle_stream<handle>(hv, stream);
}

API int cublasGetStream_v2(void *hv, void **stream)
{
    return ref::handle_stream<handle>(hv, stream);
}

API int cublasSetWorkspace_v2(void *hv, void *workspace, size_t bytes)
{
    if (int s = injected("cublasSetWorkspace_v2"))
        return s;
    handle *h = (handle *)hv;
    if (!valid(h))
        return ST_NOT_INITIALIZED;
    if (workspace != nullptr && ((uintptr_t)workspace % 256) != 0) {
        emu_rt_violation("cublasSetWorkspace: workspace %p not 256-byte aligned", workspace);
        return ST_INVALID_VALUE;
    }
    if (workspace == nullptr && bytes != 0)
        return ST_INVALID_VALUE;
    h->workspace = workspace;
    h->workspace_bytes = bytes;
    /* the workspace is the library's: scribble on it, so data kept there by the caller shows */
    if (workspace != nullptr)
        memset(workspace, 0xa5, bytes < 65536 ? bytes : 65536);
    return 0;
}

API int cublasSetMathMode(void *hv, int mode)
{
    if (int s = injected("cublasSetMathMode"))
        return s;
    handle *h = (handle *)hv;
    if (!valid(h))
        return ST_NOT_INITIALIZED;
    if ((mode & 0xf) > 3)
        return ST_INVALID_VALUE;
    h->math_mode = mode;
    return 0;
}

API int cublasGetMathMode(void *hv, int *mode)
{
    handle *h = (handle *)hv;
    if (!valid(h))
        return ST_NOT_INITIALIZED;
    if (mode == nullptr)
        return ST_INVALID_VALUE;
    *mode = h->math_mode;
    return 0;
}

API int cublasGetVersion_v2(void *hv, int *version)
{
    (void)hv;
    if (version == nullptr)
        return ST_INVALID_VALUE;
    *version = 130000;
    return 0;
}

API const char *cublasGetStatusName(int s)
{
    switch (s) {
    case 0: return "CUBLAS_STATUS_SUCCESS";
    case 1: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case 3: return "CUBLAS_STATUS_ALLOC_FAILED";
    case 7: return "CUBLAS_STATUS_INVALID_VALUE";
    case 8: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case 11: return "CUBLAS_STATUS_MAPPING_ERROR";
    case 13: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case 14: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case 15: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case 16: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_UNKNOWN";
    }
}

API const char *cublasGetStatusString(int s)
{
    switch (s) {
    case 0: return "success";
    case 1: return "the library was not initialized";
    case 3: return "the resource allocation failed";
    case 7: return "an invalid numeric value was used as an argument";
    case 8: return "an absent device architectural feature is required";
    case 11: return "an access to GPU memory space failed";
    case 13: return "the GPU program failed to execute";
    case 14: return "an internal operation failed";
    case 15: return "the functionality requested is not supported";
    default: return "unknown error";
    }
}

API int cublasSgemmBatched(void *h, int ta, int tb, int m, int n, int k, const float *alpha,
                           const float *const a[], int lda, const float *const b[], int ldb,
                           const float *beta, float *const c[], int ldc, int batch)
{
    return gemm_batched<float>("cublasSgemmBatched", (handle *)h, ta, tb, m, n, k, alpha, a,
                               lda, b, ldb, beta, c, ldc, batch);
}

API int cublasDgemmBatched(void *h, int ta, int tb, int m, int n, int k, const double *alpha,
                           const double *const a[], int lda, const double *const b[], int ldb,
                           const double *beta, double *const c[], int ldc, int batch)
{
    return gemm_batched<double>("cublasDgemmBatched", (handle *)h, ta, tb, m, n, k, alpha, a,
                                lda, b, ldb, beta, c, ldc, batch);
}

API int cublasSgemmStridedBatched(void *h, int ta, int tb, int m, int n, int k,
                                  const float *alpha, const float *a, int lda, long long sa,
                                  const float *b, int ldb, long long sb, const float *beta,
                                  float *c, int ldc, long long sc, int batch)
{
    return gemm_strided<float>("cublasSgemmStridedBatched", (handle *)h, ta, tb, m, n, k, alpha,
                               a, lda, sa, b, ldb, sb, beta, c, ldc, sc, batch);
}

API int cublasDgemmStridedBatched(void *h, int ta, int tb, int m, int n, int k,
                                  const double *alpha, const double *a, int lda, long long sa,
                                  const double *b, int ldb, long long sb, const double *beta,
                                  double *c, int ldc, long long sc, int batch)
{
    return gemm_strided<double>("cublasDgemmStridedBatched", (handle *)h, ta, tb, m, n, k,
                                alpha, a, lda, sa, b, ldb, sb, beta, c, ldc, sc, batch);
}

/* ---- control (ctypes) ---- */
API void emu_blas_fail(const char *routine, long nth, int status)
{
    g_inject.add(routine, nth, status);
}
API void emu_blas_reset(void)
{
    g_inject.clear();
    g_max_batch = INT_MAX;
    g_require_workspace = 1;
    g_gemm_calls = 0;
    g_largest_batch = 0;
}
API void emu_blas_set_max_batch(long n) { g_max_batch = n; }
API void emu_blas_require_workspace(int on) { g_require_workspace = on; }
API long emu_blas_gemm_calls(void) { return g_gemm_calls.load(); }
API long emu_blas_largest_batch(void) { return g_largest_batch.load(); }
