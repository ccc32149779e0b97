/* Grouping of a block table's blocks by shape (batch_plan.h). */
#include "batch_plan.h"

#include <stdlib.h>
#include <string.h>

/* Whether block b takes part in matrix products (order >= 1, at least one element). */
static int is_item(const int64_t *row)
{
    return row[SHAMPOO_BF_ORDER] >= 1 && row[SHAMPOO_BF_NUMEL] > 0;
}

static int same_shape(const int64_t *row_a, const int64_t *row_b)
{
    if (row_a[SHAMPOO_BF_ORDER] != row_b[SHAMPOO_BF_ORDER])
        return 0;
    for (int64_t k = 0; k < row_a[SHAMPOO_BF_ORDER]; k++)
        if (row_a[SHAMPOO_BF_DIMS + k] != row_b[SHAMPOO_BF_DIMS + k])
            return 0;
    return 1;
}

/* group_of[b] = index of b's group (-1 for non-items); returns the group count. Quadratic in
 * the number of distinct shapes only (each block is compared with one representative per
 * group), which stays small: blocks come from a few parameter shapes. */
static int64_t assign_groups(const int64_t *table, int64_t nblocks, int64_t *group_of,
                             int64_t *first_block)
{
    int64_t ngroups = 0;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t *row = shampoo_table_row(table, b);
        group_of[b] = -1;
        if (!is_item(row))
            continue;
        int64_t g = 0;
        while (g < ngroups && !same_shape(shampoo_table_row(table, first_block[g]), row))
            g++;
        if (g == ngroups)
            first_block[ngroups++] = b;
        group_of[b] = g;
    }
    return ngroups;
}

int64_t shampoo_batch_plan_length(const int64_t *table, int64_t nblocks)
{
    if (nblocks < 0 || (nblocks > 0 && table == NULL))
        return -1;
    int64_t *scratch = malloc((size_t)(2 * nblocks + 1) * sizeof(int64_t));
    if (scratch == NULL)
        return -1;
    int64_t ngroups = assign_groups(table, nblocks, scratch, scratch + nblocks);
    int64_t nitems = 0;
    for (int64_t b = 0; b < nblocks; b++)
        nitems += scratch[b] >= 0;
    free(scratch);
    return SHAMPOO_PLAN_HEADER + ngroups * SHAMPOO_PLAN_GROUP_FIELDS + nitems;
}

shampoo_status shampoo_batch_plan_build(const int64_t *table, int64_t nblocks, int64_t *plan,
                                        int64_t length)
{
    if (plan == NULL || shampoo_batch_plan_length(table, nblocks) != length)
        return SHAMPOO_ERR_INVALID_ARG;
    int64_t *scratch = malloc((size_t)(2 * nblocks + 1) * sizeof(int64_t));
    if (scratch == NULL)
        return SHAMPOO_ERR_NO_MEMORY;
    int64_t *group_of = scratch, *first_block = scratch + nblocks;
    int64_t ngroups = assign_groups(table, nblocks, group_of, first_block);
    memset(plan, 0, (size_t)length * sizeof(int64_t));
    plan[0] = ngroups;
    plan[1] = length - SHAMPOO_PLAN_HEADER - ngroups * SHAMPOO_PLAN_GROUP_FIELDS;
    int64_t *items = plan + SHAMPOO_PLAN_HEADER + ngroups * SHAMPOO_PLAN_GROUP_FIELDS;
    int64_t next = 0;
    for (int64_t g = 0; g < ngroups; g++) {
        int64_t *grp = plan + SHAMPOO_PLAN_HEADER + g * SHAMPOO_PLAN_GROUP_FIELDS;
        const int64_t *row = shampoo_table_row(table, first_block[g]);
        grp[SHAMPOO_PG_ORDER] = row[SHAMPOO_BF_ORDER];
        grp[SHAMPOO_PG_FIRST] = next;
        grp[SHAMPOO_PG_NUMEL] = row[SHAMPOO_BF_NUMEL];
        for (int64_t k = 0; k < row[SHAMPOO_BF_ORDER]; k++)
            grp[SHAMPOO_PG_DIMS + k] = row[SHAMPOO_BF_DIMS + k];
        for (int64_t b = first_block[g]; b < nblocks; b++)
            if (group_of[b] == g)
                items[next++] = b;
        grp[SHAMPOO_PG_COUNT] = next - grp[SHAMPOO_PG_FIRST];
    }
    free(scratch);
    return SHAMPOO_OK;
}

shampoo_status shampoo_batch_plan_check(const int64_t *plan, int64_t length,
                                        const int64_t *table, int64_t nblocks)
{
    int64_t expected = shampoo_batch_plan_length(table, nblocks);
    if (plan == NULL || expected < 0 || length != expected)
        return SHAMPOO_ERR_INVALID_ARG;
    int64_t *built = malloc((size_t)length * sizeof(int64_t));
    if (built == NULL)
        return SHAMPOO_ERR_NO_MEMORY;
    shampoo_status st = shampoo_batch_plan_build(table, nblocks, built, length);
    if (st == SHAMPOO_OK && memcmp(built, plan, (size_t)length * sizeof(int64_t)) != 0)
        st = SHAMPOO_ERR_INVALID_ARG;
    free(built);
    return st;
}
