"""Distributed Shampoo for PyTorch, with its numerical core in C (see README.md)."""

from distributed_shampoo.distributed_shampoo import DistributedShampoo
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
)
from distributed_shampoo.shampoo_types import (
    AdaGradGraftingConfig,
    AdamGraftingConfig,
    CommunicationDType,
    DDPShampooConfig,
    DefaultEigenvalueCorrectedShampooConfig,
    DefaultShampooConfig,
    DefaultSOAPConfig,
    DistributedConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    FSDPParameterMetadata,
    FSDPShampooConfig,
    FullyShardShampooConfig,
    GraftingConfig,
    HSDPShampooConfig,
    PrecisionConfig,
    PreconditionerConfig,
    RMSpropGraftingConfig,
    SGDGraftingConfig,
    ShampooPreconditionerConfig,
    ShampooPT2CompileConfig,
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
    "DefaultEigenvalueCorrectedShampooConfig",
    "DefaultEighEigenvectorConfig",
    "DefaultSOAPConfig",
    "DefaultShampooConfig",
    "DistributedConfig",
    "DistributedShampoo",
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
