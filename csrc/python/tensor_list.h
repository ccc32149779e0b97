/* Tensors read or written in place by the pointer-table kernels (csrc/core/param_io.h): one
 * per parameter (None for one without a gradient), borrowed for one call, and the per-block
 * pointers into them. Python-side only. */
#ifndef SHAMPOO_TENSOR_LIST_H
#define SHAMPOO_TENSOR_LIST_H

#include "binding.h"

typedef struct shampoo_tensor_list {
    const char *name;
    Py_ssize_t n;
    shampoo_view *views; /* n, PyMem */
    void **ptrs;         /* one per block: the block's first element, NULL when inactive */
    int bf16;            /* every tensor holds bfloat16 (else the call's float) */
    int written;
} shampoo_tensor_list;

/* Borrows every tensor of `seq` (an exact list or tuple of exact torch.Tensor / ndarray or
 * None) and points ptrs[b] at block b's first element: the element at the row's PARAM_OFFSET
 * when tensor block_tensor[b] starts at param-layout offset tensor_offsets[block_tensor[b]].
 * Proves every active block's strided box inside its tensor, every tensor of one dtype
 * (SHAMPOO_ARG_IO) and contiguous. 0, or -1 with an exception set; release either way. */
int shampoo_list_bind(shampoo_tensor_list *l, shampoo_dlpack_state *st, const char *fn,
                      const char *name, PyObject *seq, int written, int real_bits,
                      const int64_t *table, int64_t nblocks, const uint8_t *active,
                      const int64_t *tensor_offsets, int64_t ntensors,
                      const int64_t *block_tensor);
void shampoo_list_release(shampoo_tensor_list *l);

/* ValueError when a written tensor of `lists` overlaps any other buffer of the call (its
 * views, the other lists' tensors); O(k log k) in the number of buffers. */
int shampoo_list_check_overlaps(const char *fn, const shampoo_tensor_list *lists, int nlists,
                                const shampoo_call *call, const shampoo_arg_spec *specs);

#endif
