/* Overflow-checked int64 arithmetic for sizes and offsets (operands are non-negative): return
 * 1 and store the result, or 0 on overflow. Shared by the table validation and the planner. */
#ifndef SHAMPOO_INT_MATH_H
#define SHAMPOO_INT_MATH_H

#include <stdint.h>

static inline int shampoo_mul_ok(int64_t a, int64_t b, int64_t *out)
{
    if (a != 0 && b > INT64_MAX / a)
        return 0;
    *out = a * b;
    return 1;
}

static inline int shampoo_add_ok(int64_t a, int64_t b, int64_t *out)
{
    if (b > INT64_MAX - a)
        return 0;
    *out = a + b;
    return 1;
}

#endif
