/* The Python module distributed_shampoo._C_cuda: module state, loading cuBLAS/cuSOLVER
 * (paths chosen by Python), per-device handles, and the integer helpers the GPU kernels'
 * callers need (workspace sizes). The kernels' entry points live in cuda_ops.c. */
#include "cuda_binding.h"

#include <pthread.h>

#include "../core/batch_plan.h"

/* Guards the handle pools (module state) across threads that released the GIL. */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;

/* A list of str into a NULL-padded array of UTF-8 pointers (borrowed from the list). */
static int paths_from(PyObject *list, const char **out, int cap, const char *arg)
{
    if (!PyList_Check(list)) {
        PyErr_Format(PyExc_TypeError, "load_libraries: argument '%s' must be a list of str",
                     arg);
        return -1;
    }
    Py_ssize_t n = PyList_Size(list);
    if (n > cap) {
        PyErr_Format(PyExc_ValueError, "load_libraries: argument '%s' has more than %d paths",
                     arg, cap);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GetItem(list, i);
        out[i] = item != NULL && PyUnicode_Check(item) ? PyUnicode_AsUTF8AndSize(item, NULL)
                                                       : NULL;
        if (out[i] == NULL) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_TypeError, "load_libraries: argument '%s' must hold str",
                             arg);
            return -1;
        }
    }
    return (int)n;
}

static PyObject *load_libraries(PyObject *module, PyObject *args)
{
    shampoo_cuda_module_state *st = shampoo_cuda_get_state(module);
    PyObject *cublas, *cusolver;
    const char *cublas_paths[64], *cusolver_paths[64];
    char err[768] = "";
    if (!PyArg_ParseTuple(args, "OO:load_libraries", &cublas, &cusolver))
        return NULL;
    if (st->libs_loaded)
        Py_RETURN_NONE;
    int nb = paths_from(cublas, cublas_paths, 64, "cublas_paths");
    int ns = nb < 0 ? -1 : paths_from(cusolver, cusolver_paths, 64, "cusolver_paths");
    if (ns < 0)
        return NULL;
    if (nb != ns) {
        PyErr_Format(PyExc_ValueError, "load_libraries: arguments 'cublas_paths' and "
                     "'cusolver_paths' must have the same length (pairs; got %d and %d)", nb, ns);
        return NULL;
    }
    if (shampoo_cuda_libs_load(&st->libs, cublas_paths, cusolver_paths, nb, err,
                               sizeof err) < 0)
        return PyErr_Format(PyExc_ImportError, "distributed_shampoo._C_cuda: %s", err);
    st->libs_loaded = 1;
    Py_RETURN_NONE;
}

static PyObject *library_info(PyObject *module, PyObject *args)
{
    (void)args;
    shampoo_cuda_module_state *st = shampoo_cuda_get_state(module);
    return Py_BuildValue("{s:O,s:O}", "loaded", st->libs_loaded ? Py_True : Py_False,
                         "batched_syev",
                         st->libs_loaded && st->libs.xsyev_batched != NULL ? Py_True
                                                                            : Py_False);
}

static PyObject *build_info(PyObject *module, PyObject *args)
{
    (void)module;
    (void)args;
    return Py_BuildValue("{s:s}", "archs", shampoo_cuda_built_archs());
}

/* A free handle pair of `device` (created on first use), marked busy; -1 with an exception. */
static int acquire_handles(shampoo_cuda_module_state *st, const char *fn, int device)
{
    int slot = -1;
    pthread_mutex_lock(&pool_lock);
    for (int i = 0; i < SHAMPOO_CUDA_HANDLE_POOL && slot < 0; i++)
        if (!st->busy[device][i] && st->blas[device][i] != NULL)
            slot = i;
    for (int i = 0; i < SHAMPOO_CUDA_HANDLE_POOL && slot < 0; i++)
        if (st->blas[device][i] == NULL)
            slot = i;
    if (slot >= 0)
        st->busy[device][slot] = 1;
    pthread_mutex_unlock(&pool_lock);
    if (slot < 0) {
        PyErr_Format(PyExc_RuntimeError, "%s: more than %d CUDA calls in flight on GPU %d at "
                     "once", fn, SHAMPOO_CUDA_HANDLE_POOL, device);
        return -1;
    }
    if (st->blas[device][slot] == NULL) {
        void *b = NULL, *s = NULL;
        int rc = st->libs.cublas_create(&b);
        if (rc == 0)
            rc = st->libs.cublas_set_math_mode(b, SHAMPOO_CUBLAS_DEFAULT_MATH);
        if (rc != 0) {
            PyErr_Format(PyExc_RuntimeError, "%s: cublasCreate failed on GPU %d: %d (%s)", fn,
                         device, rc, shampoo_cublas_status_name(rc));
            goto fail;
        }
        rc = st->libs.cusolver_create(&s);
        if (rc != 0) {
            PyErr_Format(PyExc_RuntimeError, "%s: cusolverDnCreate failed on GPU %d: %d (%s)",
                         fn, device, rc, shampoo_cusolver_status_name(rc));
            st->libs.cublas_destroy(b);
            goto fail;
        }
        st->solver[device][slot] = s; /* busy: no other thread reads this slot */
        st->blas[device][slot] = b;
    }
    return slot;
fail:
    pthread_mutex_lock(&pool_lock);
    st->busy[device][slot] = 0;
    pthread_mutex_unlock(&pool_lock);
    return -1;
}

void shampoo_cuda_scope_end(PyObject *module, shampoo_cuda_scope *scope)
{
    if (scope->slot > 0) {
        shampoo_cuda_module_state *st = shampoo_cuda_get_state(module);
        pthread_mutex_lock(&pool_lock);
        st->busy[scope->device][scope->slot - 1] = 0;
        pthread_mutex_unlock(&pool_lock);
        scope->slot = 0;
    }
    if (scope->entered) {
        shampoo_cuda_device_leave(scope->device, scope->previous);
        scope->entered = 0;
    }
}

int shampoo_cuda_env_for(PyObject *module, const shampoo_call *call, unsigned long long stream,
                         const shampoo_view *workspace, const shampoo_view *blas_workspace,
                         int need_libs, shampoo_cuda_env *env, shampoo_cuda_scope *scope)
{
    shampoo_cuda_module_state *st = shampoo_cuda_get_state(module);
    const int device = call->device_id;
    memset(env, 0, sizeof(*env));
    env->stream = (void *)(uintptr_t)stream;
    if (workspace != NULL && workspace->data != NULL) {
        env->workspace = workspace->data;
        env->workspace_bytes = (size_t)workspace->numel;
    }
    if (blas_workspace != NULL && blas_workspace->data != NULL) {
        env->blas_workspace = blas_workspace->data;
        env->blas_workspace_bytes = (size_t)blas_workspace->numel;
    }
    if (device < 0 || device >= SHAMPOO_CUDA_MAX_DEVICES) {
        PyErr_Format(PyExc_ValueError, "%s: no CUDA tensor argument, or GPU index %d beyond %d",
                     call->fn, device, SHAMPOO_CUDA_MAX_DEVICES - 1);
        return -1;
    }
    shampoo_cuda_clear_failure();
    scope->device = device;
    if (shampoo_cuda_device_enter(device, &scope->previous) != 0) {
        const char *why = shampoo_cuda_failure();
        PyErr_Format(PyExc_RuntimeError, "%s: could not make GPU %d current: %s", call->fn,
                     device, why != NULL ? why : "unknown error");
        shampoo_cuda_device_leave(device, scope->previous);
        return -1;
    }
    scope->entered = 1;
    if (!need_libs)
        return 0;
    if (!st->libs_loaded) {
        PyErr_Format(PyExc_RuntimeError, "%s: cuBLAS/cuSOLVER are not loaded (call "
                     "load_libraries first)", call->fn);
        shampoo_cuda_scope_end(module, scope);
        return -1;
    }
    const int slot = acquire_handles(st, call->fn, device);
    if (slot < 0) {
        shampoo_cuda_scope_end(module, scope);
        return -1;
    }
    scope->slot = slot + 1;
    env->libs = &st->libs;
    env->blas = st->blas[device][slot];
    env->solver = st->solver[device][slot];
    return 0;
}

PyObject *shampoo_cuda_raise_status(const char *fn, shampoo_status status)
{
    const char *why = shampoo_cuda_failure();
    if (status != SHAMPOO_ERR_CUDA && why == NULL)
        return shampoo_raise_status(fn, status);
    PyErr_Format(PyExc_RuntimeError, "%s: %s (first failure: %s)", fn,
                 shampoo_status_message(status),
                 why != NULL ? why : "none recorded: a CUDA call returned an error");
    return NULL;
}

static PyMethodDef cuda_methods[] = {
    {"load_libraries", load_libraries, METH_VARARGS,
     "load_libraries(cublas_paths, cusolver_paths): dlopen the first loadable pair i"},
    {"library_info", library_info, METH_NOARGS,
     "library_info() -> dict: whether the libraries are loaded, and optional routines"},
    {"build_info", build_info, METH_NOARGS,
     "build_info() -> dict: the SM architectures compiled in ('archs', as \"75;80;90\")"},
    {NULL, NULL, 0, NULL}
};

static int cuda_exec(PyObject *m)
{
    shampoo_cuda_module_state *st = shampoo_cuda_get_state(m);
    if (PyModule_AddFunctions(m, shampoo_cuda_kernel_methods) < 0 ||
        PyModule_AddFunctions(m, shampoo_cuda_packed_methods) < 0 ||
        PyModule_AddFunctions(m, shampoo_cuda_soap_methods) < 0 ||
        PyModule_AddFunctions(m, shampoo_cuda_io_methods) < 0)
        return -1;
    return shampoo_dlpack_state_init(&st->dl, 2 /* CUDA */);
}

static int cuda_traverse(PyObject *m, visitproc visit, void *arg)
{
    shampoo_cuda_module_state *st = shampoo_cuda_get_state(m);
    return st == NULL ? 0 : shampoo_dlpack_state_traverse(&st->dl, visit, arg);
}

static int cuda_clear(PyObject *m)
{
    shampoo_cuda_module_state *st = shampoo_cuda_get_state(m);
    if (st != NULL)
        shampoo_dlpack_state_clear(&st->dl);
    return 0;
}

static void cuda_free(void *m)
{
    cuda_clear((PyObject *)m);
}

static PyModuleDef_Slot cuda_slots[] = {
    {Py_mod_exec, cuda_exec},
    {0, NULL}
};

static struct PyModuleDef cuda_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "distributed_shampoo._C_cuda",
    .m_doc = "Shampoo's CUDA kernels (csrc/cuda); use distributed_shampoo._backend.",
    .m_size = sizeof(shampoo_cuda_module_state),
    .m_methods = cuda_methods,
    .m_slots = cuda_slots,
    .m_traverse = cuda_traverse,
    .m_clear = cuda_clear,
    .m_free = cuda_free,
};

PyMODINIT_FUNC PyInit__C_cuda(void)
{
    return PyModuleDef_Init(&cuda_module);
}
