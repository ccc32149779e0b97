"""What a root step's per-factor statuses mean to the user: the exception raised with
use_protected_eigh=False and the records logged otherwise (SPEC B §4.6.5, §9).

The texts, levels and logger names are the reference's, so that users' log filters and
tests keep working: per-factor root messages come from its preconditioner-list module, the
"did not converge" warnings from the root logger, once per factor.
"""

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from distributed_shampoo import _backend
from distributed_shampoo.utils.shampoo_block_layout import BlockLayout

logger = logging.getLogger("distributed_shampoo.distributed_shampoo")
preconditioner_logger = logging.getLogger("distributed_shampoo.utils.shampoo_preconditioner_list")


class RootInverseError(ArithmeticError, RuntimeError):
    """A failed inverse root with use_protected_eigh=False: an ArithmeticError as in the
    reference (and a RuntimeError, what earlier versions of this package raised)."""


def failure_reason(root_kwargs: dict[str, Any], dtype: torch.dtype) -> str:
    """The exception the reference would have caught, for a FAILED status (the C kernels
    report a status per factor, not an exception object)."""
    method = root_kwargs["method"]
    if method == "eigen":
        retried = root_kwargs["retry_double_precision"] and dtype != torch.float64
        return (
            "ArithmeticError('the symmetric eigendecomposition (LAPACK syevd) did not converge"
            f"{' in ' + str(dtype) + ' nor in the float64 retry' if retried else ''}')"
        )
    if method == "higher_order":
        return (
            "ArithmeticError('the coupled higher-order iteration failed: the factor has entries "
            "close to inf, or the error of the result exceeds the threshold 1e-1, or the result "
            "holds NaN/Inf')"
        )
    return "ArithmeticError('the coupled inverse Newton iteration failed')"


def log_non_diagonal(layout: BlockLayout, before: torch.Tensor, after: torch.Tensor) -> None:
    """DEBUG for each factor whose diagonal flag this root step cleared (SPEC B §4.6.2)."""
    if not preconditioner_logger.isEnabledFor(logging.DEBUG):
        return
    for factor in np.flatnonzero((before & ~after).cpu().numpy()):
        preconditioner_logger.debug(f"Factor matrix {layout.factor_label(int(factor))} is not diagonal.")


def report_root_statuses(
    status: np.ndarray,
    where: Callable[[int], str],
    root_kwargs: dict[str, Any],
    dtype: torch.dtype,
    use_protected_eigh: bool,
) -> None:
    """Raises RootInverseError for a failed factor when unprotected; else logs each failed,
    retried and unconverged factor. `where(f)` names factor f (its label first)."""
    failed = np.flatnonzero(status == _backend.ROOT_FAILED)
    if failed.size and not use_protected_eigh:
        raise RootInverseError(
            f"Matrix inverse root computation failed for factor matrix {where(int(failed[0]))} "
            f"with exception {failure_reason(root_kwargs, dtype)}. The step was not taken; "
            "parameters and optimizer state are unchanged (use_protected_eigh=True keeps the "
            "previous inverse root instead)."
        )
    for factor in failed:
        preconditioner_logger.warning(
            f"Matrix inverse root computation failed for factor matrix {where(int(factor))} "
            f"with exception {failure_reason(root_kwargs, dtype)}. Using previous "
            "inv_factor_matrix and continuing..."
        )
    for factor in np.flatnonzero(status == _backend.ROOT_RETRIED_DOUBLE):
        logger.warning(
            f"Failed to compute eigendecomposition in {dtype} precision for factor matrix "
            f"{where(int(factor))}! Retried in double precision, which succeeded."
        )
    newton = root_kwargs["method"] == "newton"
    for _ in np.flatnonzero(status == _backend.ROOT_MAX_ITERS):
        logging.warning(
            "Newton did not converge and reached maximum number of iterations!"
            if newton
            else "Higher order method did not converge and reached maximum number of iterations!"
        )


def raise_non_finite(status: Any, where: Any, texts: tuple[str, str, str]) -> None:
    """Raises ValueError for the first factor whose status says its (bias-corrected) factor
    had a NaN, an Inf, or its result was non-finite; `texts` names them in that order."""
    for code, text in zip((_backend.ROOT_FACTOR_NAN, _backend.ROOT_FACTOR_INF, _backend.ROOT_NONFINITE), texts):
        bad = np.flatnonzero(status == code)
        if bad.size:
            raise ValueError(
                f"{text} {where(int(bad[0]))}! The step was not taken; parameters and "
                "optimizer state are unchanged. To mitigate, check the gradients, lower the "
                "learning rate, or use a higher-precision factor_matrix_dtype."
            )
