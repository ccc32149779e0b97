/* Instantiates shampoo_soap_direction (soap.h) for float and double from the one body in
 * soap_direction.inc. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "block_table.h"
#include "int_math.h"
#include "parallel.h"
#include "soap.h"

#define SHAMPOO_REAL_IS_DOUBLE 0
#include "real_template.h"
#include "soap_direction.inc"
#include "real_template_end.h"

#define SHAMPOO_REAL_IS_DOUBLE 1
#include "real_template.h"
#include "soap_direction.inc"
#include "real_template_end.h"
