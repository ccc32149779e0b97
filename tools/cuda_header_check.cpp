// The checked variant of csrc/cuda's hand-written cuBLAS/cuSOLVER declarations
// (csrc/cuda/cuda_libs.h): compiled by tools/check_cuda_headers.py against NVIDIA's real
// headers (from their pip wheels), it fails to compile when any declaration has drifted.
// The shipped build never includes these headers (it resolves the libraries at run time).
//
// What "identical" means here: our declarations restate the C ABI with plain types, so the
// real prototype is mapped type by type (an enum becomes int, after proving the enum is
// int-sized with int's representation; a pointer to an opaque struct, a handle, becomes
// void *) and the mapped prototype must then be exactly our function-pointer type, return
// type, parameter count, order, constness and widths included.
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <cublas_v2.h> /* defines CUBLASAPI, then includes cublas_api.h */
#include <cuda_runtime_api.h>
#include <cusolverDn.h>
#include <library_types.h>

#include "cuda_libs.h"

namespace {

template <typename T, typename = void> struct abi {
    using type = T;
};

// An enum crosses the ABI as a C int (the SysV and Windows ABIs pass an int-sized enum as
// an int).
template <typename T> struct abi<T, typename std::enable_if<std::is_enum<T>::value>::type> {
    static_assert(sizeof(T) == sizeof(int), "an enum is not int-sized");
    using type = int;
};

template <typename P> struct abi_pointee {
    // an opaque struct (handle, stream, parameter object) is passed as void *
    using stripped = typename std::remove_cv<P>::type;
    using mapped = typename std::conditional<std::is_class<stripped>::value, void,
                                             typename abi<stripped>::type>::type;
    using c_mapped = typename std::conditional<std::is_const<P>::value, const mapped,
                                               mapped>::type;
    using type = typename std::conditional<std::is_volatile<P>::value, volatile c_mapped,
                                           c_mapped>::type;
};

template <typename P> struct abi<P *, void> {
    using type = typename abi_pointee<P>::type *;
};

template <typename F> struct abi_fn;
template <typename R, typename... A> struct abi_fn<R (*)(A...)> {
    using type = typename abi<R>::type (*)(typename abi<A>::type...);
};

// Every routine shampoo_cuda_libs resolves: the field's type is the real prototype, mapped.
#define CHECK_SYMBOL(lib, symbol, field, required)                                          \
    static_assert(std::is_same<abi_fn<decltype(&symbol)>::type,                             \
                               decltype(shampoo_cuda_libs::field)>::value,                  \
                  "csrc/cuda/cuda_libs.h: the type of field '" #field                       \
                  "' differs from the real prototype of " #symbol);
SHAMPOO_CUDA_LIB_SYMBOLS(CHECK_SYMBOL)

// Every enum constant restated by hand.
#define CHECK_CONSTANT(ours, real, value)                                                   \
    static_assert((long long)(ours) == (long long)(real) && (long long)(value) == (long long)(real), \
                  "csrc/cuda/cuda_libs.h: " #ours " differs from " #real);
SHAMPOO_CUDA_LIB_CONSTANTS(CHECK_CONSTANT)

#define CHECK_CUBLAS_STATUS(value, name)                                                    \
    static_assert((value) == (int)(name), "csrc/cuda/cuda_libs.h: the value of " #name      \
                                          " differs from the real one");
SHAMPOO_CUBLAS_STATUSES(CHECK_CUBLAS_STATUS)
SHAMPOO_CUSOLVER_STATUSES(CHECK_CUBLAS_STATUS)

// The opaque types we pass as void *: pointers, as the mapping above assumes.
static_assert(std::is_pointer<cublasHandle_t>::value, "cublasHandle_t is not a pointer");
static_assert(std::is_pointer<cusolverDnHandle_t>::value, "cusolverDnHandle_t is not a pointer");
static_assert(std::is_pointer<cusolverDnParams_t>::value, "cusolverDnParams_t is not a pointer");
static_assert(std::is_pointer<syevjInfo_t>::value, "syevjInfo_t is not a pointer");
static_assert(std::is_pointer<cudaStream_t>::value, "cudaStream_t is not a pointer");
static_assert(std::is_same<shampoo_cublas_handle, void *>::value &&
                  std::is_same<shampoo_cusolver_handle, void *>::value &&
                  std::is_same<shampoo_cusolver_params, void *>::value &&
                  std::is_same<shampoo_syevj_info, void *>::value,
              "csrc/cuda/cuda_libs.h: handles must be void *");
// The status enums are what every routine returns; 0 must be success.
static_assert(sizeof(cublasStatus_t) == sizeof(int) && CUBLAS_STATUS_SUCCESS == 0,
              "cublasStatus_t");
static_assert(sizeof(cusolverStatus_t) == sizeof(int) && CUSOLVER_STATUS_SUCCESS == 0,
              "cusolverStatus_t");

} // namespace

int main() { return 0; }
