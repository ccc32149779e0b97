"""The one door to the compiled kernels (distributed_shampoo._C, and _C_cuda when built).

Each function here makes one call into C over a whole block table (one per phase per step,
whatever the number of blocks). Tensors are torch CPU tensors or NumPy arrays (the CPU
kernels) or torch CUDA tensors (the CUDA kernels, on torch's current stream, with scratch
allocated here through torch), contiguous, float32/float64 for float buffers; they cross by
DLPack and are only borrowed for the call. CUDA calls need the table as a KernelTable (the
host copy the binding checks sizes against, a device copy and the batch plan).
This module checks what callers get wrong (grad-tracking, device, layout, dtype) and names the
argument; the binding re-checks every size against the block table, so bad input raises
instead of crashing. The (op, dtype, device) -> entry point table below is the only dtype and
device dispatch in Python.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from distributed_shampoo import _C

try:  # built only where a CUDA toolkit was found at install time
    from distributed_shampoo import _C_cuda
except ImportError:
    _C_cuda = None

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

# Batch-plan layout (csrc/core/batch_plan.h).
PLAN_HEADER: int = _C.PLAN_HEADER
PLAN_GROUP_FIELDS: int = _C.PLAN_GROUP_FIELDS
PG_ORDER: int = _C.PG_ORDER
PG_COUNT: int = _C.PG_COUNT
PG_FIRST: int = _C.PG_FIRST
PG_NUMEL: int = _C.PG_NUMEL
PG_DIMS: int = _C.PG_DIMS

# A failure flag (int64[2], csrc/cuda/shampoo_cuda.h) with no failure recorded.
FAIL_NONE: int = 2**63 - 1
# Bytes handed to cuBLAS as its workspace per call (NVIDIA's recommendation for Hopper).
_CUBLAS_WORKSPACE_BYTES = 32 * 1024 * 1024

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
_OPS = ("gather", "scatter", "factor_update", "precondition", "moments", "finish",
        "root_inverse", "sym_unpack", "sym_pack", "packed_commit")
_ENTRY: dict[tuple[str, str, str], Callable[..., Any]] = {
    (op, dtype, device): getattr(module, f"{op}_{suffix}")
    for device, module in (("cpu", _C), ("cuda", _C_cuda))
    if module is not None
    for op in _OPS + (("factor_update_packed", "packed_select") if device == "cpu" else ())
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


def cuda_available() -> bool:
    """Whether CUDA parameters can use the CUDA kernels: _C_cuda was built and a GPU is
    visible to torch."""
    return _C_cuda is not None and torch.cuda.is_available()


def batch_plan(table: Any) -> np.ndarray:
    """The blocks of an int64 block table grouped by shape (csrc/core/batch_plan.h)."""
    return np.frombuffer(_C.batch_plan(table), dtype=np.int64).copy()


class KernelTable:
    """A block table as the kernels of one device take it: the host copy (the binding checks
    buffer sizes against it and the GPU kernels plan their launches from it), a copy on the
    device, and the batch plan in both places. Built once per engine; on CUDA the copies
    to the device happen here, never in a step."""

    def __init__(self, table: Any, device: torch.device | str) -> None:
        host = torch.as_tensor(np.asarray(table, dtype=np.int64)).contiguous()
        _C.table_validate(host, -1, -1, -1, -1)
        self.host = host
        self.nblocks = int(host.shape[0])
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.plan_host = torch.from_numpy(batch_plan(host))
        if self.device.type == "cpu":
            self.device_table, self.plan_device = self.host, self.plan_host
        else:
            self.device_table = host.to(self.device)
            self.plan_device = self.plan_host.to(self.device)
        self._workspace_bytes: dict[tuple[str, int], int] = {}
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None

    def packed_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each block's offset in the packed layout (csrc/core/sym_pack.h): device and host."""
        if self._packed is None:
            rows = self.host.numpy()
            dims = rows[:, BF_DIMS : BF_DIMS + MAX_ORDER]  # unused dims are 0
            sizes = (dims * (dims + 1) // 2).sum(axis=1) if len(rows) else np.zeros(0, np.int64)
            host = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
            self._packed = (host.to(self.device), host)
        return self._packed

    def workspace(self, op: str, bits: int) -> torch.Tensor | None:
        """Device scratch for one call of `op`, from torch's caching allocator (sizes are
        computed once per op and width; the allocation is reused by the allocator)."""
        key = (op, bits)
        nbytes = self._workspace_bytes.get(key)
        if nbytes is None:
            nbytes = self._workspace_bytes[key] = _C_cuda.workspace_bytes(
                op, _stream(self.device), self.device.index or 0, self.host, self.plan_host, bits
            )
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device) if nbytes else None


def new_failure_flag(device: torch.device | str) -> torch.Tensor:
    """A step failure flag for the CUDA kernels (csrc/cuda/shampoo_cuda.h), no failure set."""
    return torch.full((2,), FAIL_NONE, dtype=torch.int64, device=device)


def _library_candidates(stem: str) -> list[str]:
    """Where cuBLAS / cuSOLVER (stem "libcublas" / "libcusolver") may be, best first: the
    copy this process already loaded (torch's own), NVIDIA's pip wheels on sys.path, the
    toolkit, then the bare sonames for the dynamic loader."""
    found: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith(f"{stem}.so") and path not in found:
                    found.append(path)
    except OSError:
        pass
    roots = [os.path.join(entry, "nvidia") for entry in sys.path if entry]
    roots += [os.path.join(os.path.dirname(torch.__file__), "lib")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            roots.append(os.path.join(home, "lib64"))
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "**", f"{stem}.so*"), recursive=True)):
            if path not in found:
                found.append(path)
    found += [f"{stem}.so.{major}" for major in (13, 12, 11)] + [f"{stem}.so"]
    return found


# The cuSOLVER soname major of each cuBLAS soname major's CUDA release (CUDA 13 ships
# libcublas.so.13 with libcusolver.so.12, CUDA 12 .so.12 with .so.11, CUDA 11 .so.11 with .so.11).
_MATCHED_CUSOLVER_MAJOR = {"13": "12", "12": "11", "11": "11"}


def _soname_major(path: str, stem: str) -> str:
    """The major version in a library file name (libcublas.so.13.1.0 -> "13"; "" if none)."""
    rest = os.path.basename(path)[len(stem) + len(".so"):]
    return rest.split(".")[1] if rest.startswith(".") and len(rest.split(".")) > 1 else ""


def _library_pairs(cublas: list[str], cusolver: list[str]) -> list[tuple[str, str]]:
    """(cuBLAS, cuSOLVER) pairs of one CUDA release, best first: for each cuBLAS candidate in
    order, the cuSOLVER candidates of the matching major, those in the same folder (one
    toolkit or wheel) or the same NVIDIA package root first. A cuBLAS without a version pairs
    only with an unversioned cuSOLVER. Never pairs across releases."""
    pairs: list[tuple[str, str]] = []
    for blas in cublas:
        want = _MATCHED_CUSOLVER_MAJOR.get(_soname_major(blas, "libcublas"), None)
        if _soname_major(blas, "libcublas") == "":
            want = ""
        if want is None:
            continue
        matches = [s for s in cusolver if _soname_major(s, "libcusolver") == want]
        blas_dir = os.path.dirname(blas)
        blas_root = os.path.dirname(os.path.dirname(blas_dir))

        def rank(path: str, blas_dir: str = blas_dir, blas_root: str = blas_root) -> int:
            folder = os.path.dirname(path)
            if folder == blas_dir:
                return 0
            if blas_dir and os.path.dirname(os.path.dirname(folder)) == blas_root:
                return 1
            return 2 if not folder and not blas_dir else 3

        for solver in sorted(matches, key=rank):
            if (blas, solver) not in pairs:
                pairs.append((blas, solver))
    return pairs


_cuda_ready = False


def _ensure_cuda_libraries() -> None:
    """Loads cuBLAS and cuSOLVER into _C_cuda on first CUDA use (ImportError if absent)."""
    global _cuda_ready
    if not _cuda_ready:
        pairs = _library_pairs(_library_candidates("libcublas"), _library_candidates("libcusolver"))
        _C_cuda.load_libraries([b for b, _ in pairs], [s for _, s in pairs])
        _cuda_ready = True


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _is_cuda(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_cuda


def _host_table(table: Any) -> Any:
    return table.host if isinstance(table, KernelTable) else table


def _cuda_table(op: str, table: Any, like: torch.Tensor) -> KernelTable:
    """The KernelTable a CUDA call needs, on the device of `like`."""
    if not isinstance(table, KernelTable):
        raise TypeError(f"{op}: argument 'table' must be a KernelTable for CUDA tensors")
    if table.device.type != like.device.type or table.device.index != like.device.index:
        raise ValueError(f"{op}: argument 'table' is for {table.device}, the buffers are on {like.device}")
    _ensure_cuda_libraries()
    return table


# cuBLAS's workspace per (device, stream), allocated once: cuBLAS may use it until the
# stream's work is done, and each call hands it over again (cublasSetWorkspace).
_BLAS_WORKSPACES: dict[tuple[int, int], torch.Tensor] = {}


def _blas_workspace(device: torch.device) -> torch.Tensor:
    key = (device.index or 0, _stream(device))
    workspace = _BLAS_WORKSPACES.get(key)
    if workspace is None:
        workspace = _BLAS_WORKSPACES[key] = torch.empty(
            _CUBLAS_WORKSPACE_BYTES, dtype=torch.uint8, device=device
        )
    return workspace


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
    table: Any, active: Any, l2_weight_decay: float, *, step: int = 0, fail: Any = None,
    sq_norms: Any = None,
) -> int:
    """Param-layout gradient (and parameter) into block layout, plus L2 decay (SPEC §4.3).
    Returns the first active block whose gradient holds NaN/Inf, or -1. On CUDA the host
    does not wait for that answer: `fail` (new_failure_flag) records it for step `step`
    instead, and -1 is returned. `sq_norms` (float64, one per block, optional) receives each
    block's ||G||_F^2 summed in double (0 for inactive blocks)."""
    args = (grad_blocks, param_blocks, grad_flat, param_flat, _host_table(table), active)
    _checked("gather", ("grad_blocks", "param_blocks", "grad_flat", "param_flat", "table",
                        "active"), args)
    if sq_norms is not None:
        _check("gather", "sq_norms", sq_norms)
    kernel = _entry("gather", "grad_blocks", grad_blocks)
    if not _is_cuda(grad_blocks):
        return kernel(*args, float(l2_weight_decay), sq_norms)
    kt = _cuda_table("gather", table, grad_blocks)
    if fail is None:
        raise ValueError("gather: argument 'fail' (new_failure_flag) is required for CUDA tensors")
    kernel(_stream(grad_blocks.device), grad_blocks, param_blocks, grad_flat, param_flat,
           kt.device_table, kt.host, active, fail, float(l2_weight_decay), int(step), sq_norms)
    return -1


def scatter(flat: Any, blocks: Any, table: Any, active: Any) -> None:
    """Block layout into the parameters' layout, for every active block (gather's inverse)."""
    args = (flat, blocks, _host_table(table), active)
    _checked("scatter", ("flat", "blocks", "table", "active"), args)
    kernel = _entry("scatter", "flat", flat)
    if not _is_cuda(flat):
        kernel(*args)
        return
    kt = _cuda_table("scatter", table, flat)
    kernel(_stream(flat.device), flat, blocks, kt.device_table, kt.host, active)


def factor_update(
    factors_out: Any, factors_in: Any, grads: Any, table: Any, active: Any, beta2: float, *,
    num_threads: int = 1, fail: Any = None,
) -> None:
    """F_k <- beta2 F_k + (1 - beta2) U_k U_k^T (or F_k + U_k U_k^T if beta2 == 1), SPEC §4.4.
    factors_out may be factors_in (in place). num_threads: threads across blocks (see
    single_threaded_blas); the result is bitwise the same for every value. CUDA: nothing is
    written while `fail` records a failure; num_threads is not used."""
    args = (factors_out, factors_in, grads, _host_table(table), active)
    _checked("factor_update", ("factors_out", "factors_in", "grads", "table", "active"), args)
    threads = _thread_count("factor_update", num_threads)
    kernel = _entry("factor_update", "factors_out", factors_out)
    if not _is_cuda(factors_out):
        kernel(*args, float(beta2), threads)
        return
    kt = _cuda_table("factor_update", table, factors_out)
    bits = 8 * factors_out.element_size()
    kernel(_stream(factors_out.device), kt.workspace("factor_update", bits),
           _blas_workspace(factors_out.device), factors_out, factors_in, grads, kt.device_table,
           kt.host, kt.plan_device, kt.plan_host, active, fail, float(beta2))


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
    args = (out, factors, _host_table(table), active, is_diagonal, status_out)
    _checked("root_inverse", ("out", "factors", "table", "active", "is_diagonal",
                              "status_out"), args)
    threads = _thread_count("root_inverse", num_threads)
    kernel = _entry("root_inverse", "out", out)
    scalars = (code, float(epsilon), float(exponent_multiplier), float(bias_correction),
               bool(make_positive_semidefinite), bool(retry_double_precision),
               int(max_iterations), float(tolerance), float(rel_epsilon), int(order))
    if not _is_cuda(out):
        kernel(*args, *scalars, threads)
        return
    if method != "eigen":
        raise ValueError(
            f"root_inverse: method {method!r} is not available on CUDA; only 'eigen' (use "
            "EigenConfig, the default root_inv_config, for CUDA parameters)"
        )
    kt = _cuda_table("root_inverse", table, out)
    kernel(_stream(out.device), kt.workspace("root_inverse", 8 * out.element_size()),
           _blas_workspace(out.device), out, factors, kt.device_table, kt.host, active,
           is_diagonal, status_out, *scalars)


def precondition(
    out: Any, grads: Any, inv_roots: Any, table: Any, active: Any, *, num_threads: int = 1
) -> None:
    """out = G x_0 Q_0 ... x_{d-1} Q_{d-1} per active block (SPEC §4.8); order 0: out = G.
    num_threads: threads across blocks; the result is bitwise the same for every value."""
    args = (out, grads, inv_roots, _host_table(table), active)
    _checked("precondition", ("out", "grads", "inv_roots", "table", "active"), args)
    threads = _thread_count("precondition", num_threads)
    kernel = _entry("precondition", "out", out)
    if not _is_cuda(out):
        kernel(*args, threads)
        return
    # CUDA: inactive blocks of out are left unspecified (computed into scratch)
    kt = _cuda_table("precondition", table, out)
    kernel(_stream(out.device), kt.workspace("precondition", 8 * out.element_size()),
           _blas_workspace(out.device), out, grads, inv_roots, kt.device_table, kt.host,
           kt.plan_device, kt.plan_host, active)


def moments(
    grads: Any, grafting_state: Any | None, filtered_grad: Any | None, table: Any,
    active: Any, *, update_grafting_state: bool, grafting_beta2: float, beta1: float,
    beta3: float, bias_correction1: float, fail: Any = None,
) -> None:
    """Grafting accumulator (SPEC §4.5), filtered gradient and bias correction (§4.7), in
    place: grads becomes G_hat. CUDA: nothing is written while `fail` records a failure."""
    args = (grads, grafting_state, filtered_grad, _host_table(table), active)
    _checked("moments", ("grads", "grafting_state", "filtered_grad", "table", "active"), args)
    scalars = (bool(update_grafting_state), float(grafting_beta2), float(beta1), float(beta3),
               float(bias_correction1))
    kernel = _entry("moments", "grads", grads)
    if not _is_cuda(grads):
        kernel(*args, *scalars)
        return
    kt = _cuda_table("moments", table, grads)
    kernel(_stream(grads.device), grads, grafting_state, filtered_grad, kt.device_table,
           kt.host, active, fail, *scalars)


def finish(
    update_flat: Any, grads: Any, shampoo_dir: Any | None, grafting_state: Any | None,
    param_blocks: Any | None, momentum_state: Any | None, table: Any, active: Any, *,
    graft: str, grafting_phase: bool, grafting_bias_correction: float, grafting_epsilon: float,
    decoupled_weight_decay: float, momentum: float, dampening: float, nesterov: bool,
    lr: float, fail: Any = None,
) -> None:
    """Grafting, decoupled weight decay, momentum and -lr (SPEC §4.8-§4.11); writes the update
    of every active block into update_flat (param layout). CUDA: while `fail` records a
    failure, every update is -0.0 (adding it leaves a parameter bitwise unchanged) and the
    momentum is not touched."""
    code = _GRAFTS.get(graft)
    if code is None:
        raise ValueError(f"finish: argument 'graft' must be one of {sorted(_GRAFTS)}, got {graft!r}")
    args = (update_flat, grads, shampoo_dir, grafting_state, param_blocks, momentum_state,
            _host_table(table), active)
    _checked("finish", ("update_flat", "grads", "shampoo_dir", "grafting_state",
                        "param_blocks", "momentum_state", "table", "active"), args)
    scalars = (code, bool(grafting_phase), float(grafting_bias_correction),
               float(grafting_epsilon), float(decoupled_weight_decay), float(momentum),
               float(dampening), bool(nesterov), float(lr))
    kernel = _entry("finish", "update_flat", update_flat)
    if not _is_cuda(update_flat):
        kernel(*args, *scalars)
        return
    kt = _cuda_table("finish", table, update_flat)
    kernel(_stream(update_flat.device), kt.workspace("finish", 8 * update_flat.element_size()),
           *args[:6], kt.device_table, kt.host, active, fail, *scalars)


# The packed-storage kernels (sym_pack.h, the packed factor update) live in their own door;
# re-exported here, where every caller looks for kernels.
from distributed_shampoo._backend_packed import (  # noqa: E402,F401
    factor_update_packed, packed_commit, packed_numel, packed_select, sym_pack, sym_unpack,
)
