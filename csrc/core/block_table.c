/* shampoo_table_validate: checks every block-table row is well formed and addresses only
 * elements inside the caller's buffers, so that kernels can index without further checks. */
#include <stddef.h>

#include "block_table.h"
#include "int_math.h"

/* One row: fields in range and extents within the given buffer sizes (-1 = unchecked). */
static int row_ok(const int64_t *row, int64_t block_numel, int64_t factor_numel,
                  int64_t factor_count, int64_t param_numel)
{
    int64_t order = row[SHAMPOO_BF_ORDER];
    if (order < 0 || order > SHAMPOO_MAX_ORDER || row[SHAMPOO_BF_ROOT] < 0)
        return 0;
    if (row[SHAMPOO_BF_BLOCK_OFFSET] < 0 || row[SHAMPOO_BF_FACTOR_OFFSET] < 0 ||
        row[SHAMPOO_BF_FACTOR_INDEX] < 0 || row[SHAMPOO_BF_PARAM_OFFSET] < 0)
        return 0;
    int64_t numel = 1, factor_elems = 0, last = 0; /* last: param offset of the last element */
    for (int64_t k = 0; k < SHAMPOO_MAX_ORDER; k++) {
        int64_t d = row[SHAMPOO_BF_DIMS + k], s = row[SHAMPOO_BF_STRIDES + k], sq, span;
        if (k >= order) {
            if (d != 0 || s != 0)
                return 0;
            continue;
        }
        if (d < 0 || s < 0 || !shampoo_mul_ok(numel, d, &numel) || !shampoo_mul_ok(d, d, &sq) ||
            !shampoo_add_ok(factor_elems, sq, &factor_elems))
            return 0;
        if (d > 0 && (!shampoo_mul_ok(d - 1, s, &span) || !shampoo_add_ok(last, span, &last)))
            return 0;
    }
    if (row[SHAMPOO_BF_NUMEL] != numel)
        return 0;
    int64_t end;
    if (!shampoo_add_ok(row[SHAMPOO_BF_BLOCK_OFFSET], numel, &end) ||
        (block_numel >= 0 && end > block_numel))
        return 0;
    if (!shampoo_add_ok(row[SHAMPOO_BF_FACTOR_OFFSET], factor_elems, &end) ||
        (factor_numel >= 0 && end > factor_numel))
        return 0;
    if (!shampoo_add_ok(row[SHAMPOO_BF_FACTOR_INDEX], order, &end) ||
        (factor_count >= 0 && end > factor_count))
        return 0;
    if (numel > 0 && (!shampoo_add_ok(row[SHAMPOO_BF_PARAM_OFFSET], last, &end) ||
                      (param_numel >= 0 && end >= param_numel)))
        return 0;
    return 1;
}

shampoo_status shampoo_table_validate(const int64_t *table, int64_t nblocks,
                                      int64_t block_numel, int64_t factor_numel,
                                      int64_t factor_count, int64_t param_numel)
{
    if (nblocks < 0 || (nblocks > 0 && table == NULL))
        return SHAMPOO_ERR_INVALID_ARG;
    for (int64_t b = 0; b < nblocks; b++) {
        if (!row_ok(shampoo_table_row(table, b), block_numel, factor_numel, factor_count,
                    param_numel))
            return SHAMPOO_ERR_INVALID_ARG;
    }
    return SHAMPOO_OK;
}
