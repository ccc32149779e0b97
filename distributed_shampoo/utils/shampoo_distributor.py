"""From a distributed_config to what a group engine needs (SPEC B §7): how parameters are cut
into pieces (FSDP), which trainer group spreads the blocks (DDP, HSDP), and the block keys.

It also checks that the config matches how the model is wrapped, because a mismatch would
otherwise train silently on the wrong tensors (a local shard taken for a whole parameter).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distributed_shampoo.shampoo_types import (
    DDPShampooConfig,
    DistributedConfig,
    FSDPShampooConfig,
    FullyShardShampooConfig,
    HSDPShampooConfig,
)
from distributed_shampoo.utils.shampoo_block_layout import TensorPiece
from distributed_shampoo.utils.shampoo_ddp_distributor import DDPPlacement, trainer_group
from distributed_shampoo.utils.shampoo_fsdp_utils import fsdp_pieces


@dataclass
class Distribution:
    placement: DDPPlacement | None = None   # blocks spread over a trainer group
    pieces_by_group: list[list[TensorPiece]] | None = None  # FSDP: shards cut into pieces
    key_prefix: str = "block_"


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "to_local") and hasattr(tensor, "placements")


def _is_flat_parameter(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "FlatParameter"


def _require_process_group(config: DistributedConfig) -> None:
    if not dist.is_available() or not dist.is_initialized():
        # HSDP: the reference's text first (users match on it), then how to fix it.
        prefix = (
            "HSDPDistributor needs torch.distributed to be initialized! "
            if type(config) is HSDPShampooConfig
            else ""
        )
        raise RuntimeError(
            f"{prefix}{type(config).__name__} needs torch.distributed to be initialized: call "
            "torch.distributed.init_process_group(...) before constructing DistributedShampoo."
        )


def _check_wrapping(config: DistributedConfig | None, params: Sequence[torch.Tensor]) -> None:
    dtensors = any(_is_dtensor(p) for p in params)
    if any(_is_flat_parameter(p) for p in params):
        raise ValueError(
            "The parameters are FSDP FlatParameters: wrap the model with "
            "FullyShardedDataParallel(..., use_orig_params=True) and pass model.parameters() with "
            "distributed_config=FSDPShampooConfig(param_to_metadata=compile_fsdp_parameter_metadata(model))."
        )
    if dtensors and type(config) is not FullyShardShampooConfig:
        raise ValueError(
            f"The parameters are DTensors (the model is wrapped with fully_shard), but "
            f"distributed_config={config!r}; use distributed_config=FullyShardShampooConfig()."
        )
    if type(config) is FullyShardShampooConfig and not dtensors:
        raise ValueError(
            "FullyShardShampooConfig expects parameters sharded by fully_shard (DTensors), but none "
            "is: wrap the model with torch.distributed.fsdp.fully_shard first, or use another config."
        )
    if type(config) in (FSDPShampooConfig, HSDPShampooConfig):
        metadata = config.param_to_metadata  # type: ignore[union-attr]
        if not any(p in metadata for p in params):
            raise ValueError(
                f"{type(config).__name__}.param_to_metadata describes none of the optimizer's "
                "parameters: build it with compile_fsdp_parameter_metadata(model) on the "
                "FSDP(use_orig_params=True)-wrapped model whose parameters you pass."
            )


def hsdp_trainer_group(config: HSDPShampooConfig) -> DDPPlacement:
    """SPEC B §7.4: the ranks holding the same shard (a replicate column of the 2-D mesh),
    cut into consecutive trainer groups of num_trainers_per_group."""
    mesh = config.device_mesh.mesh
    if mesh.dim() != 2:
        raise ValueError(
            f"HSDPShampooConfig.device_mesh must be 2-D (replicate, shard); got shape {tuple(mesh.shape)}."
        )
    replicas, shards = (int(d) for d in mesh.shape)
    n = config.num_trainers_per_group
    if n != -1 and not 1 <= n <= replicas:
        raise ValueError(
            f"Invalid number of trainers per group: {n}. Must be between [1, {replicas}] or set to -1."
        )
    size = replicas if n == -1 else n
    if replicas % size != 0:
        raise ValueError(  # the reference's text; the size is device_mesh's replicate dim
            f"distributed_config.num_trainers_per_group={n} must divide "
            f"self._replicated_group_size={replicas}!"
        )
    rank = dist.get_rank()
    mine: DDPPlacement | None = None
    for column in range(shards):
        ranks = [int(r) for r in mesh[:, column].tolist()]
        for first in range(0, replicas, size):
            members = ranks[first : first + size]
            group = dist.new_group(members)  # every rank creates every group, in one order
            if rank in members:
                mine = DDPPlacement(config, group, size, members.index(rank))
    assert mine is not None, f"rank {rank} is not in device_mesh {mesh.tolist()}"
    return mine


def plan_distribution(config: DistributedConfig | None, param_groups: Sequence[dict]) -> Distribution:
    params = [p for group in param_groups for p in group["params"]]
    _check_wrapping(config, params)
    if config is None:
        return Distribution()
    _require_process_group(config)
    if type(config) is DDPShampooConfig:
        return Distribution(placement=trainer_group(config))
    if type(config) is FullyShardShampooConfig:
        return Distribution(key_prefix=f"rank_{dist.get_rank()}-block_")
    pieces = [fsdp_pieces(group["params"], config.param_to_metadata) for group in param_groups]  # type: ignore[union-attr]
    if type(config) is FSDPShampooConfig:
        return Distribution(pieces_by_group=pieces, key_prefix=f"rank_{dist.get_rank()}-block_")
    assert type(config) is HSDPShampooConfig
    shard_rank = config.device_mesh.get_local_rank(1)
    return Distribution(
        placement=hsdp_trainer_group(config),
        pieces_by_group=pieces,
        key_prefix=f"rank_{shard_rank}-block_",
    )
