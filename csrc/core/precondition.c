/* Instantiates Shampoo preconditioning (precondition.h) for float and double from the one
 * body in precondition.inc. */
#include <stddef.h>
#include <stdint.h>

#include "block_table.h"
#include "int_math.h"
#include "parallel.h"
#include "precondition.h"

#define SHAMPOO_REAL_IS_DOUBLE 0
#include "real_template.h"
#include "precondition.inc"
#include "real_template_end.h"

#define SHAMPOO_REAL_IS_DOUBLE 1
#include "real_template.h"
#include "precondition.inc"
#include "real_template_end.h"
