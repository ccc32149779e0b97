/* Closes one instantiation opened by real_template.h. */
#undef real
#undef SHAMPOO_FN
#undef SHAMPOO_FN_OTHER
#undef SHAMPOO_REAL_NAME
#undef SHAMPOO_REAL_IS_DOUBLE
