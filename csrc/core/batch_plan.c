/* Grouping of a block table's blocks by shape (batch_plan.h). */
#include "batch_plan.h"

#include <stdlib.h>
#include <string.h>

#include "int_math.h"

/* Whether block b takes part in matrix products (order >= 1, at least one element). */
static int is_item(const int64_t *row)
{
    return row[SHAMPOO_BF_ORDER] >= 1 && row[SHAMPOO_BF_NUMEL] > 0;
}

/* Orders blocks by shape (order, then dims), ties by table index: blocks of one shape
 * become one run, in table order. */
typedef struct plan_key {
    const int64_t *row;
    int64_t block;
} plan_key;

static int by_shape_then_index(const void *pa, const void *pb)
{
    const plan_key *a = pa, *b = pb;
    int64_t order = a->row[SHAMPOO_BF_ORDER];
    if (order != b->row[SHAMPOO_BF_ORDER])
        return order < b->row[SHAMPOO_BF_ORDER] ? -1 : 1;
    for (int64_t k = 0; k < order; k++) {
        int64_t da = a->row[SHAMPOO_BF_DIMS + k], db = b->row[SHAMPOO_BF_DIMS + k];
        if (da != db)
            return da < db ? -1 : 1;
    }
    return a->block < b->block ? -1 : a->block > b->block;
}

/* A run of sorted keys: one group, first = its first (smallest) block index. */
typedef struct plan_run {
    int64_t start, count, first;
} plan_run;

static int by_first_block(const void *pa, const void *pb)
{
    const plan_run *a = pa, *b = pb;
    return a->first < b->first ? -1 : a->first > b->first;
}

/* The groups of a table: keys (the items sorted by shape, then index) and runs (one per
 * group, in order of first block). O(n log n) in the block count, whatever the number of
 * distinct shapes. Returns the group count, or -1 when scratch cannot be had (*keys and
 * *runs are then NULL); the caller frees both. */
static int64_t assign_groups(const int64_t *table, int64_t nblocks, plan_key **keys,
                             plan_run **runs, int64_t *nitems)
{
    size_t bytes;
    int64_t n = 0, ngroups = 0;
    *keys = NULL;
    *runs = NULL;
    if (!shampoo_size_mul_add((size_t)nblocks, 1, 1, sizeof(plan_key), &bytes) ||
        (*keys = malloc(bytes)) == NULL ||
        !shampoo_size_mul_add((size_t)nblocks, 1, 1, sizeof(plan_run), &bytes) ||
        (*runs = malloc(bytes)) == NULL) {
        free(*keys);
        *keys = NULL;
        return -1;
    }
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t *row = shampoo_table_row(table, b);
        if (is_item(row))
            (*keys)[n++] = (plan_key){row, b};
    }
    qsort(*keys, (size_t)n, sizeof(plan_key), by_shape_then_index);
    for (int64_t i = 0; i < n; i++) {
        if (i == 0 || by_shape_then_index(&(plan_key){(*keys)[i - 1].row, 0},
                                          &(plan_key){(*keys)[i].row, 0}) != 0)
            (*runs)[ngroups++] = (plan_run){i, 0, (*keys)[i].block};
        (*runs)[ngroups - 1].count++;
    }
    qsort(*runs, (size_t)ngroups, sizeof(plan_run), by_first_block);
    *nitems = n;
    return ngroups;
}

int64_t shampoo_batch_plan_length(const int64_t *table, int64_t nblocks)
{
    if (nblocks < 0 || (nblocks > 0 && table == NULL))
        return -1;
    plan_key *keys;
    plan_run *runs;
    int64_t nitems = 0, ngroups = assign_groups(table, nblocks, &keys, &runs, &nitems);
    free(keys);
    free(runs);
    /* ngroups, nitems <= nblocks, which a table of 23 int64s per row bounds far below
     * INT64_MAX / SHAMPOO_PLAN_GROUP_FIELDS */
    return ngroups < 0 ? -1 : SHAMPOO_PLAN_HEADER + ngroups * SHAMPOO_PLAN_GROUP_FIELDS + nitems;
}

shampoo_status shampoo_batch_plan_build(const int64_t *table, int64_t nblocks, int64_t *plan,
                                        int64_t length)
{
    if (plan == NULL || nblocks < 0 || (nblocks > 0 && table == NULL))
        return SHAMPOO_ERR_INVALID_ARG;
    plan_key *keys;
    plan_run *runs;
    int64_t nitems = 0, ngroups = assign_groups(table, nblocks, &keys, &runs, &nitems);
    if (ngroups < 0)
        return SHAMPOO_ERR_NO_MEMORY;
    if (length != SHAMPOO_PLAN_HEADER + ngroups * SHAMPOO_PLAN_GROUP_FIELDS + nitems) {
        free(keys);
        free(runs);
        return SHAMPOO_ERR_INVALID_ARG;
    }
    memset(plan, 0, (size_t)length * sizeof(int64_t));
    plan[0] = ngroups;
    plan[1] = nitems;
    int64_t *items = plan + SHAMPOO_PLAN_HEADER + ngroups * SHAMPOO_PLAN_GROUP_FIELDS;
    int64_t next = 0;
    for (int64_t g = 0; g < ngroups; g++) {
        int64_t *grp = plan + SHAMPOO_PLAN_HEADER + g * SHAMPOO_PLAN_GROUP_FIELDS;
        const int64_t *row = shampoo_table_row(table, runs[g].first);
        grp[SHAMPOO_PG_ORDER] = row[SHAMPOO_BF_ORDER];
        grp[SHAMPOO_PG_COUNT] = runs[g].count;
        grp[SHAMPOO_PG_FIRST] = next;
        grp[SHAMPOO_PG_NUMEL] = row[SHAMPOO_BF_NUMEL];
        for (int64_t k = 0; k < row[SHAMPOO_BF_ORDER]; k++)
            grp[SHAMPOO_PG_DIMS + k] = row[SHAMPOO_BF_DIMS + k];
        for (int64_t i = 0; i < runs[g].count; i++)
            items[next++] = keys[runs[g].start + i].block;
    }
    free(keys);
    free(runs);
    return SHAMPOO_OK;
}

shampoo_status shampoo_batch_plan_check(const int64_t *plan, int64_t length,
                                        const int64_t *table, int64_t nblocks)
{
    int64_t expected = shampoo_batch_plan_length(table, nblocks);
    if (plan == NULL || expected < 0 || length != expected)
        return SHAMPOO_ERR_INVALID_ARG;
    size_t bytes;
    if (!shampoo_size_mul_add((size_t)length, 1, 0, sizeof(int64_t), &bytes))
        return SHAMPOO_ERR_INVALID_ARG;
    int64_t *built = malloc(bytes);
    if (built == NULL)
        return SHAMPOO_ERR_NO_MEMORY;
    shampoo_status st = shampoo_batch_plan_build(table, nblocks, built, length);
    if (st == SHAMPOO_OK && memcmp(built, plan, (size_t)length * sizeof(int64_t)) != 0)
        st = SHAMPOO_ERR_INVALID_ARG;
    free(built);
    return st;
}
