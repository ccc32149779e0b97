/* Instantiates the packed-storage kernels (sym_pack.h) for float and double from sym_pack.inc,
 * and the packed layout's size. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "block_table.h"
#include "sym_pack.h"

int64_t shampoo_packed_numel(const int64_t *table, int64_t nblocks)
{
    if (nblocks < 0 || (nblocks > 0 && table == NULL))
        return -1;
    int64_t total = 0;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t *row = shampoo_table_row(table, b);
        const int64_t order = row[SHAMPOO_BF_ORDER];
        if (order < 0 || order > SHAMPOO_MAX_ORDER)
            return -1;
        for (int64_t k = 0; k < order; k++) {
            const int64_t n = row[SHAMPOO_BF_DIMS + k];
            /* n <= 3e9 keeps n * (n + 1) / 2 (and the n * n of factor layout) in int64 */
            if (n < 0 || n > 3000000000LL || total > INT64_MAX - n * (n + 1) / 2)
                return -1;
            total += n * (n + 1) / 2;
        }
    }
    return total;
}

int64_t shampoo_packed_select_numel(const int64_t *table, int64_t nblocks, const uint8_t *select)
{
    if (shampoo_packed_numel(table, nblocks) < 0 || (nblocks > 0 && select == NULL))
        return -1;
    int64_t total = 0;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t *row = shampoo_table_row(table, b);
        for (int64_t k = 0; k < row[SHAMPOO_BF_ORDER]; k++) {
            const int64_t n = row[SHAMPOO_BF_DIMS + k];
            if (select[row[SHAMPOO_BF_FACTOR_INDEX] + k])
                total += n * (n + 1) / 2;
        }
    }
    return total;
}

#define SHAMPOO_REAL_IS_DOUBLE 0
#include "real_template.h"
#include "sym_pack.inc"
#include "real_template_end.h"

#define SHAMPOO_REAL_IS_DOUBLE 1
#include "real_template.h"
#include "sym_pack.inc"
#include "real_template_end.h"
