/* Fills the shampoo_linalg table from SciPy's exported Fortran BLAS/LAPACK (capsules in
 * scipy.linalg.cython_blas / cython_lapack.__pyx_capi__), refusing unexpected signatures. */
#include "binding.h" /* Python.h first, as CPython requires */

#include <string.h>

/* The capsule names (= C signatures) of SciPy's PyPI wheels: 32-bit Fortran integers, every
 * argument by pointer; `s`/`d` are SciPy's typedefs for float/double. */
static const char SIG_SGEMM[] =
    "void (char *, char *, int *, int *, int *, __pyx_t_5scipy_6linalg_11cython_blas_s *, "
    "__pyx_t_5scipy_6linalg_11cython_blas_s *, int *, __pyx_t_5scipy_6linalg_11cython_blas_s *, "
    "int *, __pyx_t_5scipy_6linalg_11cython_blas_s *, __pyx_t_5scipy_6linalg_11cython_blas_s *, "
    "int *)";
static const char SIG_DGEMM[] =
    "void (char *, char *, int *, int *, int *, __pyx_t_5scipy_6linalg_11cython_blas_d *, "
    "__pyx_t_5scipy_6linalg_11cython_blas_d *, int *, __pyx_t_5scipy_6linalg_11cython_blas_d *, "
    "int *, __pyx_t_5scipy_6linalg_11cython_blas_d *, __pyx_t_5scipy_6linalg_11cython_blas_d *, "
    "int *)";
static const char SIG_SSYRK[] =
    "void (char *, char *, int *, int *, __pyx_t_5scipy_6linalg_11cython_blas_s *, "
    "__pyx_t_5scipy_6linalg_11cython_blas_s *, int *, __pyx_t_5scipy_6linalg_11cython_blas_s *, "
    "__pyx_t_5scipy_6linalg_11cython_blas_s *, int *)";
static const char SIG_DSYRK[] =
    "void (char *, char *, int *, int *, __pyx_t_5scipy_6linalg_11cython_blas_d *, "
    "__pyx_t_5scipy_6linalg_11cython_blas_d *, int *, __pyx_t_5scipy_6linalg_11cython_blas_d *, "
    "__pyx_t_5scipy_6linalg_11cython_blas_d *, int *)";
static const char SIG_SSYEVD[] =
    "void (char *, char *, int *, __pyx_t_5scipy_6linalg_13cython_lapack_s *, int *, "
    "__pyx_t_5scipy_6linalg_13cython_lapack_s *, __pyx_t_5scipy_6linalg_13cython_lapack_s *, "
    "int *, int *, int *, int *)";
static const char SIG_DSYEVD[] =
    "void (char *, char *, int *, __pyx_t_5scipy_6linalg_13cython_lapack_d *, int *, "
    "__pyx_t_5scipy_6linalg_13cython_lapack_d *, __pyx_t_5scipy_6linalg_13cython_lapack_d *, "
    "int *, int *, int *, int *)";

#define LAPACK_T(x) "__pyx_t_5scipy_6linalg_13cython_lapack_" #x " *"
static const char SIG_SGEQRF[] = "void (int *, int *, " LAPACK_T(s) ", int *, " LAPACK_T(s) ", "
                                 LAPACK_T(s) ", int *, int *)";
static const char SIG_DGEQRF[] = "void (int *, int *, " LAPACK_T(d) ", int *, " LAPACK_T(d) ", "
                                 LAPACK_T(d) ", int *, int *)";
static const char SIG_SORGQR[] = "void (int *, int *, int *, " LAPACK_T(s) ", int *, " LAPACK_T(s)
                                 ", " LAPACK_T(s) ", int *, int *)";
static const char SIG_DORGQR[] = "void (int *, int *, int *, " LAPACK_T(d) ", int *, " LAPACK_T(d)
                                 ", " LAPACK_T(d) ", int *, int *)";

/* scipy.linalg.<module>.__pyx_capi__ (new reference), or NULL with ImportError set. */
static PyObject *capi_dict(const char *module)
{
    PyObject *mod = PyImport_ImportModule(module);
    if (mod == NULL)
        return NULL;
    PyObject *capi = PyObject_GetAttrString(mod, "__pyx_capi__");
    Py_DECREF(mod);
    if (capi == NULL || !PyDict_Check(capi)) {
        Py_XDECREF(capi);
        PyErr_Format(PyExc_ImportError, "distributed_shampoo._C: %s has no __pyx_capi__ "
                     "dict; SciPy's BLAS/LAPACK cannot be reached", module);
        return NULL;
    }
    return capi;
}

/* The function pointer in capi[name] if its signature is `sig`; else NULL with ImportError. */
static void *capsule_fn(PyObject *capi, const char *module, const char *name, const char *sig)
{
    PyObject *cap = PyDict_GetItemString(capi, name); /* borrowed */
    if (cap == NULL || !PyCapsule_CheckExact(cap)) {
        PyErr_Format(PyExc_ImportError, "distributed_shampoo._C: %s does not export %s",
                     module, name);
        return NULL;
    }
    const char *got = PyCapsule_GetName(cap);
    if (got == NULL || strcmp(got, sig) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ImportError, "distributed_shampoo._C: %s.%s has signature '%s'; "
                     "expected '%s' (32-bit integer LAPACK/BLAS as in SciPy's PyPI wheels)",
                     module, name, got != NULL ? got : "(none)", sig);
        return NULL;
    }
    return PyCapsule_GetPointer(cap, sig);
}

int shampoo_linalg_load(shampoo_module_state *st)
{
    static const char blas[] = "scipy.linalg.cython_blas", lapack[] = "scipy.linalg.cython_lapack";
    void *p;
    st->blas_capi = capi_dict(blas);
    if (st->blas_capi == NULL)
        return -1;
    st->lapack_capi = capi_dict(lapack);
    if (st->lapack_capi == NULL)
        return -1;
    /* Object-to-function pointer conversion: the capsules hold function addresses. */
    if ((p = capsule_fn(st->blas_capi, blas, "sgemm", SIG_SGEMM)) == NULL)
        return -1;
    st->la.sgemm = (shampoo_sgemm_fn)p;
    if ((p = capsule_fn(st->blas_capi, blas, "dgemm", SIG_DGEMM)) == NULL)
        return -1;
    st->la.dgemm = (shampoo_dgemm_fn)p;
    if ((p = capsule_fn(st->blas_capi, blas, "ssyrk", SIG_SSYRK)) == NULL)
        return -1;
    st->la.ssyrk = (shampoo_ssyrk_fn)p;
    if ((p = capsule_fn(st->blas_capi, blas, "dsyrk", SIG_DSYRK)) == NULL)
        return -1;
    st->la.dsyrk = (shampoo_dsyrk_fn)p;
    if ((p = capsule_fn(st->lapack_capi, lapack, "ssyevd", SIG_SSYEVD)) == NULL)
        return -1;
    st->la.ssyevd = (shampoo_ssyevd_fn)p;
    if ((p = capsule_fn(st->lapack_capi, lapack, "dsyevd", SIG_DSYEVD)) == NULL)
        return -1;
    st->la.dsyevd = (shampoo_dsyevd_fn)p;
    if ((p = capsule_fn(st->lapack_capi, lapack, "sgeqrf", SIG_SGEQRF)) == NULL)
        return -1;
    st->la.sgeqrf = (shampoo_sgeqrf_fn)p;
    if ((p = capsule_fn(st->lapack_capi, lapack, "dgeqrf", SIG_DGEQRF)) == NULL)
        return -1;
    st->la.dgeqrf = (shampoo_dgeqrf_fn)p;
    if ((p = capsule_fn(st->lapack_capi, lapack, "sorgqr", SIG_SORGQR)) == NULL)
        return -1;
    st->la.sorgqr = (shampoo_sorgqr_fn)p;
    if ((p = capsule_fn(st->lapack_capi, lapack, "dorgqr", SIG_DORGQR)) == NULL)
        return -1;
    st->la.dorgqr = (shampoo_dorgqr_fn)p;
    return 0;
}
