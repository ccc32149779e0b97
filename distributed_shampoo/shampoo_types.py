"""Public configuration types and state-key constants (SPEC B §1.5).

The grafting, precision and distributed configs are plain mutable dataclasses, as in the
reference. They validate themselves on construction (so a bad value is reported where it was
written) and the optimizer validates them again when it reads them (a field may have been
assigned in between).
"""

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import Parameter

from distributed_shampoo.matrix_functions_types import (
    CoupledHigherOrderConfig,
    CoupledNewtonConfig,
    DefaultEigenConfig,
    DefaultEighEigenvectorConfig,
    EigenConfig,
    EigenvectorConfig,
    EighEigenvectorConfig,
    QRConfig,
    RootInvConfig,
    validate_eigenvector_config,
    validate_root_inv_config,
)

# State keys (checkpointed).
FILTERED_GRAD = "filtered_grad"
MOMENTUM = "momentum"
STEP = "step"

# Parameter-group keys.
BETA3 = "beta3"
BETAS = "betas"
DAMPENING = "dampening"
EPSILON = "epsilon"
EXPONENT_MULTIPLIER = "exponent_multiplier"
GRAFTING_CONFIG = "grafting_config"
INV_ROOT_OVERRIDE = "inv_root_override"
LR = "lr"
MAX_PRECONDITIONER_DIM = "max_preconditioner_dim"
PARAMS = "params"
PRECISION_CONFIG = "precision_config"
PRECONDITION_FREQUENCY = "precondition_frequency"
PRECONDITIONER_CONFIG = "preconditioner_config"
PRECONDITIONER_DTYPE = "preconditioner_dtype"
ROOT_INV_CONFIG = "root_inv_config"
START_PRECONDITIONING_STEP = "start_preconditioning_step"
USE_BIAS_CORRECTION = "use_bias_correction"
USE_DECOUPLED_WEIGHT_DECAY = "use_decoupled_weight_decay"
USE_MERGE_DIMS = "use_merge_dims"
USE_NESTEROV = "use_nesterov"
WEIGHT_DECAY = "weight_decay"

# Internal per-group keys (never checkpointed).
DISTRIBUTOR = "distributor"
FILTERED_GRAD_LIST = "filtered_grad_list"
GRAFTING_PRECONDITIONER_LIST = "grafting_preconditioner_list"
MASKED_BLOCKED_GRADS = "masked_blocked_grads"
MASKED_BLOCKED_PARAMS = "masked_blocked_params"
MASKED_FILTERED_GRAD_LIST = "masked_filtered_grad_list"
MASKED_MOMENTUM_LIST = "masked_momentum_list"
MOMENTUM_LIST = "momentum_list"
PREVIOUS_GRAD_SELECTOR = "previous_grad_selector"
SHAMPOO_PRECONDITIONER_LIST = "shampoo_preconditioner_list"

# Dtypes a state may be stored in (SPEC B §6.1).
SUPPORTED_STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CommunicationDType(enum.Enum):
    DEFAULT = 0
    FP16 = 1
    BF16 = 2
    FP32 = 3


COMMUNICATION_TORCH_DTYPES = {
    CommunicationDType.DEFAULT: torch.float32,
    CommunicationDType.FP16: torch.float16,
    CommunicationDType.BF16: torch.bfloat16,
    CommunicationDType.FP32: torch.float32,
}


@dataclass
class FSDPParameterMetadata:
    """Where this rank's FSDP shard sits in the flattened original parameter (SPEC B §7.3.1)."""

    fqn: str
    shape: torch.Size
    numel: int
    start_idx: int
    end_idx: int
    sharding_strategy: Any


@dataclass
class PrecisionConfig:
    """Storage dtype of each state and the dtype of the step's arithmetic (SPEC B §6).

    The C kernels compute in float32 or float64; a float16/bfloat16 ``computation_dtype``
    is carried out in float32 (more accurate, never less), states keep their storage dtypes.
    A plain mutable dataclass as in the reference: the optimizer validates it again when it
    reads it, since a field may have been assigned after construction.
    """

    computation_dtype: torch.dtype = torch.float32
    factor_matrix_dtype: torch.dtype = torch.float32
    inv_factor_matrix_dtype: torch.dtype = torch.float32
    filtered_grad_dtype: torch.dtype = torch.float32
    momentum_dtype: torch.dtype = torch.float32
    grafting_state_dtype: torch.dtype = torch.float32
    # Eigenvalue-corrected Shampoo's states (issue 14). The reference inserted them after
    # inv_factor_matrix_dtype; here they come last so that the Sept-2024 positional order holds.
    corrected_eigenvalues_dtype: torch.dtype = torch.float32
    factor_matrix_eigenvectors_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in (
            "computation_dtype",
            "factor_matrix_dtype",
            "inv_factor_matrix_dtype",
            "filtered_grad_dtype",
            "momentum_dtype",
            "grafting_state_dtype",
            "corrected_eigenvalues_dtype",
            "factor_matrix_eigenvectors_dtype",
        ):
            value = getattr(self, name)
            if value not in SUPPORTED_STATE_DTYPES:
                raise ValueError(
                    f"Invalid PrecisionConfig.{name}: {value!r}. "
                    f"Must be one of {SUPPORTED_STATE_DTYPES}."
                )


class AbstractDataclass:
    """A dataclass base that cannot be instantiated itself, nor through a direct subclass."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "AbstractDataclass":
        if cls is AbstractDataclass or cls.__bases__[0] is AbstractDataclass:
            raise TypeError(f"Cannot instantiate abstract class: {cls.__name__}.")
        return super().__new__(cls)


@dataclass(init=False)
class DistributedConfig(AbstractDataclass):
    """Selects how blocks are distributed over ranks."""


@dataclass(kw_only=True)
class DDPShampooConfig(DistributedConfig):
    """Spread blocks over the ranks of each trainer group; all-gather their updates."""

    communication_dtype: CommunicationDType = CommunicationDType.DEFAULT
    num_trainers_per_group: int = -1
    communicate_params: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.communication_dtype, CommunicationDType):
            raise TypeError(
                f"Invalid communication_dtype: {self.communication_dtype!r}. "
                f"Must be a CommunicationDType ({', '.join(m.name for m in CommunicationDType)})."
            )
        n = self.num_trainers_per_group
        if isinstance(n, bool) or not isinstance(n, int) or not (n == -1 or n >= 1):
            raise ValueError(
                f"Invalid num_trainers_per_group: {n!r}. Must be -1 (all ranks) or a positive "
                "divisor of the world size."
            )


@dataclass(kw_only=True)
class FSDPShampooConfig(DistributedConfig):
    """FSDP (v1, use_orig_params=True): each rank preconditions its own shard pieces."""

    param_to_metadata: dict[Parameter, FSDPParameterMetadata]


@dataclass(kw_only=True)
class FullyShardShampooConfig(DistributedConfig):
    """FSDP2 (fully_shard): each rank blocks its local DTensor shard."""


@dataclass
class HSDPShampooConfig(FSDPShampooConfig, DDPShampooConfig):
    """FSDP hybrid sharding, with DDP-style block distribution across the replicate dim."""

    device_mesh: Any


@dataclass
class ShampooPT2CompileConfig:
    """Accepted and validated for API compatibility; see README (C kernels are not traced)."""

    pytorch_compile_backend: str = "inductor"
    enable_shampoo_pt2_dynamic_shape: bool | None = False


@dataclass(init=False)
class GraftingConfig(AbstractDataclass):
    """Which first-order method provides the per-block step size (SPEC B §4.8).

    As in the reference, every concrete grafting config derives from GraftingConfig alone
    (AdamGraftingConfig is no RMSpropGraftingConfig), so positional fields are exactly the
    class's own: (epsilon,) for AdaGrad, (beta2, epsilon) for RMSprop and Adam.
    """


@dataclass
class SGDGraftingConfig(GraftingConfig):
    """graft(G) = G."""


@dataclass
class AdaGradGraftingConfig(GraftingConfig):
    """graft(G) = G / (sqrt(sum of G^2) + epsilon)."""

    epsilon: float = 1e-10

    def __post_init__(self) -> None:
        _check_grafting_epsilon(self.epsilon)


@dataclass
class RMSpropGraftingConfig(GraftingConfig):
    """graft(G) = G / (sqrt(EMA of G^2) + epsilon), no bias correction."""

    beta2: float = 0.99
    epsilon: float = 1e-8

    def __post_init__(self) -> None:
        _check_grafting_beta2(self.beta2)
        _check_grafting_epsilon(self.epsilon)


@dataclass
class AdamGraftingConfig(GraftingConfig):
    """graft(G) = G / (sqrt(bias-corrected EMA of G^2) + epsilon)."""

    beta2: float = 0.999
    epsilon: float = 1e-8

    def __post_init__(self) -> None:
        _check_grafting_beta2(self.beta2)
        _check_grafting_epsilon(self.epsilon)


@dataclass(init=False)
class PreconditionerConfig(AbstractDataclass):
    """Which preconditioner the Kronecker factors feed (issue 14): Shampoo's inverse roots or
    eigenvalue-corrected Shampoo (SOAP). ``amortized_computation_config`` configures the work
    done every precondition_frequency steps."""

    amortized_computation_config: Any


@dataclass(kw_only=True)
class ShampooPreconditionerConfig(PreconditionerConfig):
    """Shampoo: inverse roots of the factors, computed by ``amortized_computation_config`` (a
    RootInvConfig; default DefaultEigenConfig)."""

    amortized_computation_config: RootInvConfig = field(default_factory=lambda: DefaultEigenConfig)

    def __post_init__(self) -> None:
        config = self.amortized_computation_config
        if type(config) not in (EigenConfig, CoupledNewtonConfig, CoupledHigherOrderConfig):
            raise NotImplementedError(
                f"Root inverse config is not implemented! Specified root inverse config is "
                f"amortized_computation_config={config!r}; must be exactly one of EigenConfig, "
                "CoupledNewtonConfig, CoupledHigherOrderConfig."
            )
        validate_root_inv_config(config)


DefaultShampooConfig = ShampooPreconditionerConfig()


@dataclass(kw_only=True)
class EigenvalueCorrectedShampooPreconditionerConfig(PreconditionerConfig):
    """Eigenvalue-corrected Shampoo / SOAP (arXiv 2409.11321): every step the gradient is
    rotated into the factors' eigenbases, an Adam-style (betas[1] < 1) or AdaGrad-style
    (betas[1] == 1) second moment is kept in those coordinates and the update is rotated back;
    the eigenbases are recomputed by ``amortized_computation_config`` (an EigenvectorConfig;
    default DefaultEighEigenvectorConfig) every precondition_frequency steps."""

    amortized_computation_config: EigenvectorConfig = field(
        default_factory=lambda: DefaultEighEigenvectorConfig
    )

    def __post_init__(self) -> None:
        config = self.amortized_computation_config
        if type(config) not in (EighEigenvectorConfig, QRConfig):
            raise NotImplementedError(
                f"Eigenvector computation method is not implemented! Specified eigenvector "
                f"method is eigenvector_computation_config={config!r}."
            )
        validate_eigenvector_config(config)


DefaultEigenvalueCorrectedShampooConfig = EigenvalueCorrectedShampooPreconditionerConfig()
DefaultSOAPConfig = EigenvalueCorrectedShampooPreconditionerConfig(
    amortized_computation_config=QRConfig(),
)


def _check_grafting_beta2(beta2: float) -> None:
    if not 0.0 < beta2 <= 1.0:
        raise ValueError(f"Invalid grafting beta2 parameter: {beta2}. Must be in (0.0, 1.0].")


def _check_grafting_epsilon(epsilon: float) -> None:
    if not epsilon > 0.0:
        raise ValueError(f"Invalid epsilon value: {epsilon}. Must be > 0.0.")


__all__ = [
    "AbstractDataclass",
    "AdaGradGraftingConfig",
    "AdamGraftingConfig",
    "CommunicationDType",
    "CoupledHigherOrderConfig",
    "CoupledNewtonConfig",
    "DDPShampooConfig",
    "DefaultEigenConfig",
    "DefaultEigenvalueCorrectedShampooConfig",
    "DefaultEighEigenvectorConfig",
    "DefaultSOAPConfig",
    "DefaultShampooConfig",
    "DistributedConfig",
    "EigenConfig",
    "EigenvalueCorrectedShampooPreconditionerConfig",
    "EigenvectorConfig",
    "EighEigenvectorConfig",
    "FSDPParameterMetadata",
    "FSDPShampooConfig",
    "FullyShardShampooConfig",
    "GraftingConfig",
    "HSDPShampooConfig",
    "PrecisionConfig",
    "PreconditionerConfig",
    "QRConfig",
    "RMSpropGraftingConfig",
    "RootInvConfig",
    "SGDGraftingConfig",
    "ShampooPT2CompileConfig",
    "ShampooPreconditionerConfig",
]


# Cost models of StaggeredRootScheduleConfig (see its doc).
ROOT_SCHEDULE_COST_MODELS = ("auto", "dense", "count")


@dataclass
class StaggeredRootScheduleConfig:
    """Opt-in staggered inverse-root schedule (README "Staggered root schedule").

    Instead of recomputing every inverse root at every ``precondition_frequency``-th step,
    each factor matrix gets a fixed phase in [0, precondition_frequency), chosen at
    construction from the blocks this rank owns so that the estimated root work per step is
    as even as possible; a factor's root is recomputed at the steps t > start_preconditioning_step
    with t % precondition_frequency == its phase (phase 0: the default schedule's steps), and
    every root is computed at start_preconditioning_step as by default.

    cost_model: how a factor's root work is estimated for the balancing:
      "auto"  - the kernels' own estimate for the device: on CPU the dense eigendecomposition
                (~n^3, 1x1 factors free); on CUDA per batch group of equal sizes (a group's
                launch plus n^3 per member), since CUDA computes equal sizes in one batch;
      "dense" - n^3 per factor of size n > 1 (1x1 factors free), on every device;
      "count" - one unit per factor of size n > 1 (spreads the number of roots).
    A plain mutable dataclass: validated here and again when the optimizer reads it.
    """

    cost_model: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.cost_model, str) or self.cost_model not in ROOT_SCHEDULE_COST_MODELS:
            raise ValueError(
                f"Invalid StaggeredRootScheduleConfig.cost_model: {self.cost_model!r}. "
                f"Must be one of {ROOT_SCHEDULE_COST_MODELS}."
            )
