"""Root-inverse configurations (SPEC B §1.6): which algorithm computes each factor's inverse root;
eigenvector configurations (issue 14): how eigenvalue-corrected Shampoo (SOAP) finds each
factor's eigenbasis.

Plain mutable dataclasses, as in the reference. Dispatch is by exact type
(``type(cfg) is EigenConfig``), as in the reference, so a subclass is
an unknown config and is rejected at construction.
"""

import numbers
from dataclasses import dataclass
from typing import Any

# Bounds on the values that size work or memory, the same as the C kernels'
# (csrc/core/matrix_root.h; tests/test_fuzz_c.py checks they agree): with tolerance 0 an
# iteration runs all max_iterations steps, each a few n x n matrix products, and order is the
# number of Taylor terms (one product and one scratch entry each, per step). Far above what
# converges (the defaults are 100 and 3); an unbounded value would hang or overflow memory.
MAX_ITERATIONS = 1000
MAX_TAYLOR_ORDER = 64


@dataclass(kw_only=True)
class RootInvConfig:
    """Base of the root-inverse configs; on its own it names no algorithm."""


@dataclass(kw_only=True)
class EigenConfig(RootInvConfig):
    """Symmetric eigendecomposition (LAPACK syevd), SPEC B §5.3."""

    make_positive_semidefinite: bool = True
    retry_double_precision: bool = True


DefaultEigenConfig = EigenConfig()


@dataclass(kw_only=True)
class CoupledNewtonConfig(RootInvConfig):
    """Coupled inverse Newton iteration, SPEC B §5.4."""

    max_iterations: int = 100
    tolerance: float = 1e-6

    def __post_init__(self) -> None:
        validate_root_inv_config(self)


@dataclass(kw_only=True)
class CoupledHigherOrderConfig(RootInvConfig):
    """Coupled higher-order iteration with relative epsilon, SPEC B §5.5.

    ``disable_tf32`` is kept for API compatibility; the C kernels never use TF32.
    """

    rel_epsilon: float = 0.0
    max_iterations: int = 100
    tolerance: float = 1e-8
    order: int = 3
    disable_tf32: bool = True

    def __post_init__(self) -> None:
        validate_root_inv_config(self)


@dataclass(kw_only=True)
class EigenvectorConfig:
    """Base of the eigenvector configs (eigenvalue-corrected Shampoo); on its own it names no
    algorithm."""


@dataclass(kw_only=True)
class EighEigenvectorConfig(EigenvectorConfig):
    """Eigenvectors by a symmetric eigendecomposition (LAPACK syevd), ascending eigenvalues;
    retried in float64 when the float32 solver fails."""

    retry_double_precision: bool = True


DefaultEighEigenvectorConfig = EighEigenvectorConfig()


@dataclass(kw_only=True)
class QRConfig(EigenvectorConfig):
    """Eigenvectors by orthogonal (simultaneous) iteration warm-started from the previous
    eigenbasis: up to max_iterations steps of Q <- qr(A Q).Q, stopping once the relative change
    ||Q_old - Q||_F / ||Q_old||_F is <= tolerance, then the columns sorted by ascending
    Rayleigh quotient. The first computation (no previous eigenbasis) is an eigendecomposition.
    As SOAP (arXiv 2409.11321) does with max_iterations=1."""

    max_iterations: int = 1
    tolerance: float = 1e-5

    def __post_init__(self) -> None:
        validate_eigenvector_config(self)


def validate_eigenvector_config(config: Any) -> None:
    """ValueError naming the field and its allowed range unless every value of an eigenvector
    config the kernels read is in range (run at construction and when the optimizer reads it)."""
    if isinstance(config, QRConfig):
        _check_int("max_iterations", config.max_iterations, 0, MAX_ITERATIONS)
        _check_tolerance(config.tolerance)


def validate_root_inv_config(config: Any) -> None:
    """ValueError naming the field and its allowed range unless every value of a root-inverse
    config the kernels read is in range. Run at construction and again by the optimizer when
    it reads a config (fields can change in between)."""
    if isinstance(config, (CoupledNewtonConfig, CoupledHigherOrderConfig)):
        _check_int("max_iterations", config.max_iterations, 0, MAX_ITERATIONS)
        _check_tolerance(config.tolerance)
    if isinstance(config, CoupledHigherOrderConfig):
        if not _is_real(config.rel_epsilon) or not config.rel_epsilon >= 0.0:
            raise ValueError(f"Invalid rel_epsilon: {config.rel_epsilon!r}. Must be >= 0.0.")
        _check_int("order", config.order, 2, MAX_TAYLOR_ORDER)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"Invalid {name}: {value!r}. Must be an integer in [{low}, {high}].")


def _check_tolerance(tolerance: Any) -> None:
    if not _is_real(tolerance) or not tolerance >= 0.0:
        raise ValueError(f"Invalid tolerance: {tolerance!r}. Must be >= 0.0.")
