/* The batch plan: the blocks of a block table grouped by shape, so that the GPU kernels can
 * run one batched cuBLAS call per group and dimension instead of one call per block. Built
 * once on the host from the table (pure integer work, tested on the CPU), copied to the
 * device once, then read by both sides: the host issues the batched calls from its copy, and
 * device kernels build the per-call pointer arrays from theirs.
 *
 * Layout (int64): plan[0] = ngroups, plan[1] = nitems, then ngroups rows of
 * SHAMPOO_PLAN_GROUP_FIELDS, then nitems block indices (the items), grouped: group g owns
 * items [FIRST, FIRST + COUNT). Items are the blocks of order >= 1 with at least one element
 * (order-0 and empty blocks need no matrix product), in table order within a group; groups
 * come in order of their first block. */
#ifndef SHAMPOO_BATCH_PLAN_H
#define SHAMPOO_BATCH_PLAN_H

#include <stdint.h>

#include "block_table.h"
#include "status.h"

enum shampoo_plan_group_field {
    SHAMPOO_PG_ORDER = 0,   /* d >= 1, shared by the group's blocks */
    SHAMPOO_PG_COUNT = 1,   /* number of blocks in the group (>= 1) */
    SHAMPOO_PG_FIRST = 2,   /* index of the group's first item */
    SHAMPOO_PG_NUMEL = 3,   /* elements per block (> 0) */
    SHAMPOO_PG_DIMS = 4,    /* SHAMPOO_MAX_ORDER entries: d_0..d_{d-1}, rest 0 */
    SHAMPOO_PLAN_GROUP_FIELDS = SHAMPOO_PG_DIMS + SHAMPOO_MAX_ORDER
};

#define SHAMPOO_PLAN_HEADER 2

SHAMPOO_HOST_DEVICE static inline const int64_t *shampoo_plan_group(const int64_t *plan, int64_t g)
{
    return plan + SHAMPOO_PLAN_HEADER + g * (int64_t)SHAMPOO_PLAN_GROUP_FIELDS;
}

SHAMPOO_HOST_DEVICE static inline const int64_t *shampoo_plan_items(const int64_t *plan)
{
    return plan + SHAMPOO_PLAN_HEADER + plan[0] * (int64_t)SHAMPOO_PLAN_GROUP_FIELDS;
}

/* Number of int64 entries of the plan of a (valid) table, or -1 on invalid input. */
int64_t shampoo_batch_plan_length(const int64_t *table, int64_t nblocks);

/* Writes the plan of a (valid) table into plan[0 .. length). */
shampoo_status shampoo_batch_plan_build(const int64_t *table, int64_t nblocks, int64_t *plan,
                                        int64_t length);

/* SHAMPOO_OK iff plan (length entries) is the plan of this table: what the GPU kernels rely
 * on before trusting a plan that came from Python. O(nblocks log nblocks). */
shampoo_status shampoo_batch_plan_check(const int64_t *plan, int64_t length,
                                        const int64_t *table, int64_t nblocks);

#endif
