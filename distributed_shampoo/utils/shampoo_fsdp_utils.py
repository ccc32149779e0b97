"""FSDP (v1) support: parameter metadata and split-tensor recovery (SPEC B §7.3).

This is the only module that reads FSDP's private attributes (`_handle.flat_param` and its
`_params`, `_shard_param_infos`, `_shapes`, `_fqns`, `_numels`); they were read for torch
2.13 and tests/test_fsdp.py pins the behaviour.
"""

from collections.abc import Sequence

import torch
from torch import nn

from distributed_shampoo.shampoo_types import FSDPParameterMetadata
from distributed_shampoo.utils.shampoo_block_layout import TensorPiece


def compile_fsdp_parameter_metadata(module: nn.Module) -> dict[nn.Parameter, FSDPParameterMetadata]:
    """Where this rank's shard of every original parameter lies, for FSDPShampooConfig."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    metadata: dict[nn.Parameter, FSDPParameterMetadata] = {}
    for fsdp_module in FSDP.fsdp_modules(module):
        handle = getattr(fsdp_module, "_handle", None)
        if handle is None:
            continue
        flat = handle.flat_param
        if flat._params is None:
            raise ValueError(
                "FSDPShampooConfig needs FullyShardedDataParallel(..., use_orig_params=True): the "
                "optimizer works on the original parameters, which FSDP only exposes then."
            )
        for param, info, shape, fqn, numel in zip(
            flat._params, flat._shard_param_infos, flat._shapes, flat._fqns, flat._numels, strict=True
        ):
            in_shard = bool(info.in_shard)
            metadata[param] = FSDPParameterMetadata(
                fqn=fqn,
                shape=torch.Size(shape),
                numel=int(numel),
                start_idx=int(info.intra_param_start_idx) if in_shard else 0,
                end_idx=int(info.intra_param_end_idx) + 1 if in_shard else 0,
                sharding_strategy=fsdp_module.sharding_strategy,
            )
    return metadata


def parse_fsdp_params(
    named_params: dict[str, nn.Parameter], param_metadata: dict[nn.Parameter, FSDPParameterMetadata]
) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """(fully or grad-op sharded, hybrid sharded, other) parameters, in `named_params` order."""
    from torch.distributed.fsdp import ShardingStrategy

    sharded = {ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP}
    hybrid = {ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2}
    fsdp: dict[str, nn.Parameter] = {}
    hsdp: dict[str, nn.Parameter] = {}
    other: dict[str, nn.Parameter] = {}
    for name, param in named_params.items():
        strategy = param_metadata[param].sharding_strategy if param in param_metadata else None
        (fsdp if strategy in sharded else hsdp if strategy in hybrid else other)[name] = param
    return fsdp, hsdp, other


def split_shard(shape: Sequence[int], start: int, end: int) -> list[tuple[int, tuple[int, ...]]]:
    """SPEC B §7.3.2: cuts the flat range [start, end) of a tensor of `shape` into valid
    sub-tensors; returns (offset from `start`, piece shape) in order."""
    shape = tuple(int(d) for d in shape)
    if start == end:
        return []
    if not shape:  # a 0-d parameter: its one element as a vector
        return [(0, (end - start,))]
    pieces: list[tuple[int, tuple[int, ...]]] = []

    def recover(a: int, b: int, dim: int) -> None:
        if a == b:
            return
        if dim == len(shape) - 1:
            pieces.append((a - start, (b - a,)))
            return
        rest = 1
        for d in shape[dim + 1 :]:
            rest *= d
        c0 = -(-a // rest) * rest
        c1 = (b // rest) * rest
        if c0 < c1:
            recover(a, c0, dim + 1)
            pieces.append((c0 - start, ((c1 - c0) // rest, *shape[dim + 1 :])))
            recover(c1, b, dim + 1)
        elif c0 == c1:
            recover(a, c0, dim + 1)
            recover(c1, b, dim + 1)
        else:
            recover(a, b, dim + 1)

    recover(start, end, 0)
    return pieces


def fsdp_pieces(
    params: Sequence[torch.Tensor], param_to_metadata: dict[nn.Parameter, FSDPParameterMetadata]
) -> list[TensorPiece]:
    """Every parameter's local shard cut back into sub-tensors of its original shape.

    Parameters FSDP does not shard (absent from the metadata, or NO_SHARD) are taken whole."""
    pieces: list[TensorPiece] = []
    for index, param in enumerate(params):
        meta = param_to_metadata.get(param)  # type: ignore[call-overload]
        # FSDP keeps NO_SHARD parameters whole (it also falls back to NO_SHARD when a shard
        # group has one rank), like parameters it does not manage at all.
        if meta is None or getattr(meta.sharding_strategy, "name", None) == "NO_SHARD":
            pieces.append(TensorPiece(index, tuple(param.shape), 0))
            continue
        if param.dim() != 1 or param.numel() != meta.end_idx - meta.start_idx:
            raise ValueError(
                f"param_to_metadata does not match parameter {index} ({meta.fqn}): it says this "
                f"rank holds elements [{meta.start_idx}, {meta.end_idx}) of a {tuple(meta.shape)} "
                f"tensor, but the parameter here has shape {tuple(param.shape)}. Build it with "
                "compile_fsdp_parameter_metadata(model) on the FSDP-wrapped model whose "
                "parameters you pass to the optimizer."
            )
        for offset, shape in split_shard(meta.shape, meta.start_idx, meta.end_idx):
            pieces.append(TensorPiece(index, shape, offset))
    return pieces
