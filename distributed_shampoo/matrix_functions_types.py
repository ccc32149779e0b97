"""Root-inverse configurations (SPEC B §1.6): which algorithm computes each factor's inverse root.

Plain mutable dataclasses, as in the reference. Dispatch is by exact type
(``type(cfg) is EigenConfig``), as in the reference, so a subclass is
an unknown config and is rejected at construction.
"""

from dataclasses import dataclass


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
        _check_iterations(self.max_iterations)
        _check_tolerance(self.tolerance)


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
        _check_iterations(self.max_iterations)
        _check_tolerance(self.tolerance)
        if not self.rel_epsilon >= 0.0:
            raise ValueError(f"Invalid rel_epsilon: {self.rel_epsilon}. Must be >= 0.0.")
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 2:
            raise ValueError(f"Invalid order: {self.order!r}. Must be an integer >= 2.")


def _check_iterations(max_iterations: int) -> None:
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
        raise ValueError(f"Invalid max_iterations: {max_iterations!r}. Must be an integer >= 0.")


def _check_tolerance(tolerance: float) -> None:
    if not tolerance >= 0.0:
        raise ValueError(f"Invalid tolerance: {tolerance}. Must be >= 0.0.")
