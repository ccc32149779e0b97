/* Borrowing tensor arguments through DLPack for the length of one call: export, check device,
 * dtype, layout and lengths against the block table, then release. Part of the binding. */
#include "binding.h" /* Python.h first, as CPython requires */

#include <string.h>

#include "../core/block_table.h"
#include "dlpack_abi.h"

static const char *dtype_name(shampoo_dl_data_type t)
{
    if (t.lanes != 1)
        return "a vector dtype";
    switch (t.code) {
    case SHAMPOO_DL_FLOAT:
        return t.bits == 16 ? "float16" : t.bits == 32 ? "float32" : t.bits == 64 ? "float64"
                                                                                  : "a float";
    case SHAMPOO_DL_BFLOAT:
        return "bfloat16";
    case SHAMPOO_DL_INT:
        return t.bits == 8 ? "int8" : t.bits == 16 ? "int16" : t.bits == 32 ? "int32"
                                                   : t.bits == 64 ? "int64" : "an int";
    case SHAMPOO_DL_UINT:
        return t.bits == 8 ? "uint8" : "an unsigned int wider than uint8";
    case SHAMPOO_DL_BOOL:
        return "bool";
    case SHAMPOO_DL_COMPLEX:
        return "complex";
    default:
        return "an unknown dtype";
    }
}

/* Whether the dtype fits the kind; *expected names what would. */
static int dtype_ok(shampoo_arg_kind kind, shampoo_dl_data_type t, int real_bits,
                    const char **expected)
{
    if (t.lanes != 1)
        return 0;
    switch (kind) {
    case SHAMPOO_ARG_REAL:
        *expected = real_bits == 32 ? "float32 (like the other float buffers of this call)"
                                    : "float64 (like the other float buffers of this call)";
        return t.code == SHAMPOO_DL_FLOAT && t.bits == real_bits;
    case SHAMPOO_ARG_TABLE:
        *expected = "int64";
        return t.code == SHAMPOO_DL_INT && t.bits == 64;
    case SHAMPOO_ARG_MASK:
        *expected = "uint8 or bool";
        return (t.code == SHAMPOO_DL_UINT || t.code == SHAMPOO_DL_BOOL) && t.bits == 8;
    case SHAMPOO_ARG_INT32:
        *expected = "int32";
        return t.code == SHAMPOO_DL_INT && t.bits == 32;
    case SHAMPOO_ARG_INT64:
        *expected = "int64";
        return t.code == SHAMPOO_DL_INT && t.bits == 64;
    case SHAMPOO_ARG_BYTES:
        *expected = "uint8";
        return t.code == SHAMPOO_DL_UINT && t.bits == 8;
    case SHAMPOO_ARG_DOUBLE:
        *expected = "float64";
        return t.code == SHAMPOO_DL_FLOAT && t.bits == 64;
    case SHAMPOO_ARG_IO:
        *expected = real_bits == 32 ? "float32 or bfloat16 (float32 kernels)"
                                    : "float64 (float64 kernels)";
        return (t.code == SHAMPOO_DL_FLOAT && t.bits == real_bits) ||
               (real_bits == 32 && t.code == SHAMPOO_DL_BFLOAT && t.bits == 16);
    }
    return 0;
}

/* Calls obj.__dlpack__(max_version=(1, 0)), falling back to obj.__dlpack__() for producers
 * that predate versioned capsules. New reference, or NULL with TypeError set. */
static PyObject *dlpack_export(shampoo_dlpack_state *st, const char *fn, const char *arg,
                               PyObject *obj)
{
    PyObject *meth = PyObject_GetAttr(obj, st->dlpack_name);
    if (meth == NULL) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "%s: argument '%s' must be a CPU torch.Tensor or numpy.ndarray (an object "
                     "with __dlpack__), not %R", fn, arg, (PyObject *)Py_TYPE(obj));
        return NULL;
    }
    PyObject *cap = PyObject_Call(meth, st->empty_tuple, st->dlpack_kwargs);
    if (cap == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        cap = PyObject_CallNoArgs(meth);
    }
    Py_DECREF(meth);
    if (cap == NULL) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        PyErr_Format(PyExc_TypeError, "%s: argument '%s' could not be shared through "
                     "__dlpack__: %S", fn, arg, value != NULL ? value : Py_None);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    }
    return cap;
}

/* Exports obj and fills v; checks device, dtype, compact row-major layout and alignment. */
static int view_get(shampoo_view *v, shampoo_dlpack_state *st, const char *fn,
                    const shampoo_arg_spec *spec, PyObject *obj, int real_bits)
{
    const char *arg = spec->name;
    if (obj == Py_None) {
        if (spec->flags & SHAMPOO_ARG_OPTIONAL)
            return 0;
        PyErr_Format(PyExc_TypeError, "%s: argument '%s' must be a tensor, not None", fn, arg);
        return -1;
    }
    if (shampoo_check_sign_flags(fn, arg, obj) < 0)
        return -1;
    v->capsule = dlpack_export(st, fn, arg, obj);
    if (v->capsule == NULL)
        return -1;
    shampoo_dl_tensor *t;
    if (PyCapsule_IsValid(v->capsule, "dltensor_versioned")) {
        shampoo_dl_managed_tensor_versioned *mt =
            PyCapsule_GetPointer(v->capsule, "dltensor_versioned");
        /* Consume the capsule (DLPack: rename it, then the deleter is ours to call), so
         * that code the producer or another thread runs during the call cannot consume it
         * and free the memory the kernels use. */
        if (mt == NULL || PyCapsule_SetName(v->capsule, "used_dltensor_versioned") < 0)
            return -1;
        v->managed = mt;
        v->versioned = 1;
        if (mt->version.major != SHAMPOO_DLPACK_MAJOR_VERSION) {
            PyErr_Format(PyExc_TypeError, "%s: argument '%s' was exported with DLPack %u.%u; "
                         "only major version 1 is understood", fn, arg,
                         (unsigned)mt->version.major, (unsigned)mt->version.minor);
            return -1;
        }
        v->readonly = (mt->flags & SHAMPOO_DLPACK_FLAG_READ_ONLY) != 0;
        if ((mt->flags & SHAMPOO_DLPACK_FLAG_IS_COPIED) && (spec->flags & SHAMPOO_ARG_OUT)) {
            PyErr_Format(PyExc_ValueError, "%s: argument '%s' was exported as a copy, so "
                         "results written to it would be lost", fn, arg);
            return -1;
        }
        t = &mt->dl_tensor;
    } else if (PyCapsule_IsValid(v->capsule, "dltensor")) {
        shampoo_dl_managed_tensor *mt = PyCapsule_GetPointer(v->capsule, "dltensor");
        if (mt == NULL || PyCapsule_SetName(v->capsule, "used_dltensor") < 0)
            return -1;
        v->managed = mt;
        v->versioned = 0;
        t = &mt->dl_tensor;
    } else {
        PyErr_Format(PyExc_TypeError, "%s: argument '%s': __dlpack__ returned %R, not a "
                     "DLPack capsule", fn, arg, v->capsule);
        return -1;
    }
    const int want = (spec->flags & SHAMPOO_ARG_HOST) ? SHAMPOO_DL_CPU : st->device_type;
    if ((int)t->device.device_type != want) {
        PyErr_Format(PyExc_TypeError, "%s: argument '%s' lives on DLPack device type %d; it "
                     "must be %s", fn, arg, (int)t->device.device_type,
                     want == SHAMPOO_DL_CPU ? "a CPU tensor" : "a CUDA tensor");
        return -1;
    }
    v->device_type = t->device.device_type;
    v->device_id = t->device.device_id;
    const char *expected = "";
    if (!dtype_ok(spec->kind, t->dtype, real_bits, &expected)) {
        PyErr_Format(PyExc_TypeError, "%s: argument '%s' has dtype %s; expected %s", fn, arg,
                     dtype_name(t->dtype), expected);
        return -1;
    }
    v->elsize = t->dtype.bits / 8;
    if (t->ndim < 0 || (t->ndim > 0 && t->shape == NULL)) {
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' has an invalid shape", fn, arg);
        return -1;
    }
    int64_t numel = 1, expect_stride = 1;
    for (int32_t i = 0; i < t->ndim; i++) {
        if (t->shape[i] < 0 || (t->shape[i] > 0 && numel > INT64_MAX / t->shape[i])) {
            PyErr_Format(PyExc_ValueError, "%s: argument '%s' has an invalid shape", fn, arg);
            return -1;
        }
        numel *= t->shape[i];
    }
    if (t->strides != NULL && numel > 0) {
        for (int32_t i = t->ndim - 1; i >= 0; i--) {
            if (t->shape[i] != 1 && t->strides[i] != expect_stride) {
                PyErr_Format(PyExc_ValueError, "%s: argument '%s' is not contiguous "
                             "(compact row-major); pass .contiguous()", fn, arg);
                return -1;
            }
            expect_stride *= t->shape[i];
        }
    }
    if (spec->kind == SHAMPOO_ARG_TABLE) {
        if (t->ndim != 2 || t->shape[1] != SHAMPOO_BF_COUNT) {
            PyErr_Format(PyExc_ValueError, "%s: argument '%s' must have shape (nblocks, %d)",
                         fn, arg, (int)SHAMPOO_BF_COUNT);
            return -1;
        }
        v->rows = t->shape[0];
    }
    if (numel > INT64_MAX / v->elsize) {
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' is too large", fn, arg);
        return -1;
    }
    v->numel = numel;
    v->data = t->data != NULL ? (char *)t->data + t->byte_offset : NULL;
    if (v->data == NULL) {
        if (numel > 0) {
            PyErr_Format(PyExc_ValueError, "%s: argument '%s' has no data", fn, arg);
            return -1;
        }
        v->data = v->empty; /* kernels never read a zero-element buffer; they need non-NULL */
    }
    if ((uintptr_t)v->data % (uintptr_t)v->elsize != 0) {
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' is not aligned to its element size",
                     fn, arg);
        return -1;
    }
    if ((spec->flags & SHAMPOO_ARG_OUT) && v->readonly) {
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' is read-only but is written", fn,
                     arg);
        return -1;
    }
    return 0;
}

int shampoo_view_get(shampoo_view *v, shampoo_dlpack_state *st, const char *fn,
                     const shampoo_arg_spec *spec, PyObject *obj, int real_bits)
{
    return view_get(v, st, fn, spec, obj, real_bits);
}

void shampoo_view_release(shampoo_view *v)
{
    /* We consumed the capsule (renamed "used_..."), so its destructor does nothing and the
     * deleter is ours to call, with the GIL held (a producer's deleter may need it). */
    if (v->managed != NULL) {
        if (v->versioned) {
            shampoo_dl_managed_tensor_versioned *mt = v->managed;
            if (mt->deleter != NULL)
                mt->deleter(mt);
        } else {
            shampoo_dl_managed_tensor *mt = v->managed;
            if (mt->deleter != NULL)
                mt->deleter(mt);
        }
        v->managed = NULL;
    }
    Py_CLEAR(v->capsule);
    v->data = NULL;
}

int shampoo_view_table(shampoo_view *v, shampoo_dlpack_state *st, const char *fn,
                       const char *arg, PyObject *obj, int writable)
{
    shampoo_arg_spec spec = {arg, SHAMPOO_ARG_TABLE, SHAMPOO_LAYOUT_NONE,
                             writable ? SHAMPOO_ARG_OUT : 0};
    return view_get(v, st, fn, &spec, obj, 64);
}

static int overlap(const shampoo_view *a, const shampoo_view *b)
{
    if (a->data == NULL || b->data == NULL || a->numel == 0 || b->numel == 0)
        return 0;
    const char *a0 = a->data, *b0 = b->data;
    const char *a1 = a0 + a->numel * a->elsize, *b1 = b0 + b->numel * b->elsize;
    return a0 < b1 && b0 < a1;
}

/* Checks the table, then names the first argument too short for it. */
static int check_extents(shampoo_call *call, const shampoo_arg_spec *specs,
                         const int64_t *table)
{
    int64_t ext[SHAMPOO_LAYOUT_PER_BLOCK + 1];
    for (int l = 0; l <= SHAMPOO_LAYOUT_PER_BLOCK; l++)
        ext[l] = -1;
    for (int i = 0; i < call->nargs; i++) {
        const shampoo_view *v = &call->views[i];
        shampoo_arg_layout l = specs[i].layout;
        if (v->data == NULL || l == SHAMPOO_LAYOUT_NONE)
            continue;
        if (l == SHAMPOO_LAYOUT_PER_BLOCK && v->numel != call->nblocks) {
            PyErr_Format(PyExc_ValueError, "%s: argument '%s' has %lld elements; the table "
                         "has %lld blocks", call->fn, specs[i].name, (long long)v->numel,
                         (long long)call->nblocks);
            return -1;
        }
        if (ext[l] < 0 || v->numel < ext[l])
            ext[l] = v->numel;
    }
    if (shampoo_table_validate(table, call->nblocks, ext[SHAMPOO_LAYOUT_BLOCK],
                               ext[SHAMPOO_LAYOUT_FACTOR], ext[SHAMPOO_LAYOUT_PER_FACTOR],
                               ext[SHAMPOO_LAYOUT_PARAM]) == SHAMPOO_OK)
        return 0;
    if (shampoo_table_validate(table, call->nblocks, -1, -1, -1, -1) != SHAMPOO_OK) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'table' is malformed (a row has an "
                     "order outside 0..%d, a negative field, NUMEL != product of DIMS, or two "
                     "blocks share block-layout, factor-layout or per-factor entries)",
                     call->fn, SHAMPOO_MAX_ORDER);
        return -1;
    }
    for (int i = 0; i < call->nargs; i++) {
        const shampoo_view *v = &call->views[i];
        int64_t n[SHAMPOO_LAYOUT_PER_BLOCK + 1] = {-1, -1, -1, -1, -1, -1};
        if (v->data == NULL || specs[i].layout == SHAMPOO_LAYOUT_NONE)
            continue;
        n[specs[i].layout] = v->numel;
        if (shampoo_table_validate(table, call->nblocks, n[SHAMPOO_LAYOUT_BLOCK],
                                   n[SHAMPOO_LAYOUT_FACTOR], n[SHAMPOO_LAYOUT_PER_FACTOR],
                                   n[SHAMPOO_LAYOUT_PARAM]) != SHAMPOO_OK) {
            PyErr_Format(PyExc_ValueError, "%s: argument '%s' (%lld elements) is too small "
                         "for the block table", call->fn, specs[i].name, (long long)v->numel);
            return -1;
        }
    }
    PyErr_Format(PyExc_ValueError, "%s: the block table does not fit the buffers", call->fn);
    return -1;
}

int shampoo_call_bind(shampoo_call *call, shampoo_dlpack_state *st, const char *fn,
                      const shampoo_arg_spec *specs, PyObject *const *objs, int nargs,
                      int real_bits)
{
    const int64_t *table = NULL;
    call->fn = fn;
    call->nargs = nargs;
    call->real_bits = real_bits;
    call->nblocks = 0;
    call->device_id = -1;
    /* Every export first: exporters other than torch's and NumPy's may run any code, which
     * could resize or free the storage of an argument exported before them; so they go
     * first, and the tensors whose __dlpack__ runs no user code are exported after. */
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < nargs; i++)
            if (shampoo_known_exporter(st, objs[i]) == pass &&
                view_get(&call->views[i], st, fn, &specs[i], objs[i], real_bits) < 0)
                return -1;
    for (int i = 0; i < nargs; i++) {
        shampoo_view *v = &call->views[i];
        if (v->data != NULL && v->device_type != SHAMPOO_DL_CPU) {
            if (call->device_id >= 0 && v->device_id != call->device_id) {
                PyErr_Format(PyExc_ValueError, "%s: argument '%s' is on GPU %d, the others on "
                             "GPU %d", fn, specs[i].name, v->device_id, call->device_id);
                return -1;
            }
            call->device_id = v->device_id;
        }
        /* sizes are checked against the table the host can read */
        if (specs[i].kind == SHAMPOO_ARG_TABLE && v->device_type == SHAMPOO_DL_CPU) {
            table = v->data;
            call->nblocks = v->rows;
        }
    }
    for (int i = 0; i < nargs; i++) {
        if (specs[i].kind == SHAMPOO_ARG_TABLE && call->views[i].rows != call->nblocks) {
            PyErr_Format(PyExc_ValueError, "%s: argument '%s' has %lld rows, the host table "
                         "%lld", fn, specs[i].name, (long long)call->views[i].rows,
                         (long long)call->nblocks);
            return -1;
        }
    }
    for (int i = 0; i < nargs; i++) {
        for (int j = i + 1; j < nargs; j++) {
            const shampoo_view *a = &call->views[i], *b = &call->views[j];
            int written = (specs[i].flags | specs[j].flags) & SHAMPOO_ARG_OUT;
            int same = (specs[i].flags & specs[j].flags & SHAMPOO_ARG_ALIAS_OK) &&
                       a->data == b->data && a->numel == b->numel;
            if (written && !same && overlap(a, b)) {
                PyErr_Format(PyExc_ValueError, "%s: arguments '%s' and '%s' overlap in memory",
                             fn, specs[i].name, specs[j].name);
                return -1;
            }
        }
    }
    return table != NULL ? check_extents(call, specs, table) : 0;
}

void shampoo_call_release(shampoo_call *call)
{
    for (int i = 0; i < SHAMPOO_MAX_ARGS; i++)
        shampoo_view_release(&call->views[i]);
}

PyObject *shampoo_raise_status(const char *fn, shampoo_status status)
{
    PyObject *type = PyExc_RuntimeError;
    if (status == SHAMPOO_ERR_INVALID_ARG || status == SHAMPOO_ERR_UNSUPPORTED)
        type = PyExc_ValueError;
    else if (status == SHAMPOO_ERR_NO_MEMORY)
        type = PyExc_MemoryError;
    PyErr_Format(type, "%s: %s", fn, shampoo_status_message(status));
    return NULL;
}
