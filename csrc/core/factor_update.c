/* Instantiates the Shampoo factor update (factor_update.h) for float and double from the one
 * body in factor_update.inc. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "block_table.h"
#include "int_math.h"
#include "factor_update.h"
#include "parallel.h"
#include "sym_pack.h"

#define SHAMPOO_REAL_IS_DOUBLE 0
#include "real_template.h"
#include "factor_update.inc"
#include "real_template_end.h"

#define SHAMPOO_REAL_IS_DOUBLE 1
#include "real_template.h"
#include "factor_update.inc"
#include "real_template_end.h"
