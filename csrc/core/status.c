/* shampoo_status_message: the English text for each status code of status.h. */
#include "status.h"

const char *shampoo_status_message(shampoo_status status)
{
    switch (status) {
    case SHAMPOO_OK:
        return "success";
    case SHAMPOO_ERR_INVALID_ARG:
        return "invalid argument: a size, block table entry or pointer is inconsistent";
    case SHAMPOO_ERR_NO_MEMORY:
        return "out of memory while allocating CPU scratch";
    case SHAMPOO_ERR_LINALG:
        return "a BLAS/LAPACK routine reported an invalid argument";
    case SHAMPOO_ERR_UNSUPPORTED:
        return "unsupported combination of arguments (e.g. a dimension above 2^31-1 for BLAS)";
    case SHAMPOO_ERR_CUDA:
        return "a CUDA, cuBLAS or cuSOLVER call failed";
    }
    return "unknown status";
}
