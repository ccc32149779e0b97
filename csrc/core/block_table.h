/* The block table: one row of int64 fields per block, built once at construction by Python
 * (from blocking.h's plan) and passed to every kernel. Every kernel loops over it, so Python
 * crosses into C once per phase whatever the number of blocks.
 *
 * Buffers addressed by the table (all row-major, contiguous, one dtype per call):
 *   param layout:  the group's parameters (or gradients) flattened and concatenated, each in
 *                  its own row-major order; a block is a strided box inside it.
 *   block layout:  every block stored contiguously (row-major in its own dims), one after the
 *                  other; used for gradients, grafting state, filtered gradient, momentum.
 *   factor layout: for each block, its order-many d_k x d_k matrices back to back (k = 0..d-1).
 */
#ifndef SHAMPOO_BLOCK_TABLE_H
#define SHAMPOO_BLOCK_TABLE_H

#include <stdint.h>
#include "status.h"

/* The inline accessors of the core's headers are read by CUDA kernels too. */
#ifdef __CUDACC__
#define SHAMPOO_HOST_DEVICE __host__ __device__
#else
#define SHAMPOO_HOST_DEVICE
#endif

/* Highest tensor order a block may have; Python rejects larger at construction. */
#define SHAMPOO_MAX_ORDER 8

enum shampoo_block_field {
    SHAMPOO_BF_ORDER = 0,          /* d, 0..SHAMPOO_MAX_ORDER (0 = a 0-d block of one element) */
    SHAMPOO_BF_NUMEL = 1,          /* product of dims (1 for order 0; may be 0) */
    SHAMPOO_BF_BLOCK_OFFSET = 2,   /* element offset in block-layout buffers */
    SHAMPOO_BF_FACTOR_OFFSET = 3,  /* element offset of factor 0 in factor-layout buffers */
    SHAMPOO_BF_FACTOR_INDEX = 4,   /* index of factor 0 in per-factor arrays (flags, statuses) */
    SHAMPOO_BF_PARAM_OFFSET = 5,   /* element offset of the block's first element, param layout */
    SHAMPOO_BF_ROOT = 6,           /* integer root r >= 1 used for this block's inverse roots */
    SHAMPOO_BF_DIMS = 7,           /* SHAMPOO_MAX_ORDER entries: d_0..d_{d-1}, rest 0 */
    SHAMPOO_BF_STRIDES = SHAMPOO_BF_DIMS + SHAMPOO_MAX_ORDER, /* param-layout strides, elements */
    SHAMPOO_BF_COUNT = SHAMPOO_BF_STRIDES + SHAMPOO_MAX_ORDER  /* = 23 fields per row */
};

/* table: int64[nblocks][SHAMPOO_BF_COUNT]. Returns SHAMPOO_ERR_INVALID_ARG unless every row is
 * well formed and every block fits inside buffers of the given element counts (a count of -1
 * skips that buffer's check): block_numel for block layout, factor_numel for factor layout,
 * factor_count for per-factor arrays, param_numel for param layout, and no two blocks share
 * an element of block layout, factor layout or the per-factor arrays (param layout may be
 * shared: it is only read, or written by one thread). O(nblocks) for a table laid out in
 * table order, O(nblocks log nblocks) otherwise; SHAMPOO_ERR_NO_MEMORY if the sort's
 * scratch cannot be had. */
shampoo_status shampoo_table_validate(const int64_t *table, int64_t nblocks,
                                      int64_t block_numel, int64_t factor_numel,
                                      int64_t factor_count, int64_t param_numel);

SHAMPOO_HOST_DEVICE static inline const int64_t *shampoo_table_row(const int64_t *table, int64_t b)
{
    return table + b * (int64_t)SHAMPOO_BF_COUNT;
}

/* Element offset of factor k of a row from the row's factor 0 (factor layout). */
SHAMPOO_HOST_DEVICE static inline int64_t shampoo_factor_elem_offset(const int64_t *row, int64_t k)
{
    int64_t offset = 0;
    for (int64_t j = 0; j < k; j++)
        offset += row[SHAMPOO_BF_DIMS + j] * row[SHAMPOO_BF_DIMS + j];
    return offset;
}

/* Kernels whose factors are independent (factor update, inverse roots) share them among
 * threads one factor at a time: item i is factor i % SHAMPOO_MAX_ORDER of block
 * i / SHAMPOO_MAX_ORDER, an empty item when that block has fewer dims. */
static inline int64_t shampoo_factor_items(int64_t nblocks)
{
    return nblocks <= INT64_MAX / SHAMPOO_MAX_ORDER ? nblocks * SHAMPOO_MAX_ORDER : -1;
}

#endif
