/* Merge-small-dims and the blocking plan of SPEC B §2.1-2.2: integer logic only, run once per
 * parameter at construction. The plan is a block table (block_table.h) relative to the tensor. */
#include <stddef.h>

#include "block_table.h"
#include "blocking.h"
#include "int_math.h"

shampoo_status shampoo_merge_small_dims(const int64_t *shape, int64_t ndim, int64_t threshold,
                                        int64_t *out, int64_t *out_ndim)
{
    if (ndim < 0 || threshold < 1 || out == NULL || out_ndim == NULL ||
        (ndim > 0 && shape == NULL))
        return SHAMPOO_ERR_INVALID_ARG;
    int64_t n = 0;
    for (int64_t i = 0; i < ndim; i++) {
        int64_t d = shape[i];
        if (d < 0)
            return SHAMPOO_ERR_INVALID_ARG;
        if (d == 1)
            continue; /* step 1: size-1 dims disappear */
        if (n == 0) {
            out[n++] = d;
            continue;
        }
        int64_t last = out[n - 1];
        /* last * d <= threshold, written so that it cannot overflow */
        if (last == 0 || d == 0 || last <= threshold / d)
            out[n - 1] = last * d;
        else
            out[n++] = d;
    }
    if (n == 0)
        out[n++] = 1;
    *out_ndim = n;
    return SHAMPOO_OK;
}

/* Chunks torch.split makes of a dim of size d: ceil(d / max_dim), but one (empty) for d = 0. */
static inline int64_t chunks(int64_t d, int64_t max_dim)
{
    return d == 0 ? 1 : (d - 1) / max_dim + 1;
}

shampoo_status shampoo_block_count(const int64_t *shape, int64_t ndim, int64_t max_dim,
                                   int64_t *count)
{
    if (ndim < 0 || ndim > SHAMPOO_MAX_ORDER || max_dim < 1 || count == NULL ||
        (ndim > 0 && shape == NULL))
        return SHAMPOO_ERR_INVALID_ARG;
    int64_t c = 1;
    for (int64_t i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return SHAMPOO_ERR_INVALID_ARG;
        int64_t n = chunks(shape[i], max_dim);
        if (c > INT64_MAX / n)
            return SHAMPOO_ERR_INVALID_ARG;
        c *= n;
    }
    *count = c;
    return SHAMPOO_OK;
}

shampoo_status shampoo_block_plan(const int64_t *shape, int64_t ndim, int64_t max_dim,
                                  int64_t *table, int64_t count)
{
    int64_t expected;
    shampoo_status st = shampoo_block_count(shape, ndim, max_dim, &expected);
    if (st != SHAMPOO_OK)
        return st;
    if (count != expected || table == NULL)
        return SHAMPOO_ERR_INVALID_ARG;

    int64_t stride[SHAMPOO_MAX_ORDER], chunk[SHAMPOO_MAX_ORDER] = {0};
    int64_t s = 1;
    for (int64_t i = ndim - 1; i >= 0; i--) {
        int64_t d = shape[i] > 0 ? shape[i] : 1; /* a zero dim: numel 0, strides stay finite */
        stride[i] = s;
        if (!shampoo_mul_ok(s, d, &s))
            return SHAMPOO_ERR_INVALID_ARG;
    }
    int64_t block_offset = 0, factor_offset = 0, factor_index = 0;
    for (int64_t b = 0; b < count; b++) {
        int64_t *row = table + b * (int64_t)SHAMPOO_BF_COUNT;
        for (int64_t f = 0; f < SHAMPOO_BF_COUNT; f++)
            row[f] = 0;
        int64_t numel = 1, factor_elems = 0, param_offset = 0;
        for (int64_t i = 0; i < ndim; i++) {
            int64_t start = chunk[i] * max_dim;
            int64_t d = shape[i] - start < max_dim ? shape[i] - start : max_dim;
            row[SHAMPOO_BF_DIMS + i] = d;
            row[SHAMPOO_BF_STRIDES + i] = stride[i];
            int64_t sq;
            /* numel and param_offset are bounded by the tensor's numel; only d*d can overflow */
            param_offset += start * stride[i];
            numel *= d;
            if (!shampoo_mul_ok(d, d, &sq) || !shampoo_add_ok(factor_elems, sq, &factor_elems))
                return SHAMPOO_ERR_INVALID_ARG;
        }
        row[SHAMPOO_BF_ORDER] = ndim;
        row[SHAMPOO_BF_NUMEL] = numel;
        row[SHAMPOO_BF_BLOCK_OFFSET] = block_offset;
        row[SHAMPOO_BF_FACTOR_OFFSET] = factor_offset;
        row[SHAMPOO_BF_FACTOR_INDEX] = factor_index;
        row[SHAMPOO_BF_PARAM_OFFSET] = numel > 0 ? param_offset : 0;
        block_offset += numel;
        if (!shampoo_add_ok(factor_offset, factor_elems, &factor_offset))
            return SHAMPOO_ERR_INVALID_ARG;
        factor_index += ndim;
        /* next chunk index, last dimension fastest (SPEC §2.2 lexicographic order) */
        for (int64_t i = ndim - 1; i >= 0; i--) {
            if (++chunk[i] < chunks(shape[i], max_dim))
                break;
            chunk[i] = 0;
        }
    }
    return SHAMPOO_OK;
}
