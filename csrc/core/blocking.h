/* Merge-small-dims and blocking plans (SPEC B §2): integer logic only, run at construction. */
#ifndef SHAMPOO_BLOCKING_H
#define SHAMPOO_BLOCKING_H

#include <stdint.h>
#include "status.h"

/* SPEC §2.1. shape: int64[ndim] (ndim may be 0). Writes the merged shape into out (room for
 * max(ndim, 1) entries) and its length into *out_ndim. threshold >= 1. */
shampoo_status shampoo_merge_small_dims(const int64_t *shape, int64_t ndim, int64_t threshold,
                                        int64_t *out, int64_t *out_ndim);

/* Number of blocks SPEC §2.2 cuts a tensor of `shape` into with split size max_dim >= 1:
 * the product over dims of ceil(d / max_dim), where a zero dim counts one (empty) chunk as
 * torch.split gives (so (0, 5) with max_dim 2 has 3 blocks, each with a zero dim); 1 for
 * ndim 0. ndim <= SHAMPOO_MAX_ORDER. */
shampoo_status shampoo_block_count(const int64_t *shape, int64_t ndim, int64_t max_dim,
                                   int64_t *count);

/* Fills `count` rows of a block table (block_table.h) for a tensor of `shape` (already merged
 * if merging is on) split by max_dim, blocks in SPEC §2.2 order. Offsets are relative to
 * the tensor: PARAM_OFFSET from its first element (row-major strides of `shape`),
 * BLOCK_OFFSET/FACTOR_OFFSET/FACTOR_INDEX from 0 and cumulative over its blocks. ROOT is
 * left 0 (the caller sets it). count must equal shampoo_block_count's answer. */
shampoo_status shampoo_block_plan(const int64_t *shape, int64_t ndim, int64_t max_dim,
                                  int64_t *table, int64_t count);

#endif
