/* Eigenbases of the Kronecker factors for eigenvalue-corrected Shampoo (soap.h): syevd, or
 * one (or more) warm-started power-iteration + QR steps as SOAP does. One body in
 * eigenbasis.inc, instantiated for double first (the float kernel's float64 retry calls it). */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "block_table.h"
#include "int_math.h"
#include "matrix_root.h"
#include "parallel.h"
#include "soap.h"

#define SHAMPOO_REAL_IS_DOUBLE 1
#include "real_template.h"
#include "eigenbasis.inc"
#include "real_template_end.h"

#define SHAMPOO_REAL_IS_DOUBLE 0
#include "real_template.h"
#include "eigenbasis.inc"
#include "real_template_end.h"
