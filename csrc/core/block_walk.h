/* Row-by-row walk over one block's elements as they sit in a param-layout buffer (a strided
 * box, block_table.h), in the block's own row-major order. Used by gather and finish. */
#ifndef SHAMPOO_BLOCK_WALK_H
#define SHAMPOO_BLOCK_WALK_H

#include <stdint.h>

#include "block_table.h"

typedef struct shampoo_block_walk {
    int64_t rows;       /* number of innermost rows (0 for a zero-element block) */
    int64_t row_len;    /* d_{order-1}; 1 for an order-0 block */
    int64_t row_stride; /* param-layout stride between a row's elements */
    int64_t pos;        /* param-layout offset of the current row's first element */
    int64_t outer;      /* order - 1 outer dims are counted in idx (0 for order <= 1) */
    int64_t idx[SHAMPOO_MAX_ORDER];
    const int64_t *dims;
    const int64_t *strides;
} shampoo_block_walk;

static inline void shampoo_walk_init(shampoo_block_walk *w, const int64_t *row)
{
    int64_t order = row[SHAMPOO_BF_ORDER];
    w->dims = row + SHAMPOO_BF_DIMS;
    w->strides = row + SHAMPOO_BF_STRIDES;
    w->row_len = order > 0 ? w->dims[order - 1] : 1;
    w->row_stride = order > 0 ? w->strides[order - 1] : 1;
    w->rows = w->row_len > 0 ? row[SHAMPOO_BF_NUMEL] / w->row_len : 0;
    w->pos = row[SHAMPOO_BF_PARAM_OFFSET];
    w->outer = order > 0 ? order - 1 : 0;
    for (int64_t k = 0; k < SHAMPOO_MAX_ORDER; k++)
        w->idx[k] = 0;
}

/* Advance to the next row (odometer over the outer dims, last outer dim fastest). pos never
 * leaves the block's extent [PARAM_OFFSET, PARAM_OFFSET + sum (d_k - 1) s_k], which
 * shampoo_table_validate proved representable: a carry rewinds by (d_k - 1) s_k instead of
 * stepping past the end first (d_k s_k may overflow where (d_k - 1) s_k does not). */
static inline void shampoo_walk_next(shampoo_block_walk *w)
{
    for (int64_t k = w->outer - 1; k >= 0; k--) {
        if (w->idx[k] + 1 < w->dims[k]) {
            w->idx[k]++;
            w->pos += w->strides[k];
            return;
        }
        w->pos -= w->idx[k] * w->strides[k];
        w->idx[k] = 0;
    }
}

#endif
