/* Overflow-checked int64 arithmetic for sizes and offsets (operands are non-negative): return
 * 1 and store the result, or 0 on overflow. Shared by the table validation and the planner. */
#ifndef SHAMPOO_INT_MATH_H
#define SHAMPOO_INT_MATH_H

#include <stddef.h>
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

/* Byte counts for malloc: (a * k + extra) * elsize in size_t, 1 and the result, or 0 where it
 * would wrap (a wrapped size allocates a short buffer that is then overrun). */
static inline int shampoo_size_mul_add(size_t a, size_t k, size_t extra, size_t elsize,
                                       size_t *out)
{
    size_t n;
    if (k != 0 && a > SIZE_MAX / k)
        return 0;
    n = a * k;
    if (extra > SIZE_MAX - n)
        return 0;
    n += extra;
    if (elsize != 0 && n > SIZE_MAX / elsize)
        return 0;
    *out = n * elsize;
    return 1;
}

#endif
