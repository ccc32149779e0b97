"""Distributed Shampoo for PyTorch, with its numerical core in C (see README.md)."""

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.matrix_functions_types import (
    CoupledHigherOrderConfig,
    CoupledNewtonConfig,
    DefaultEigenConfig,
    EigenConfig,
    RootInvConfig,
)
from distributed_shampoo.shampoo_types import (
    AdaGradGraftingConfig,
    AdamGraftingConfig,
    CommunicationDType,
    DDPShampooConfig,
    DistributedConfig,
    FSDPParameterMetadata,
    FSDPShampooConfig,
    FullyShardShampooConfig,
    GraftingConfig,
    HSDPShampooConfig,
    PrecisionConfig,
    RMSpropGraftingConfig,
    SGDGraftingConfig,
    ShampooPT2CompileConfig,
    StaggeredRootScheduleConfig,
)
from distributed_shampoo.utils.shampoo_safe_globals import register as _register_safe_globals

# optimizer.state_dict() holds the config dataclasses: let torch.load(weights_only=True) read them
_register_safe_globals()

__all__: list[str] = [
    "AdaGradGraftingConfig",
    "AdamGraftingConfig",
    "CommunicationDType",
    "CoupledHigherOrderConfig",
    "CoupledNewtonConfig",
    "DDPShampooConfig",
    "DefaultEigenConfig",
    "DistributedConfig",
    "DistributedShampoo",
    "EigenConfig",
    "FSDPParameterMetadata",
    "FSDPShampooConfig",
    "FullyShardShampooConfig",
    "GraftingConfig",
    "HSDPShampooConfig",
    "PrecisionConfig",
    "RMSpropGraftingConfig",
    "RootInvConfig",
    "SGDGraftingConfig",
    "ShampooPT2CompileConfig",
    "StaggeredRootScheduleConfig",
]
