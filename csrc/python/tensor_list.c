/* Borrowing the tensors the pointer-table kernels read or write in place (tensor_list.h).
 * Part of the binding. */
#include "tensor_list.h"

#include <stdlib.h>

#include "../core/block_table.h"

void shampoo_list_release(shampoo_tensor_list *l)
{
    if (l->views != NULL)
        for (Py_ssize_t i = 0; i < l->n; i++)
            shampoo_view_release(&l->views[i]);
    PyMem_Free(l->views);
    PyMem_Free(l->ptrs);
    l->views = NULL;
    l->ptrs = NULL;
    l->n = 0;
}

/* Offset of a block's last element from its first: sum (d_k - 1) s_k; -1 on overflow. */
static int64_t block_extent(const int64_t *row)
{
    int64_t ext = 0;
    for (int64_t k = 0; k < row[SHAMPOO_BF_ORDER]; k++) {
        int64_t d = row[SHAMPOO_BF_DIMS + k] - 1, s = row[SHAMPOO_BF_STRIDES + k];
        if (d < 0 || s < 0 || (s > 0 && d > (INT64_MAX - ext) / s))
            return -1;
        ext += d * s;
    }
    return ext;
}

static int locate_blocks(shampoo_tensor_list *l, const char *fn, const int64_t *table,
                         int64_t nblocks, const uint8_t *active, const int64_t *tensor_offsets,
                         const int64_t *block_tensor)
{
    for (int64_t b = 0; b < nblocks; b++) {
        l->ptrs[b] = NULL;
        if (!active[b])
            continue;
        const int64_t *row = shampoo_table_row(table, b);
        const int64_t t = block_tensor[b];
        if (t < 0 || t >= (int64_t)l->n || l->views[t].data == NULL) {
            PyErr_Format(PyExc_ValueError, "%s: active block %lld lies in entry %lld of '%s', "
                         "which is missing or None", fn, (long long)b, (long long)t, l->name);
            return -1;
        }
        const shampoo_view *v = &l->views[t];
        const int64_t start = row[SHAMPOO_BF_PARAM_OFFSET] - tensor_offsets[t];
        const int64_t ext = block_extent(row);
        if (row[SHAMPOO_BF_NUMEL] == 0)
            continue; /* nothing read or written; the pointer stays NULL-free below */
        if (tensor_offsets[t] < 0 || start < 0 || ext < 0 || start >= v->numel ||
            ext >= v->numel - start) {
            PyErr_Format(PyExc_ValueError, "%s: block %lld does not fit inside entry %lld of "
                         "'%s' (%lld elements)", fn, (long long)b, (long long)t, l->name,
                         (long long)v->numel);
            return -1;
        }
        l->ptrs[b] = (char *)v->data + start * v->elsize;
    }
    /* zero-element active blocks get a harmless non-NULL pointer (never dereferenced) */
    for (int64_t b = 0; b < nblocks; b++)
        if (active[b] && l->ptrs[b] == NULL)
            l->ptrs[b] = l->views[block_tensor[b]].data;
    return 0;
}

int shampoo_list_bind(shampoo_tensor_list *l, shampoo_dlpack_state *st, const char *fn,
                      const char *name, PyObject *seq, int written, int real_bits,
                      const int64_t *table, int64_t nblocks, const uint8_t *active,
                      const int64_t *tensor_offsets, int64_t ntensors,
                      const int64_t *block_tensor)
{
    l->name = name;
    l->written = written;
    l->n = 0;
    l->bf16 = 0;
    /* exact types only: iterating anything else could run user code during the call */
    int is_list = Py_IS_TYPE(seq, &PyList_Type), is_tuple = Py_IS_TYPE(seq, &PyTuple_Type);
    if (!is_list && !is_tuple) {
        PyErr_Format(PyExc_TypeError, "%s: argument '%s' must be a list or tuple of tensors",
                     fn, name);
        return -1;
    }
    Py_ssize_t n = is_list ? PyList_Size(seq) : PyTuple_Size(seq);
    if (n < 0)
        return -1;
    if ((int64_t)n != ntensors) {
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' has %zd entries; tensor_offsets "
                     "has %lld", fn, name, n, (long long)ntensors);
        return -1;
    }
    l->views = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof(shampoo_view));
    l->ptrs = PyMem_Calloc((size_t)(nblocks > 0 ? nblocks : 1), sizeof(void *));
    if (l->views == NULL || l->ptrs == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    l->n = n;
    shampoo_arg_spec spec = {name, SHAMPOO_ARG_IO, SHAMPOO_LAYOUT_NONE,
                             SHAMPOO_ARG_OPTIONAL | (written ? SHAMPOO_ARG_OUT : 0)};
    int dtype_seen = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = is_list ? PyList_GetItem(seq, i) : PyTuple_GetItem(seq, i);
        if (item == NULL)
            return -1;
        if (item != Py_None && !shampoo_known_exporter(st, item)) {
            PyErr_Format(PyExc_TypeError, "%s: entry %zd of '%s' must be a torch.Tensor (not a "
                         "subclass: pass .detach()) or numpy.ndarray, or None", fn, i, name);
            return -1;
        }
        if (shampoo_view_get(&l->views[i], st, fn, &spec, item, real_bits) < 0)
            return -1;
        if (item == Py_None)
            continue;
        int bf16 = l->views[i].elsize == 2;
        if (dtype_seen && bf16 != l->bf16) {
            PyErr_Format(PyExc_TypeError, "%s: the tensors of '%s' must share one dtype; entry "
                         "%zd differs", fn, name, i);
            return -1;
        }
        l->bf16 = bf16;
        dtype_seen = 1;
    }
    return locate_blocks(l, fn, table, nblocks, active, tensor_offsets, block_tensor);
}

typedef struct interval {
    uintptr_t start, end;
    int written;
    const char *name;
} interval;

static int by_start(const void *a, const void *b)
{
    uintptr_t x = ((const interval *)a)->start, y = ((const interval *)b)->start;
    return x < y ? -1 : x > y;
}

int shampoo_list_check_overlaps(const char *fn, const shampoo_tensor_list *lists, int nlists,
                                const shampoo_call *call, const shampoo_arg_spec *specs)
{
    size_t k = (size_t)call->nargs;
    for (int i = 0; i < nlists; i++)
        k += (size_t)lists[i].n;
    interval *iv = PyMem_Malloc((k > 0 ? k : 1) * sizeof(interval));
    if (iv == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t m = 0;
#define ADD(view, w, nm)                                                                     \
    do {                                                                                     \
        const shampoo_view *v_ = (view);                                                     \
        if (v_->data != NULL && v_->numel > 0) {                                             \
            iv[m].start = (uintptr_t)v_->data;                                               \
            iv[m].end = iv[m].start + (uintptr_t)v_->numel * (uintptr_t)v_->elsize;          \
            iv[m].written = (w);                                                             \
            iv[m].name = (nm);                                                               \
            m++;                                                                             \
        }                                                                                    \
    } while (0)
    for (int i = 0; i < call->nargs; i++)
        ADD(&call->views[i], (specs[i].flags & SHAMPOO_ARG_OUT) != 0, specs[i].name);
    for (int i = 0; i < nlists; i++)
        for (Py_ssize_t j = 0; j < lists[i].n; j++)
            ADD(&lists[i].views[j], lists[i].written, lists[i].name);
#undef ADD
    qsort(iv, m, sizeof(interval), by_start);
    uintptr_t end_any = 0, end_written = 0;
    const char *any_name = NULL, *written_name = NULL;
    for (size_t i = 0; i < m; i++) {
        const char *other = iv[i].start < end_written ? written_name
                            : (iv[i].written && iv[i].start < end_any) ? any_name : NULL;
        if (other != NULL) {
            PyErr_Format(PyExc_ValueError, "%s: arguments '%s' and '%s' overlap in memory", fn,
                         other, iv[i].name);
            PyMem_Free(iv);
            return -1;
        }
        if (iv[i].end > end_any)
            end_any = iv[i].end, any_name = iv[i].name;
        if (iv[i].written && iv[i].end > end_written)
            end_written = iv[i].end, written_name = iv[i].name;
    }
    PyMem_Free(iv);
    return 0;
}
