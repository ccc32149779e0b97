/* The per-module state of borrowing through DLPack (binding.h): interned names, the export
 * keyword arguments, and the tensor types whose __dlpack__ runs no user code. */
#include "binding.h"

#include "dlpack_abi.h"

/* module.name if it is a type, else NULL (no error set): a missing library only means its
 * tensors count as unknown exporters. */
static PyObject *known_type(const char *module, const char *name)
{
    PyObject *mod = PyImport_ImportModule(module);
    PyObject *type = mod != NULL ? PyObject_GetAttrString(mod, name) : NULL;
    Py_XDECREF(mod);
    if (type == NULL || !PyType_Check(type)) {
        PyErr_Clear();
        Py_XDECREF(type);
        return NULL;
    }
    return type;
}

int shampoo_known_exporter(const shampoo_dlpack_state *st, PyObject *obj)
{
    /* exact types only: a subclass may override __dlpack__ or __torch_function__ */
    PyObject *type = (PyObject *)Py_TYPE(obj);
    return type == st->known_types[0] || type == st->known_types[1];
}

int shampoo_dlpack_state_init(shampoo_dlpack_state *st, int device_type)
{
    st->device_type = device_type;
    st->dlpack_name = PyUnicode_InternFromString("__dlpack__");
    st->empty_tuple = PyTuple_New(0);
    /* stream -1: torch exports without making any stream wait (the kernels run on the
     * caller's current stream, where the tensors were produced) */
    st->dlpack_kwargs = device_type == SHAMPOO_DL_CPU
                            ? Py_BuildValue("{s:(ii)}", "max_version", 1, 0)
                            : Py_BuildValue("{s:(ii),s:i}", "max_version", 1, 0, "stream", -1);
    st->known_types[0] = known_type("torch", "Tensor");
    st->known_types[1] = known_type("numpy", "ndarray");
    return st->dlpack_name != NULL && st->empty_tuple != NULL && st->dlpack_kwargs != NULL
               ? 0 : -1;
}

void shampoo_dlpack_state_clear(shampoo_dlpack_state *st)
{
    Py_CLEAR(st->dlpack_name);
    Py_CLEAR(st->dlpack_kwargs);
    Py_CLEAR(st->empty_tuple);
    Py_CLEAR(st->known_types[0]);
    Py_CLEAR(st->known_types[1]);
}

int shampoo_dlpack_state_traverse(shampoo_dlpack_state *st, visitproc visit, void *arg)
{
    Py_VISIT(st->dlpack_name);
    Py_VISIT(st->dlpack_kwargs);
    Py_VISIT(st->empty_tuple);
    Py_VISIT(st->known_types[0]);
    Py_VISIT(st->known_types[1]);
    return 0;
}
