"""Entry points of the eigenvalue-corrected Shampoo (SOAP) kernels (csrc/core/soap.h), beside
_backend.py's: the same argument checks, one C call over a whole block table each.

CPU kernels only so far; a CUDA tensor gets a TypeError naming the supported devices (the
SOAP engine refuses CUDA parameters at construction, before any step).
"""

from __future__ import annotations

from typing import Any

from distributed_shampoo import _C
from distributed_shampoo._backend import _checked, _host_table, _is_cuda, _thread_count

EIGENBASIS_METHODS: dict[str, int] = {"eigh": _C.EIGENBASIS_EIGH, "qr": _C.EIGENBASIS_QR}
_NAMES = {"torch.float32": "f32", "torch.float64": "f64", "float32": "f32", "float64": "f64"}


def _kernel(op: str, name: str, t: Any) -> Any:
    suffix = _NAMES.get(str(getattr(t, "dtype", None)))
    if suffix is None or _is_cuda(t):
        where = "cuda" if _is_cuda(t) else "cpu"
        raise TypeError(
            f"{op}: argument '{name}' has dtype {getattr(t, 'dtype', type(t).__name__)} on device "
            f"{where}; supported: float32 on cpu, float64 on cpu"
        )
    return getattr(_C, f"{op}_{suffix}")


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
    kernel(*args, float(beta2), float(bias_correction), float(epsilon), threads)


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
    kernel(*args, code, bool(retry_double_precision), int(max_iterations), float(tolerance), threads)
