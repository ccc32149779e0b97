/* shampoo_table_validate: checks every block-table row is well formed and addresses only
 * elements inside the caller's buffers, so that kernels can index without further checks. */
#include <stddef.h>
#include <stdlib.h>

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

/* A half-open interval [start, end) of one block in one layout. */
typedef struct extent {
    int64_t start, end;
} extent;

static int by_start(const void *pa, const void *pb)
{
    const extent *a = pa, *b = pb;
    return a->start < b->start ? -1 : a->start > b->start;
}

/* Row b's extent in layout l: 0 block layout, 1 factor layout, 2 per-factor arrays. The
 * row passed row_ok, so the ends are representable. */
static extent row_extent(const int64_t *row, int l)
{
    int64_t order = row[SHAMPOO_BF_ORDER];
    if (l == 0)
        return (extent){row[SHAMPOO_BF_BLOCK_OFFSET],
                        row[SHAMPOO_BF_BLOCK_OFFSET] + row[SHAMPOO_BF_NUMEL]};
    if (l == 1)
        return (extent){row[SHAMPOO_BF_FACTOR_OFFSET],
                        row[SHAMPOO_BF_FACTOR_OFFSET] + shampoo_factor_elem_offset(row, order)};
    return (extent){row[SHAMPOO_BF_FACTOR_INDEX], row[SHAMPOO_BF_FACTOR_INDEX] + order};
}

/* Whether no two blocks share an element of layout l (empty extents share nothing).
 * Every table the package builds is laid out in table order, checked in one pass; any
 * other order is sorted first: O(nblocks log nblocks). -1: no memory for the sort. */
static int disjoint(const int64_t *table, int64_t nblocks, int l)
{
    int64_t end = 0;
    int in_order = 1;
    for (int64_t b = 0; b < nblocks && in_order; b++) {
        extent e = row_extent(shampoo_table_row(table, b), l);
        if (e.end == e.start)
            continue;
        if (e.start < end)
            in_order = 0;
        end = e.end;
    }
    if (in_order)
        return 1;
    size_t bytes;
    extent *ext;
    if (!shampoo_size_mul_add((size_t)nblocks, 1, 0, sizeof(extent), &bytes) ||
        (ext = malloc(bytes)) == NULL)
        return -1;
    int64_t n = 0;
    for (int64_t b = 0; b < nblocks; b++) {
        extent e = row_extent(shampoo_table_row(table, b), l);
        if (e.end > e.start)
            ext[n++] = e;
    }
    qsort(ext, (size_t)n, sizeof(extent), by_start);
    int ok = 1;
    for (int64_t i = 1; i < n && ok; i++)
        ok = ext[i].start >= ext[i - 1].end;
    free(ext);
    return ok;
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
    /* Threads share out blocks and factors, and the commit step copies factor by factor:
     * blocks that share state would race or read each other's results. */
    for (int l = 0; l < 3; l++) {
        int ok = disjoint(table, nblocks, l);
        if (ok < 0)
            return SHAMPOO_ERR_NO_MEMORY;
        if (!ok)
            return SHAMPOO_ERR_INVALID_ARG;
    }
    return SHAMPOO_OK;
}
