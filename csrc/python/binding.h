/* Private declarations shared by the binding's files (binding.c, tensor_args.c,
 * linalg_scipy.c): module state, borrowed tensor views, argument specs. Python-side only. */
#ifndef SHAMPOO_BINDING_H
#define SHAMPOO_BINDING_H

#define PY_SSIZE_T_CLEAN
/* Stable ABI (3.10+) only, so that an abi3 wheel is one setup.py flag away. */
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000
#endif
#include <Python.h>
#include <stdint.h>

#include "../core/linalg.h"
#include "../core/status.h"

/* What borrowing tensors needs (tensor_args.c); each module's state embeds one. */
typedef struct shampoo_dlpack_state {
    PyObject *dlpack_name;      /* "__dlpack__" */
    PyObject *dlpack_kwargs;    /* {"max_version": (1, 0)} (+ "stream": -1 for CUDA) */
    PyObject *empty_tuple;
    int device_type;            /* DLPack device of the kernels' buffers: 1 CPU, 2 CUDA */
    PyObject *known_types[2];   /* torch.Tensor, numpy.ndarray (NULL if not importable) */
} shampoo_dlpack_state;

/* 1 if obj is exactly a torch.Tensor or numpy.ndarray, whose __dlpack__ runs no user code
 * (dlpack_state.c), else 0. */
int shampoo_known_exporter(const shampoo_dlpack_state *st, PyObject *obj);

/* Fills st (new references) for kernels whose buffers live on device_type; -1 on error
 * (dlpack_state.c, as are the next two). */
int shampoo_dlpack_state_init(shampoo_dlpack_state *st, int device_type);
void shampoo_dlpack_state_clear(shampoo_dlpack_state *st);
int shampoo_dlpack_state_traverse(shampoo_dlpack_state *st, visitproc visit, void *arg);

typedef struct shampoo_module_state {
    shampoo_linalg la;          /* filled once at import from SciPy's capsules */
    PyObject *blas_capi;        /* scipy.linalg.cython_blas.__pyx_capi__ (keeps pointers alive) */
    PyObject *lapack_capi;      /* scipy.linalg.cython_lapack.__pyx_capi__ */
    shampoo_dlpack_state dl;
} shampoo_module_state;

/* What an argument holds; the element type follows from it. */
typedef enum shampoo_arg_kind {
    SHAMPOO_ARG_REAL,   /* float32 or float64, the same for every REAL argument of a call */
    SHAMPOO_ARG_TABLE,  /* int64 [nblocks, SHAMPOO_BF_COUNT] */
    SHAMPOO_ARG_MASK,   /* uint8 or bool, one per block or per factor */
    SHAMPOO_ARG_INT32,  /* int32, one per factor */
    SHAMPOO_ARG_INT64,  /* int64, any length (a batch plan, a failure flag) */
    SHAMPOO_ARG_BYTES,  /* uint8 scratch of any length */
    SHAMPOO_ARG_DOUBLE, /* float64 whatever the call's REAL width (sums kept in double) */
    SHAMPOO_ARG_IO      /* a parameter or gradient read in place: REAL, or bfloat16 with
                           float32 kernels (tensor_list.c) */
} shampoo_arg_kind;

/* Which block-table extent an argument's length must cover. */
typedef enum shampoo_arg_layout {
    SHAMPOO_LAYOUT_NONE,       /* the table itself */
    SHAMPOO_LAYOUT_BLOCK,      /* block layout */
    SHAMPOO_LAYOUT_FACTOR,     /* factor layout */
    SHAMPOO_LAYOUT_PARAM,      /* param layout */
    SHAMPOO_LAYOUT_PER_FACTOR, /* one entry per factor */
    SHAMPOO_LAYOUT_PER_BLOCK   /* exactly nblocks entries */
} shampoo_arg_layout;

enum {
    SHAMPOO_ARG_OUT = 1,       /* written by the kernel: must be writable, must not overlap
                                  any other argument */
    SHAMPOO_ARG_OPTIONAL = 2,  /* None allowed (NULL pointer) */
    SHAMPOO_ARG_ALIAS_OK = 4,  /* may be exactly the same buffer as another ALIAS_OK argument */
    SHAMPOO_ARG_HOST = 8       /* in host memory even when the kernels' buffers are on a GPU */
};

typedef struct shampoo_arg_spec {
    const char *name;
    shampoo_arg_kind kind;
    shampoo_arg_layout layout;
    int flags;
} shampoo_arg_spec;

/* One argument borrowed for the length of a call. */
typedef struct shampoo_view {
    PyObject *capsule; /* owned; renamed "used_..." so that nobody else consumes it */
    void *managed;     /* the managed tensor we own (deleter called at release), or NULL */
    int versioned;     /* managed is a DLManagedTensorVersioned (else the legacy struct) */
    void *data;        /* NULL for None */
    int64_t numel;
    int64_t rows;      /* the table's row count */
    int elsize;        /* bytes per element */
    int readonly;
    int device_type;   /* DLPack device type and id of the buffer */
    int device_id;
    double empty[1];   /* stands in for the data pointer of a zero-element buffer */
} shampoo_view;

#define SHAMPOO_MAX_ARGS 12

/* The views of one call, and the block count of its table. */
typedef struct shampoo_call {
    const char *fn;
    int nargs;
    int real_bits; /* 32 or 64 */
    int64_t nblocks;
    int device_id; /* DLPack device id of the device buffers (-1 until one is seen) */
    shampoo_view views[SHAMPOO_MAX_ARGS];
} shampoo_call;

/* Borrows objs[i] per specs[i], checks kinds, dtypes, devices, layout, lengths against the
 * (host) table and overlaps. Returns 0, or -1 with an exception set; call shampoo_call_release either way. */
int shampoo_call_bind(shampoo_call *call, shampoo_dlpack_state *st, const char *fn,
                      const shampoo_arg_spec *specs, PyObject *const *objs, int nargs,
                      int real_bits);
void shampoo_call_release(shampoo_call *call);

/* The scalar arguments of the root-inverse kernels (arg_checks.c), checked where a bad
 * value would only come back as an unnamed invalid-argument status: 0, or -1 with a
 * ValueError naming the argument and its allowed range. Shared with the CUDA binding. */
struct shampoo_root_config;
int shampoo_check_root_config(const char *fn, const struct shampoo_root_config *cfg);
/* num_threads of the parallel kernels: 1..SHAMPOO_PARALLEL_MAX_THREADS, else -1 and a
 * ValueError. */
int shampoo_check_num_threads(const char *fn, int num_threads);
/* The finish kernels' scalars against the buffers they need (has_*: that argument was given;
 * has_params < 0: the kernel reads the parameters in place, nothing to give): 0, or -1 with
 * a ValueError naming the argument (arg_checks.c). Shared by every finish binding. */
struct shampoo_finish_params;
int shampoo_check_finish_args(const char *fn, const struct shampoo_finish_params *p, int has_dir,
                              int has_grafting_state, int has_params, int has_momentum);
/* 0, or -1 with a ValueError when obj is a torch negative or conjugate view (arg_checks.c). */
int shampoo_check_sign_flags(const char *fn, const char *arg, PyObject *obj);

/* Borrows one int64 2-D [rows, SHAMPOO_BF_COUNT] table argument (block_plan, validate). */
int shampoo_view_table(shampoo_view *v, shampoo_dlpack_state *st, const char *fn,
                       const char *arg, PyObject *obj, int writable);
void shampoo_view_release(shampoo_view *v);
/* Borrows one argument per spec (any kind); 0, or -1 with an exception set. Release it with
 * shampoo_view_release either way. */
int shampoo_view_get(shampoo_view *v, shampoo_dlpack_state *st, const char *fn,
                     const shampoo_arg_spec *spec, PyObject *obj, int real_bits);

static inline shampoo_module_state *shampoo_get_state(PyObject *module)
{
    return (shampoo_module_state *)PyModule_GetState(module);
}

/* The data pointer of a bound argument (NULL for None). */
static inline void *shampoo_arg(shampoo_call *call, int i)
{
    return call->views[i].data;
}

/* Ends a call: releases its views; returns ok on SHAMPOO_OK, else raises through `raise`. */
static inline PyObject *shampoo_call_done(shampoo_call *call, shampoo_status st, PyObject *ok,
                                          PyObject *(*raise)(const char *, shampoo_status))
{
    PyObject *result = st == SHAMPOO_OK ? ok : raise(call->fn, st);
    if (st != SHAMPOO_OK)
        Py_XDECREF(ok);
    shampoo_call_release(call);
    return result;
}

/* Ends a call whose arguments were refused (exception already set): NULL. */
static inline PyObject *shampoo_call_failed(shampoo_call *call)
{
    shampoo_call_release(call);
    return NULL;
}

/* The exported twins of an op: each fixes the float width and its own name for messages,
 * for an `op(module, args, bits, name)` defined in the including file. */
#define SHAMPOO_TWINS(op)                                                                    \
    static PyObject *op##_f32(PyObject *m, PyObject *a) { return op(m, a, 32, #op "_f32"); } \
    static PyObject *op##_f64(PyObject *m, PyObject *a) { return op(m, a, 64, #op "_f64"); }

/* Their two method-table entries. */
#define SHAMPOO_TWIN_ENTRIES(op, doc)                                                        \
    {#op "_f32", op##_f32, METH_VARARGS, doc ", float32"},                                   \
    {#op "_f64", op##_f64, METH_VARARGS, doc ", float64"}

/* The float kernels' entry points (kernel_ops.c), added to the module at exec. */
extern PyMethodDef shampoo_kernel_methods[];
/* The packed-storage kernels' entry points (packed_ops.c), likewise. */
extern PyMethodDef shampoo_packed_methods[];
/* The pointer-table kernels' entry points (param_io_ops.c), likewise. */
extern PyMethodDef shampoo_param_io_methods[];
/* The eigenvalue-corrected Shampoo kernels' entry points (soap_ops.c), likewise. */
extern PyMethodDef shampoo_soap_methods[];

/* Fills st->la from SciPy, checking each capsule's signature; ImportError on mismatch. */
int shampoo_linalg_load(shampoo_module_state *st);

/* Sets the Python exception for a kernel status; returns NULL. */
PyObject *shampoo_raise_status(const char *fn, shampoo_status status);

#endif
