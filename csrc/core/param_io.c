/* Instantiates the pointer-table passes (param_io.h) for float and double from the one body
 * in param_io.inc, and the bfloat16 conversions they share. */
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "block_table.h"
#include "block_walk.h"
#include "param_io.h"

/* bfloat16 is the upper half of a float32: widening is exact. */
static inline float bf16_load(const void *base, int64_t i)
{
    uint32_t u = (uint32_t)((const uint16_t *)base)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, NaN to torch's canonical 0x7FC0 (c10::BFloat16). */
static inline void bf16_store(void *base, int64_t i, float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t h;
    if (isnan(f))
        h = UINT16_C(0x7FC0);
    else
        h = (uint16_t)((u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16);
    ((uint16_t *)base)[i] = h;
}

#define SHAMPOO_REAL_IS_DOUBLE 0
#include "real_template.h"
#include "param_io.inc"
#include "real_template_end.h"

#define SHAMPOO_REAL_IS_DOUBLE 1
#include "real_template.h"
#include "param_io.inc"
#include "real_template_end.h"
