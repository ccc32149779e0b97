/* Instantiates the elementwise passes (gather, moments, finish; elementwise.h) for float and
 * double from the one body in elementwise.inc. */
#include <math.h>
#include <stddef.h>

#include "block_table.h"
#include "block_walk.h"
#include "elementwise.h"

#define SHAMPOO_REAL_IS_DOUBLE 0
#include "real_template.h"
#include "elementwise.inc"
#include "real_template_end.h"

#define SHAMPOO_REAL_IS_DOUBLE 1
#include "real_template.h"
#include "elementwise.inc"
#include "real_template_end.h"
