"""What a parameter group's configs mean for the C kernels: kernel dtypes, root-method
arguments, grafting, and the plan one step's fallible half hands to its infallible half."""

from dataclasses import dataclass
from typing import Any

import torch

from distributed_shampoo.matrix_functions_types import (
    CoupledHigherOrderConfig,
    CoupledNewtonConfig,
    RootInvConfig,
    validate_root_inv_config,
)
from distributed_shampoo.shampoo_types import (
    AdaGradGraftingConfig,
    AdamGraftingConfig,
    RMSpropGraftingConfig,
    SGDGraftingConfig,
)
from distributed_shampoo.utils.shampoo_step_checks import StepScalars


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2 parameters and gradients); other tensors as they are."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The C kernels compute in float32 or float64; half precisions compute in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def root_method_kwargs(config: RootInvConfig) -> dict[str, Any]:
    """The method-specific arguments of _backend.root_inverse for a root-inverse config."""
    validate_root_inv_config(config)  # fields may have changed since construction
    kwargs: dict[str, Any] = dict(
        method="eigen",
        make_positive_semidefinite=True,
        retry_double_precision=True,
        max_iterations=0,
        tolerance=0.0,
        rel_epsilon=0.0,
        order=3,
    )
    if type(config) is CoupledNewtonConfig:
        kwargs.update(
            method="newton", max_iterations=config.max_iterations, tolerance=config.tolerance
        )
    elif type(config) is CoupledHigherOrderConfig:
        kwargs.update(
            method="higher_order",
            max_iterations=config.max_iterations,
            tolerance=config.tolerance,
            rel_epsilon=config.rel_epsilon,
            order=config.order,
        )
    else:
        kwargs.update(
            make_positive_semidefinite=config.make_positive_semidefinite,
            retry_double_precision=config.retry_double_precision,
        )
    return kwargs


@dataclass
class StepPlan:
    """What prepare() decided for apply(): the new step count and the root-step data."""

    step: int
    root_step: bool
    bias_correction: float
    scalars: StepScalars
    # a root step's new factors and inverse roots, staged until apply() commits them
    factor_work: torch.Tensor | None = None
    root_work: torch.Tensor | None = None
    # the staggered schedule's plan of this root step (shampoo_root_schedule.PhasePlan), or
    # None; then factor_work / root_work hold the compact staging of its blocks and factors
    due: Any = None
    # how the step reads gradients and writes parameters (shampoo_param_io.StepIO)
    io: Any = None
    # the roots are computed in apply(), chunk by chunk, nothing staged
    # (shampoo_roots_in_apply.py: the step provably cannot raise)
    roots_in_apply: bool = False


class GraftingSpec:
    """What a grafting config means for the kernels (SPEC B §4.5, §4.8)."""

    def __init__(self, config: Any) -> None:
        # isinstance, as the reference dispatches (a user's subclass of AdamGraftingConfig is
        # Adam); the three diagonal configs are unrelated classes.
        self.has_state = isinstance(
            config, (AdaGradGraftingConfig, RMSpropGraftingConfig, AdamGraftingConfig)
        )
        self.kind = "none" if config is None else ("diagonal" if self.has_state else "sgd")
        self.epsilon = float(config.epsilon) if self.has_state else 0.0
        # AdaGrad sums (beta2 = 1); RMSprop and Adam average; only Adam bias-corrects.
        averaged = isinstance(config, (RMSpropGraftingConfig, AdamGraftingConfig))
        self.beta2 = float(config.beta2) if averaged else 1.0
        self.bias_corrected = isinstance(config, AdamGraftingConfig) and self.beta2 < 1.0
        assert config is None or self.has_state or isinstance(config, SGDGraftingConfig)
