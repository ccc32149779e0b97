/* Status codes: the only error vocabulary of the C core. Kernels return one; the binding
 * (csrc/python/binding.c) turns it into a Python exception with a message. */
#ifndef SHAMPOO_STATUS_H
#define SHAMPOO_STATUS_H

typedef enum shampoo_status {
    SHAMPOO_OK = 0,
    SHAMPOO_ERR_INVALID_ARG = 1,     /* a size, table entry or pointer is inconsistent */
    SHAMPOO_ERR_NO_MEMORY = 2,       /* malloc of CPU scratch failed */
    SHAMPOO_ERR_LINALG = 3,          /* BLAS/LAPACK reported an argument error (info < 0) */
    SHAMPOO_ERR_UNSUPPORTED = 4,     /* a combination the kernels do not implement */
    SHAMPOO_ERR_CUDA = 5             /* a CUDA, cuBLAS or cuSOLVER call failed */
} shampoo_status;

/* Static English text for a status; never NULL. */
const char *shampoo_status_message(shampoo_status status);

/* Per-factor outcome of the root-inverse kernel (matrix_root.h). Not errors of the call:
 * the optimizer decides (raise, warn, keep previous) from these. */
typedef enum shampoo_root_status {
    SHAMPOO_ROOT_OK = 0,
    SHAMPOO_ROOT_INACTIVE = 1,        /* block inactive this step: nothing computed */
    SHAMPOO_ROOT_FACTOR_NAN = 2,      /* bias-corrected factor holds a NaN */
    SHAMPOO_ROOT_FACTOR_INF = 3,      /* bias-corrected factor holds an Inf (and no NaN) */
    SHAMPOO_ROOT_FAILED = 4,          /* eigh did not converge (after fp64 retry if enabled),
                                         or the higher-order method raised its ArithmeticError */
    SHAMPOO_ROOT_NONFINITE = 5,       /* the computed inverse root holds NaN or Inf */
    SHAMPOO_ROOT_MAX_ITERS = 6,       /* Newton/higher order hit max_iterations; result usable */
    SHAMPOO_ROOT_RETRIED_DOUBLE = 7   /* float32 eigh failed, the float64 retry succeeded;
                                         result usable (SPEC §5.3 logs a warning for it) */
} shampoo_root_status;

#endif
