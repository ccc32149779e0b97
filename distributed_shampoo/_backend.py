"""The one door to the compiled kernels (distributed_shampoo._C).

Each function here makes one call into C over a whole block table (one per phase per step,
whatever the number of blocks). Tensors are torch CPU tensors or NumPy arrays, contiguous,
float32/float64 for float buffers; they cross by DLPack and are only borrowed for the call.
This module checks what callers get wrong (grad-tracking, device, layout, dtype) and names the
argument; the binding re-checks every size against the block table, so bad input raises
instead of crashing. The (op, dtype, device) -> entry point table below is the only dtype and
device dispatch in Python.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from distributed_shampoo import _C

# Block-table fields and limits (csrc/core/block_table.h).
BF_ORDER: int = _C.BF_ORDER
BF_NUMEL: int = _C.BF_NUMEL
BF_BLOCK_OFFSET: int = _C.BF_BLOCK_OFFSET
BF_FACTOR_OFFSET: int = _C.BF_FACTOR_OFFSET
BF_FACTOR_INDEX: int = _C.BF_FACTOR_INDEX
BF_PARAM_OFFSET: int = _C.BF_PARAM_OFFSET
BF_ROOT: int = _C.BF_ROOT
BF_DIMS: int = _C.BF_DIMS
BF_STRIDES: int = _C.BF_STRIDES
BF_COUNT: int = _C.BF_COUNT
MAX_ORDER: int = _C.MAX_ORDER

# Per-factor outcomes of root_inverse (csrc/core/status.h).
ROOT_OK: int = _C.ROOT_OK
ROOT_INACTIVE: int = _C.ROOT_INACTIVE
ROOT_FACTOR_NAN: int = _C.ROOT_FACTOR_NAN
ROOT_FACTOR_INF: int = _C.ROOT_FACTOR_INF
ROOT_FAILED: int = _C.ROOT_FAILED
ROOT_NONFINITE: int = _C.ROOT_NONFINITE
ROOT_MAX_ITERS: int = _C.ROOT_MAX_ITERS
ROOT_RETRIED_DOUBLE: int = _C.ROOT_RETRIED_DOUBLE

# Estimated work (multiply-adds) of one kernel call below which its num_threads is ignored
# and the calling thread runs alone (csrc/core/parallel.h).
PARALLEL_MIN_COST: int = _C.PARALLEL_MIN_COST

_ROOT_METHODS: dict[str, int] = {
    "eigen": _C.ROOT_EIGEN,
    "newton": _C.ROOT_NEWTON,
    "higher_order": _C.ROOT_HIGHER_ORDER,
}
_GRAFTS: dict[str, int] = {
    "none": _C.GRAFT_NONE,
    "sgd": _C.GRAFT_SGD,
    "diagonal": _C.GRAFT_DIAGONAL,
}

_DTYPE_NAMES: dict[Any, str] = {
    torch.float32: "float32",
    torch.float64: "float64",
    np.dtype(np.float32): "float32",
    np.dtype(np.float64): "float64",
}

# (op, dtype, device) -> entry point. CUDA kernels (distributed_shampoo._C_cuda) are added
# here as (op, dtype, "cuda") entries when that extension is built; nothing else changes.
_ENTRY: dict[tuple[str, str, str], Callable[..., Any]] = {
    (op, dtype, "cpu"): getattr(_C, f"{op}_{suffix}")
    for op in ("gather", "scatter", "factor_update", "precondition", "moments", "finish",
               "root_inverse", "root_commit")
    for dtype, suffix in (("float32", "f32"), ("float64", "f64"))
}
_DEVICES = sorted({device for _, _, device in _ENTRY})

# Most threads a kernel call may start (num_threads): far above any core count the kernels
# could use, low enough that a mistaken value cannot exhaust the process's threads.
_MAX_THREADS = 1024


def _scipy_blas_controller() -> ThreadpoolController:
    """threadpoolctl's handle on the OpenBLAS that SciPy's capsules (our BLAS table) belong to."""
    everything = ThreadpoolController()
    scipy_blas = ThreadpoolController.__new__(ThreadpoolController)
    scipy_blas.lib_controllers = [
        lib
        for lib in everything.lib_controllers
        if lib.user_api == "blas" and "scipy.libs" in str(lib.filepath)
    ]
    return scipy_blas


_SCIPY_BLAS = _scipy_blas_controller()


def single_threaded_blas() -> Any:
    """A context in which SciPy's BLAS/LAPACK (our kernels' provider) uses one thread.

    Measured on 2 cores (benchmarks/bench_step.py, README): with torch's OpenMP threads
    and OpenBLAS's threads competing, a 1024x1024 float32 inverse root took 2.5 s instead
    of 0.19 s, and the factor update 3x longer. The kernels parallelise across blocks
    themselves (the num_threads argument of factor_update, root_inverse and precondition),
    so BLAS is kept to one thread inside the optimizer step; the user's own SciPy calls
    outside the step are unaffected.
    """
    return _SCIPY_BLAS.limit(limits=1)


def check_device_supported(device: torch.device, name: str) -> None:
    """Raises TypeError naming `name` unless kernels exist for `device`."""
    if torch.device(device).type not in _DEVICES:
        raise TypeError(
            f"{name} are on device {device}; the compiled kernels support: {', '.join(_DEVICES)}"
        )


def _check(fn: str, name: str, t: Any) -> None:
    """What DLPack cannot report well: grad tracking, device, layout (torch and NumPy)."""
    if isinstance(t, torch.Tensor):
        if t.requires_grad:
            raise TypeError(f"{fn}: argument '{name}' requires grad; pass {name}.detach()")
        # is_cpu is ~4x cheaper than device.type; the device is looked at only off CPU
        if not t.is_cpu and t.device.type not in _DEVICES:
            raise TypeError(
                f"{fn}: argument '{name}' is on device {t.device}; "
                f"supported devices: {', '.join(_DEVICES)}"
            )
        if not t.is_contiguous():
            raise ValueError(f"{fn}: argument '{name}' is not contiguous; pass .contiguous()")
    elif isinstance(t, np.ndarray) and not t.flags.c_contiguous:
        raise ValueError(f"{fn}: argument '{name}' is not C-contiguous; use np.ascontiguousarray")


def _entry(op: str, name: str, t: Any) -> Callable[..., Any]:
    """The kernel for `op` at the dtype and device of float buffer `t` (argument `name`)."""
    dtype = _DTYPE_NAMES.get(getattr(t, "dtype", None))
    device = "cpu" if not isinstance(t, torch.Tensor) or t.is_cpu else t.device.type
    kernel = _ENTRY.get((op, dtype, device)) if dtype is not None else None
    if kernel is None:
        supported = sorted({f"{d} on {v}" for o, d, v in _ENTRY if o == op})
        raise TypeError(
            f"{op}: argument '{name}' has dtype {getattr(t, 'dtype', type(t).__name__)} on "
            f"device {device}; supported: {', '.join(supported)}"
        )
    return kernel


def _checked(op: str, names: Sequence[str], tensors: Sequence[Any]) -> None:
    for name, t in zip(names, tensors):
        if t is not None:
            _check(op, name, t)


def _thread_count(op: str, num_threads: int) -> int:
    """num_threads as the C int the kernels take (threads across blocks, caller included)."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
        raise TypeError(f"{op}: argument 'num_threads' must be an int, got {type(num_threads).__name__}")
    if not 1 <= num_threads <= _MAX_THREADS:
        raise ValueError(f"{op}: argument 'num_threads' must be in [1, {_MAX_THREADS}], got {num_threads}")
    return int(num_threads)


def merge_small_dims(shape: Sequence[int], threshold: int) -> tuple[int, ...]:
    """SPEC B §2.1: drop size-1 dims, then greedily merge neighbours while <= threshold."""
    return _C.merge_small_dims(shape, int(threshold))


def block_plan(shape: Sequence[int], max_dim: int) -> np.ndarray:
    """SPEC B §2.2 blocks of a tensor of `shape` split by `max_dim`, as an int64 block table
    (n_blocks, BF_COUNT) with offsets relative to the tensor and ROOT left 0."""
    table = np.zeros((_C.block_count(shape, int(max_dim)), BF_COUNT), dtype=np.int64)
    _C.block_plan(shape, int(max_dim), table)
    return table


def validate_table(
    table: Any, *, block_numel: int = -1, factor_numel: int = -1, factor_count: int = -1,
    param_numel: int = -1,
) -> None:
    """ValueError unless every table row is well formed and fits buffers of these sizes
    (-1 skips a size)."""
    _check("validate_table", "table", table)
    _C.table_validate(table, block_numel, factor_numel, factor_count, param_numel)


def gather(
    grad_blocks: Any, param_blocks: Any | None, grad_flat: Any, param_flat: Any | None,
    table: Any, active: Any, l2_weight_decay: float,
) -> int:
    """Param-layout gradient (and parameter) into block layout, plus L2 decay (SPEC §4.3).
    Returns the first active block whose gradient holds NaN/Inf, or -1."""
    args = (grad_blocks, param_blocks, grad_flat, param_flat, table, active)
    _checked("gather", ("grad_blocks", "param_blocks", "grad_flat", "param_flat", "table",
                        "active"), args)
    return _entry("gather", "grad_blocks", grad_blocks)(*args, float(l2_weight_decay))


def scatter(flat: Any, blocks: Any, table: Any, active: Any) -> None:
    """Block layout into the parameters' layout, for every active block (gather's inverse)."""
    args = (flat, blocks, table, active)
    _checked("scatter", ("flat", "blocks", "table", "active"), args)
    _entry("scatter", "flat", flat)(*args)


def factor_update(
    factors_out: Any, factors_in: Any, grads: Any, table: Any, active: Any, beta2: float, *,
    num_threads: int = 1,
) -> None:
    """F_k <- beta2 F_k + (1 - beta2) U_k U_k^T (or F_k + U_k U_k^T if beta2 == 1), SPEC §4.4.
    factors_out may be factors_in (in place). num_threads: threads across blocks (see
    single_threaded_blas); the result is bitwise the same for every value."""
    args = (factors_out, factors_in, grads, table, active)
    _checked("factor_update", ("factors_out", "factors_in", "grads", "table", "active"), args)
    threads = _thread_count("factor_update", num_threads)
    _entry("factor_update", "factors_out", factors_out)(*args, float(beta2), threads)


def root_inverse(
    out: Any, factors: Any, table: Any, active: Any, *, method: str, epsilon: float,
    exponent_multiplier: float, bias_correction: float, make_positive_semidefinite: bool,
    retry_double_precision: bool, max_iterations: int, tolerance: float, rel_epsilon: float,
    order: int, is_diagonal: Any, status_out: Any, num_threads: int = 1,
) -> None:
    """Inverse roots of every factor of every active block into `out` (scratch), one
    ROOT_* status per factor in `status_out` (int32); see csrc/core/matrix_root.h.
    num_threads: threads across blocks; results are bitwise the same for every value."""
    code = _ROOT_METHODS.get(method)
    if code is None:
        raise ValueError(
            f"root_inverse: argument 'method' must be one of {sorted(_ROOT_METHODS)}, got {method!r}"
        )
    args = (out, factors, table, active, is_diagonal, status_out)
    _checked("root_inverse", ("out", "factors", "table", "active", "is_diagonal",
                              "status_out"), args)
    threads = _thread_count("root_inverse", num_threads)
    _entry("root_inverse", "out", out)(
        *args, code, float(epsilon), float(exponent_multiplier), float(bias_correction),
        bool(make_positive_semidefinite), bool(retry_double_precision), int(max_iterations),
        float(tolerance), float(rel_epsilon), int(order), threads,
    )


def root_commit(dst: Any, src: Any, table: Any, commit: Any) -> None:
    """Per factor: commit[f] ? dst[f] <- src[f] : src[f] <- dst[f] (factor layout)."""
    args = (dst, src, table, commit)
    _checked("root_commit", ("dst", "src", "table", "commit"), args)
    _entry("root_commit", "dst", dst)(*args)


def precondition(
    out: Any, grads: Any, inv_roots: Any, table: Any, active: Any, *, num_threads: int = 1
) -> None:
    """out = G x_0 Q_0 ... x_{d-1} Q_{d-1} per active block (SPEC §4.8); order 0: out = G.
    num_threads: threads across blocks; the result is bitwise the same for every value."""
    args = (out, grads, inv_roots, table, active)
    _checked("precondition", ("out", "grads", "inv_roots", "table", "active"), args)
    threads = _thread_count("precondition", num_threads)
    _entry("precondition", "out", out)(*args, threads)


def moments(
    grads: Any, grafting_state: Any | None, filtered_grad: Any | None, table: Any,
    active: Any, *, update_grafting_state: bool, grafting_beta2: float, beta1: float,
    beta3: float, bias_correction1: float,
) -> None:
    """Grafting accumulator (SPEC §4.5), filtered gradient and bias correction (§4.7), in
    place: grads becomes G_hat."""
    args = (grads, grafting_state, filtered_grad, table, active)
    _checked("moments", ("grads", "grafting_state", "filtered_grad", "table", "active"), args)
    _entry("moments", "grads", grads)(
        *args, bool(update_grafting_state), float(grafting_beta2), float(beta1), float(beta3),
        float(bias_correction1),
    )


def finish(
    update_flat: Any, grads: Any, shampoo_dir: Any | None, grafting_state: Any | None,
    param_blocks: Any | None, momentum_state: Any | None, table: Any, active: Any, *,
    graft: str, grafting_phase: bool, grafting_bias_correction: float, grafting_epsilon: float,
    decoupled_weight_decay: float, momentum: float, dampening: float, nesterov: bool,
    lr: float,
) -> None:
    """Grafting, decoupled weight decay, momentum and -lr (SPEC §4.8-§4.11); writes the update
    of every active block into update_flat (param layout)."""
    code = _GRAFTS.get(graft)
    if code is None:
        raise ValueError(f"finish: argument 'graft' must be one of {sorted(_GRAFTS)}, got {graft!r}")
    args = (update_flat, grads, shampoo_dir, grafting_state, param_blocks, momentum_state,
            table, active)
    _checked("finish", ("update_flat", "grads", "shampoo_dir", "grafting_state",
                        "param_blocks", "momentum_state", "table", "active"), args)
    _entry("finish", "update_flat", update_flat)(
        *args, code, bool(grafting_phase), float(grafting_bias_correction),
        float(grafting_epsilon), float(decoupled_weight_decay), float(momentum),
        float(dampening), bool(nesterov), float(lr),
    )
