"""Entry points of the eigenvalue-corrected Shampoo (SOAP) kernels (csrc/core/soap.h), beside
_backend.py's: the same argument checks, one C call over a whole block table each.

CUDA tensors go to distributed_shampoo._C_cuda (csrc/cuda/soap_cuda.h) when it is built, with
a KernelTable as `table`, as _backend does for the other kernels.
"""

from __future__ import annotations

from typing import Any

import torch

from distributed_shampoo import _backend, _C
from distributed_shampoo._backend import (
    _blas_workspace,
    _checked,
    _cuda_table,
    _host_table,
    _is_cuda,
    _stream,
    _thread_count,
)

EIGENBASIS_METHODS: dict[str, int] = {"eigh": _C.EIGENBASIS_EIGH, "qr": _C.EIGENBASIS_QR}
_NAMES = {"torch.float32": "f32", "torch.float64": "f64", "float32": "f32", "float64": "f64"}


def _kernel(op: str, name: str, t: Any) -> Any:
    suffix = _NAMES.get(str(getattr(t, "dtype", None)))
    cuda = _is_cuda(t)
    cuda_module = _backend._C_cuda  # looked up per call: the CUDA emulator replaces it
    if suffix is None or (cuda and cuda_module is None):
        devices = ("cpu", "cuda") if cuda_module is not None else ("cpu",)
        supported = ", ".join(f"{d} on {v}" for v in devices for d in ("float32", "float64"))
        raise TypeError(
            f"{op}: argument '{name}' has dtype {getattr(t, 'dtype', type(t).__name__)} on device "
            f"{'cuda' if cuda else 'cpu'}; supported: {supported}"
        )
    return getattr(cuda_module if cuda else _C, f"{op}_{suffix}")


def _direction_workspace(kt: Any, bits: int, device: Any) -> Any:
    """soap_direction's device scratch (size computed once per KernelTable and width)."""
    key = ("soap_direction", bits)
    nbytes = kt._workspace_bytes.get(key)
    if nbytes is None:
        nbytes = kt._workspace_bytes[key] = _backend._C_cuda.soap_workspace_bytes(kt.host, kt.plan_host, bits)
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def soap_direction(
    out: Any | None, grads: Any | None, moment_grads: Any | None, bases: Any, corrected: Any,
    table: Any, active: Any, *, beta2: float, bias_correction: float, epsilon: float,
    num_threads: int = 1,
) -> None:
    """Per active block (csrc/core/soap.h): with moment_grads, the second moment in the
    eigenbasis D <- beta2 D + (1 - beta2) R(moment_grads)^2; with out, the direction
    out = R^T(R(grads) / (D / bias_correction + epsilon)^(1/r)). moment_grads may be grads."""
    args = (out, grads, moment_grads, bases, corrected, _host_table(table), active)
    names = ("out", "grads", "moment_grads", "bases", "corrected", "table", "active")
    _checked("soap_direction", names, args)
    threads = _thread_count("soap_direction", num_threads)
    kernel = _kernel("soap_direction", "corrected", corrected)
    scalars = (float(beta2), float(bias_correction), float(epsilon))
    if not _is_cuda(corrected):
        kernel(*args, *scalars, threads)
        return
    kt = _cuda_table("soap_direction", table, corrected)
    kernel(_stream(corrected.device), _direction_workspace(kt, 8 * corrected.element_size(), corrected.device),
           _blas_workspace(corrected.device), out, grads, moment_grads, bases, corrected,
           kt.device_table, kt.host, kt.plan_device, kt.plan_host, active, *scalars)


def eigenbasis(
    out: Any, factors: Any, previous: Any | None, table: Any, active: Any, *, method: str,
    retry_double_precision: bool, max_iterations: int, tolerance: float, is_diagonal: Any,
    status_out: Any, num_threads: int = 1,
) -> None:
    """Eigenbases of every factor of every active block into `out` (factor layout, whole
    matrices), one ROOT_* status per factor in `status_out`; method "eigh" or "qr" (warm
    start from `previous`, eigh where it is zero). See csrc/core/soap.h."""
    code = EIGENBASIS_METHODS.get(method)
    if code is None:
        raise ValueError(
            f"eigenbasis: argument 'method' must be one of {sorted(EIGENBASIS_METHODS)}, got {method!r}"
        )
    args = (out, factors, previous, _host_table(table), active, is_diagonal, status_out)
    names = ("out", "factors", "previous", "table", "active", "is_diagonal", "status_out")
    _checked("eigenbasis", names, args)
    threads = _thread_count("eigenbasis", num_threads)
    kernel = _kernel("eigenbasis", "out", out)
    scalars = (code, bool(retry_double_precision), int(max_iterations), float(tolerance))
    if not _is_cuda(out):
        kernel(*args, *scalars, threads)
        return
    kt = _cuda_table("eigenbasis", table, out)
    bits = 8 * out.element_size()
    key = ("eigenbasis", bits, code)
    nbytes = kt._workspace_bytes.get(key)
    if nbytes is None:  # computed once per KernelTable, width and method
        nbytes = kt._workspace_bytes[key] = _backend._C_cuda.eigenbasis_workspace_bytes(
            _stream(out.device), out.device.index or 0, kt.host, bits, code
        )
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=out.device) if nbytes else None
    kernel(_stream(out.device), workspace, _blas_workspace(out.device), out, factors, previous,
           kt.device_table, kt.host, active, is_diagonal, status_out, *scalars)
