/* The one dtype-instantiation helper. A module's .c file does, for each dtype:
 *     #define SHAMPOO_REAL_IS_DOUBLE 0        (then 1)
 *     #include "real_template.h"
 *     #include "module.inc"
 *     #include "real_template_end.h"
 * and module.inc writes its single body with `real` and SHAMPOO_FN(name), which expands to
 * name_f32 or name_f64. SHAMPOO_FN_OTHER names the other precision's twin (fp64 retry). */
#if SHAMPOO_REAL_IS_DOUBLE
#define real double
#define SHAMPOO_FN(name) name##_f64
#define SHAMPOO_FN_OTHER(name) name##_f32
#define SHAMPOO_REAL_NAME "float64"
#else
#define real float
#define SHAMPOO_FN(name) name##_f32
#define SHAMPOO_FN_OTHER(name) name##_f64
#define SHAMPOO_REAL_NAME "float32"
#endif
