"""Diagnostic for track_root_inv_residuals (SPEC B §10.2).

The check is an independent float64 NumPy computation, on purpose: it measures the C
kernels' inverse roots against a separate implementation rather than against themselves.
It runs only when tracking is on, after steps that recompute inverse roots.
"""

import logging
from typing import Any

import numpy as np
import torch

from distributed_shampoo import _backend
from distributed_shampoo.utils.shampoo_packed_chunks import unpack_numpy

logger = logging.getLogger("distributed_shampoo.distributed_shampoo")

_EXPECTED_ERROR = {torch.float64: 1e-7, torch.float32: 1e-3}


def _eigen_power(matrix: np.ndarray, exponent: float, epsilon: float) -> np.ndarray:
    """(PSD-shifted matrix + epsilon) ** exponent by symmetric eigendecomposition."""
    eigenvalues, vectors = np.linalg.eigh(matrix)
    eigenvalues = eigenvalues - min(eigenvalues.min(initial=0.0), 0.0) + epsilon
    return (vectors * eigenvalues**exponent) @ vectors.T


def root_inverse_residuals(
    factor: np.ndarray, inverse_root: np.ndarray, root: int, epsilon: float, multiplier: float
) -> tuple[float, float]:
    """(relative error of inverse_root, relative residual of its -root power), SPEC B §5.7."""
    exact = _eigen_power(factor, -multiplier / root, epsilon)
    error = np.abs(exact - inverse_root).max() / max(np.abs(exact).max(), np.finfo(float).tiny)
    if multiplier == 1.0:
        recovered = np.linalg.matrix_power(np.linalg.inv(inverse_root), root)
    else:
        recovered = _eigen_power(inverse_root, -root / multiplier, 0.0)
    regularised = factor + epsilon * np.eye(len(factor))
    residual = np.abs(recovered - regularised).max() / max(np.abs(regularised).max(), np.finfo(float).tiny)
    return float(error), float(residual)


def log_root_inverse_residuals(engine: Any, bias_correction: float, computed: np.ndarray | None = None) -> None:
    """`computed`: bool per factor, the factors whose roots this step computed (None: all)."""
    expected = _EXPECTED_ERROR.get(engine.inv_factors.dtype)
    if expected is None:  # before "Group Index", as the reference skips the group
        logger.warning("Expected relative error/residual not supported for precision lower than float32.")
        return
    logger.debug(f"Group Index: {engine.group_index}")
    logger.debug(f"Expect Relative Error <= {expected}")
    table = engine.layout.table.numpy()
    active = engine.active.cpu().numpy()
    factors = engine.factors.detach().cpu().double().numpy()
    inverses = engine.inv_factors.detach().cpu().double().numpy()
    errors, residuals = [], []
    packed_at = index = 0
    for b, row in enumerate(table):
        for d in row[_backend.BF_DIMS : _backend.BF_DIMS + row[_backend.BF_ORDER]]:
            d, view = int(d), slice(packed_at, packed_at + int(d) * (int(d) + 1) // 2)
            packed_at = view.stop
            index += 1
            if not active[b] or (computed is not None and not computed[index - 1]):
                continue
            factor = unpack_numpy(factors[view], d) / bias_correction
            inverse = unpack_numpy(inverses[view], d)
            try:
                error, residual = root_inverse_residuals(
                    factor, inverse, int(row[_backend.BF_ROOT]), engine.epsilon, engine.exponent_multiplier
                )
            except np.linalg.LinAlgError:
                error = residual = float("inf")
            errors.append(error)
            residuals.append(residual)
    if not errors:
        return
    # The reference's records, verbatim: float64 tensors printed as torch prints them.
    errors_t = torch.tensor(errors, dtype=torch.float64)
    residuals_t = torch.tensor(residuals, dtype=torch.float64)
    quantiles = torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64)
    logger.debug(
        f"Relative Error (||X - X_hat||_inf / ||X||_inf)       Average: {torch.mean(errors_t)}, "
        f"Quantiles [0, 25, 50, 75, 100]: {torch.quantile(errors_t, quantiles, interpolation='nearest')}"
    )
    logger.debug(
        f"Relative Residual (||X_hat^-r - A||_inf / ||A||_inf) Average: {torch.mean(residuals_t)}, "
        "Quantiles [0, 25, 50, 75, 100]: "
        f"{torch.quantile(residuals_t, quantiles, interpolation='nearest')}"
    )
