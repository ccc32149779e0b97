/* Argument checks of the binding that are not about buffers: the scalars whose bad values the
 * kernels could only report as an unnamed invalid-argument status, and the sign flags of
 * torch views that DLPack does not carry. Shared by the CPU and CUDA modules (binding.h). */
#include "binding.h"

#include <math.h>

#include "../core/elementwise.h"
#include "../core/matrix_root.h"
#include "../core/parallel.h"

int shampoo_check_num_threads(const char *fn, int num_threads)
{
    if (num_threads >= 1 && num_threads <= SHAMPOO_PARALLEL_MAX_THREADS)
        return 0;
    PyErr_Format(PyExc_ValueError, "%s: argument 'num_threads' must be in [1, %d], got %d", fn,
                 SHAMPOO_PARALLEL_MAX_THREADS, num_threads);
    return -1;
}

int shampoo_check_root_config(const char *fn, const shampoo_root_config *cfg)
{
    const char *name = NULL, *range = NULL;
    double value = 0.0;
    if (isnan(cfg->epsilon))
        name = "epsilon", range = "a number, not NaN", value = cfg->epsilon;
    else if (isnan(cfg->exponent_multiplier))
        name = "exponent_multiplier", range = "a number, not NaN",
        value = cfg->exponent_multiplier;
    else if (!isfinite(cfg->bias_correction) || cfg->bias_correction == 0.0)
        name = "bias_correction", range = "finite and nonzero", value = cfg->bias_correction;
    else if (isnan(cfg->tolerance))
        name = "tolerance", range = "a number, not NaN", value = cfg->tolerance;
    else if (cfg->method == SHAMPOO_ROOT_HIGHER_ORDER && isnan(cfg->rel_epsilon))
        name = "rel_epsilon", range = "a number, not NaN", value = cfg->rel_epsilon;
    if (name != NULL) {
        PyObject *v = PyFloat_FromDouble(value);
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' must be %s, got %R", fn, name,
                     range, v);
        Py_XDECREF(v);
        return -1;
    }
    if (cfg->max_iterations < 0 || cfg->max_iterations > SHAMPOO_ROOT_MAX_ITERATIONS) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'max_iterations' must be in [0, %d], "
                     "got %lld", fn, SHAMPOO_ROOT_MAX_ITERATIONS,
                     (long long)cfg->max_iterations);
        return -1;
    }
    if (cfg->method == SHAMPOO_ROOT_HIGHER_ORDER &&
        (cfg->order < 2 || cfg->order > SHAMPOO_ROOT_MAX_TAYLOR_ORDER)) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'order' must be in [2, %d], got %lld", fn,
                     SHAMPOO_ROOT_MAX_TAYLOR_ORDER, (long long)cfg->order);
        return -1;
    }
    return 0;
}

/* torch's negative and conjugate views hold their sign in a flag that DLPack does not carry:
 * exported, the kernels would read the unflipped memory. Objects without the flags (NumPy
 * arrays) pass; a flag that does not answer a bool is not torch's and is ignored. */
int shampoo_check_sign_flags(const char *fn, const char *arg, PyObject *obj)
{
    static const char *const flags[2][2] = {{"is_neg", "resolve_neg"},
                                            {"is_conj", "resolve_conj"}};
    for (int i = 0; i < 2; i++) {
        PyObject *meth = PyObject_GetAttrString(obj, flags[i][0]);
        if (meth == NULL) {
            PyErr_Clear();
            continue;
        }
        PyObject *res = PyObject_CallNoArgs(meth);
        Py_DECREF(meth);
        int set = res != NULL ? PyObject_IsTrue(res) : -1;
        Py_XDECREF(res);
        if (set < 0) {
            PyErr_Clear();
            continue; /* not torch's flag: DLPack decides */
        }
        if (set) {
            PyErr_Format(PyExc_ValueError, "%s: argument '%s' is a %s view (torch keeps its "
                         "sign in a flag the kernels cannot see); pass %s.%s()", fn, arg,
                         i == 0 ? "negative" : "conjugate", arg, flags[i][1]);
            return -1;
        }
    }
    return 0;
}

int shampoo_check_finish_args(const char *fn, const struct shampoo_finish_params *p, int has_dir,
                              int has_grafting_state, int has_params, int has_momentum)
{
    const char *need = NULL, *when = NULL;
    if (p->graft != SHAMPOO_GRAFT_NONE && p->graft != SHAMPOO_GRAFT_SGD &&
        p->graft != SHAMPOO_GRAFT_DIAGONAL) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'graft' must be GRAFT_NONE, GRAFT_SGD or "
                     "GRAFT_DIAGONAL, got %d", fn, (int)p->graft);
        return -1;
    }
    if (p->grafting_phase && p->graft == SHAMPOO_GRAFT_NONE) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'grafting_phase' needs a grafting method "
                     "(graft is GRAFT_NONE)", fn);
        return -1;
    }
    if (!p->grafting_phase && !has_dir)
        need = "shampoo_dir", when = "outside the grafting phase";
    else if (p->graft == SHAMPOO_GRAFT_DIAGONAL && !has_grafting_state)
        need = "grafting_state", when = "for diagonal grafting";
    else if (p->decoupled_weight_decay != 0.0 && has_params == 0)
        need = "param_blocks", when = "when decoupled_weight_decay != 0";
    else if ((p->momentum != 0.0) != (has_momentum != 0))
        need = "momentum_state", when = "exactly when momentum != 0";
    if (need == NULL)
        return 0;
    PyErr_Format(PyExc_ValueError, "%s: argument '%s' must be given %s", fn, need, when);
    return -1;
}
