"""Saving and loading the optimizer state (SPEC B §8, A.3.9, A.3.11).

State is keyed by parameter (index or fully-qualified name) and by block key, never by a
position in a list: `block_{k}` (serial, DDP) or `rank_{r}-block_{k}` (FSDP, HSDP, FSDP2,
where the blocks follow the shards).

Saving returns the optimizer's live state tensors (views into its flat buffers): nothing is
copied, so `torch.distributed.checkpoint.save` writes straight from them.

Loading is all-or-nothing: keys, shapes, dtypes, finiteness and param groups are validated
first, and only then copied in place. With a `distributed_config` the load is a collective:
every rank validates its own part, the ranks agree, and either every rank loads or none
does. Loading must read into tensors that are not the optimizer's own, or a bad checkpoint
is already inside the optimizer before it can be checked: `ShampooLoadPlanner`
(utils/shampoo_dcp.py) makes `torch.distributed.checkpoint.load` do that.
"""

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from distributed_shampoo.utils.shampoo_packed_chunks import pack_full
from distributed_shampoo.shampoo_types import (
    PARAMS,
    FSDPShampooConfig,
    FullyShardShampooConfig,
    HSDPShampooConfig,
)
from distributed_shampoo.utils.shampoo_checkpoint_utils import flatten
from distributed_shampoo.utils.shampoo_hyperparameters import validate_group

logger = logging.getLogger("distributed_shampoo.distributed_shampoo")

_Loaded = list[tuple[str, dict[str, torch.Tensor], Mapping[str, Any]]]
_SHARDED_CONFIGS = (FSDPShampooConfig, HSDPShampooConfig, FullyShardShampooConfig)

RESHARDING_NOTE = (
    "FSDP, HSDP and FSDP2 optimizer states are keyed by shard rank and their blocks follow the "
    "shards, so such a checkpoint loads only with the sharding it was written with (same world "
    "size, or for HSDP the same shard-dimension size, same wrapping, same max_preconditioner_dim): "
    "resharding FSDP-family checkpoints across world sizes is not supported."
)


def _is_sharded(optimizer: Any) -> bool:
    return isinstance(getattr(optimizer, "_distributed_config", None), _SHARDED_CONFIGS)


def _hint(optimizer: Any, key: str) -> str:
    """Why a block key may not match, from the optimizer's mode and the key's form."""
    sharded_key = key.startswith('["rank_')
    if _is_sharded(optimizer):
        if not sharded_key and key != '["step"]':
            return (
                " The checkpoint was not written by an FSDP, HSDP or FSDP2 run (its block keys "
                "name no shard rank); " + RESHARDING_NOTE
            )
        return " " + RESHARDING_NOTE
    if sharded_key:
        return (
            f" The checkpoint was written by an FSDP, HSDP or FSDP2 run (it has keys like {key}), "
            "whose blocks are pieces of shards: it cannot be loaded without distributed_config, "
            "with DDPShampooConfig, or with another sharding. " + RESHARDING_NOTE
        )
    return (
        " Was the checkpoint written with other max_preconditioner_dim, use_merge_dims, "
        "momentum, betas, grafting_config or precision_config, or for another model?"
    )


def _in_target_layout(key: str, value: Any, target: torch.Tensor) -> Any:
    """A full d x d factor matrix or inverse root (a checkpoint of before issue 11, or a state
    dict laid out as the well-known implementation's) for packed storage: its upper triangle
    (shampoo_packed_chunks.py). Anything else as it is."""
    if (
        isinstance(value, torch.Tensor)
        and value.dim() == 2
        and target.dim() == 1
        and value.shape[0] == value.shape[1]
        and value.shape[0] * (value.shape[0] + 1) // 2 == target.numel()
        and ('"factor_matrices"' in key or '"inv_factor_matrices"' in key)
        and not value.is_meta
    ):
        return pack_full(value)
    return value


def _check_param_state(
    optimizer: Any, name: str, current: dict[str, torch.Tensor], loaded: Mapping[str, Any]
) -> None:
    if not isinstance(loaded, Mapping):
        raise TypeError(
            f"The loaded state of parameter {name} must be a dict of flat keys to tensors; got "
            f"{type(loaded).__name__}."
        )
    # A checkpoint of an FSDP-family run loaded without that sharding: say so.
    sharded = next((k for k in loaded if isinstance(k, str) and k.startswith('["rank_')), None)
    for key in current:
        if key not in loaded:
            about = sharded if sharded is not None and not _is_sharded(optimizer) else key
            raise KeyError(
                f"Key {key} not found in state dict to load. (parameter {name})"
                + _hint(optimizer, about)
            )
    for key, value in loaded.items():
        if key not in current:
            raise KeyError(
                f"Unexpected key {key} in the loaded state of parameter {name}: the optimizer has "
                "no such state." + _hint(optimizer, key)
            )
        target = current[key]
        value = _in_target_layout(key, value, target)
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"State {key} of parameter {name} must be a tensor; got {type(value).__name__}."
            )
        if value.shape != target.shape:
            raise ValueError(
                f"Shape mismatch for state {key} of parameter {name}: checkpoint has "
                f"{tuple(value.shape)}, the optimizer expects {tuple(target.shape)}."
                + _hint(optimizer, key)
            )
        if value.dtype != target.dtype:
            raise ValueError(
                f"Dtype mismatch for state {key} of parameter {name}: checkpoint has "
                f"{value.dtype}, the optimizer expects {target.dtype} (see precision_config)."
            )
        if value.is_meta:
            raise ValueError(f"State {key} of parameter {name} holds no data (a meta tensor).")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"State {key} of parameter {name} holds NaN or Inf values.")
        if key == '["step"]' and int(value) < 0:
            raise ValueError(f"State {key} of parameter {name} is negative: {int(value)}.")


def _aliases_live_state(loaded_states: _Loaded) -> str | None:
    """The first loaded tensor that shares memory with the state it would be copied into."""
    for name, current, loaded in loaded_states:
        if not isinstance(loaded, Mapping):
            continue
        for key, target in current.items():
            value = loaded.get(key)
            if (
                isinstance(value, torch.Tensor)
                and not value.is_meta
                and value.device == target.device
                and value.untyped_storage().data_ptr() == target.untyped_storage().data_ptr()
            ):
                return f"{key} of parameter {name}"
    return None


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.device == b.device
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


_ALIAS_NOTE = (
    " Note: the tensors of this state dict are the optimizer's own state tensors (as returned by "
    "distributed_state_dict()), so whatever the checkpoint reader wrote into them, for example "
    "{where}, is already in the optimizer and could not be kept out: the optimizer state is NOT "
    "intact. Load through torch.distributed.checkpoint.load(..., planner=ShampooLoadPlanner()) "
    "(distributed_shampoo.utils.shampoo_dcp), or into tensors that are not the optimizer's, to "
    "make loading atomic."
)


def _validate(
    optimizer: Any,
    loaded_states: _Loaded,
    loaded_groups: Sequence[tuple[dict[str, Any], Mapping[str, Any]]],
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    for name, current, loaded in loaded_states:
        _check_param_state(optimizer, name, current, loaded)
    resolved = []
    for index, (group, hyperparameters) in enumerate(loaded_groups):
        if not isinstance(hyperparameters, Mapping):
            raise TypeError(
                f"Loaded param group {index} must be a dict of hyperparameters; got "
                f"{type(hyperparameters).__name__}."
            )
        candidate = {**group, **copy.deepcopy(dict(hyperparameters))}
        validate_group(candidate, where=f"loaded param group {index}: ", warn=False)
        resolved.append((group, candidate))
    return resolved


def _agree(optimizer: Any, error: BaseException | None) -> None:
    """With a distributed_config, every rank learns whether any rank failed; all raise then.

    Loading is collective there (every rank calls it, as every rank calls step()), so a bad
    part on one rank leaves every rank unchanged instead of leaving the ranks inconsistent."""
    if (
        getattr(optimizer, "_distributed_config", None) is None
        or not dist.is_available()
        or not dist.is_initialized()
    ):
        if error is not None:
            raise error
        return
    mine = None if error is None else (type(error).__name__, str(error))
    everyone: list[tuple[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    failures = [(rank, failure) for rank, failure in enumerate(everyone) if failure is not None]
    if error is not None:
        raise error
    if failures:
        rank, (kind, message) = failures[0]
        kinds = {"KeyError": KeyError, "ValueError": ValueError, "TypeError": TypeError}
        raise kinds.get(kind, RuntimeError)(
            f"Loading the optimizer state failed on rank(s) {[r for r, _ in failures]}, so no "
            f"rank loaded anything. Rank {rank}: {message}"
        )


def _check_and_apply(
    optimizer: Any,
    loaded_states: _Loaded,
    loaded_groups: Sequence[tuple[dict[str, Any], Mapping[str, Any]]],
    early_error: BaseException | None = None,
) -> None:
    """Validates every state and group (and agrees across ranks), then copies them in."""
    error = early_error
    resolved: list[tuple[dict[str, Any], dict[str, Any]]] = []
    if error is None:
        try:
            resolved = _validate(optimizer, loaded_states, loaded_groups)
        except Exception as caught:  # every failure must reach _agree, or the ranks hang
            error = caught
    if error is not None and isinstance(error, (KeyError, ValueError, TypeError)):
        where = _aliases_live_state(loaded_states)
        if where is not None:
            message = error.args[0] if error.args else str(error)
            error = type(error)(message + _ALIAS_NOTE.format(where=where))
    _agree(optimizer, error)
    with torch.no_grad():
        for _, current, loaded in loaded_states:
            for key, target in current.items():
                value = _in_target_layout(key, loaded[key], target)
                if not _same_memory(value, target):
                    target.copy_(value)
    for group, candidate in resolved:
        group.update({k: v for k, v in candidate.items() if k != PARAMS})


def _group_key(group: dict[str, Any], param_to_key: Mapping[torch.Tensor, str]) -> str:
    return "/".join(sorted(param_to_key[p] for p in group[PARAMS]))


def _group_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in group.items() if k != PARAMS}


# ------------------------------------------------------------------ standard protocol
def state_dict(optimizer: Any) -> dict[str, Any]:
    """torch.optim-style: {"state": {param_index: {flat_key: tensor}}, "param_groups": [...]}.

    Under DDP/HSDP each rank returns the blocks it owns (and FSDP-family ranks their shards'
    blocks): save it per rank and load it with the same world size and config."""
    index = 0
    states: dict[int, dict[str, torch.Tensor]] = {}
    groups = []
    for group in optimizer.param_groups:
        indices = []
        for p in group[PARAMS]:
            if p in optimizer.state:
                states[index] = flatten(optimizer.state[p])
            indices.append(index)
            index += 1
        groups.append({**_group_hyperparameters(group), PARAMS: indices})
    return {"state": states, "param_groups": groups}


def _prepare_standard(
    optimizer: Any, state_dict: Mapping[str, Any]
) -> tuple[_Loaded, list[tuple[dict[str, Any], Mapping[str, Any]]]]:
    if not isinstance(state_dict, Mapping) or set(state_dict) != {"state", "param_groups"}:
        raise ValueError(
            "state_dict must be a mapping with exactly the keys 'state' and 'param_groups' "
            "(as returned by DistributedShampoo.state_dict())."
        )
    loaded_groups = list(state_dict["param_groups"])
    if len(loaded_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"Different param_groups count: {len(optimizer.param_groups)} vs {len(loaded_groups)}"
        )
    params: list[torch.Tensor] = []
    for index, (group, loaded) in enumerate(zip(optimizer.param_groups, loaded_groups)):
        if len(loaded.get(PARAMS, ())) != len(group[PARAMS]):
            raise ValueError(
                f"Param group {index} has {len(group[PARAMS])} parameters but the loaded one has "
                f"{len(loaded.get(PARAMS, ()))}."
            )
        params.extend(group[PARAMS])
    loaded_states = state_dict["state"]
    unknown = sorted(set(loaded_states) - set(range(len(params))), key=str)
    if unknown:
        raise KeyError(f"Parameter index {unknown[0]} of the loaded state has no parameter.")
    checks: _Loaded = []
    for index, p in enumerate(params):
        if p not in optimizer.state:
            if index in loaded_states:
                raise KeyError(
                    f"Parameter {index} has state in the loaded state dict but none in this "
                    "optimizer (under DDP/HSDP each rank's state_dict() holds its own blocks: "
                    "load it on the same rank with the same world size)."
                )
            continue
        if index not in loaded_states:
            raise KeyError(f"Parameter {index} not found in the loaded state.")
        checks.append((str(index), flatten(optimizer.state[p]), loaded_states[index]))
    hyperparameters = [
        (group, {k: v for k, v in loaded.items() if k != PARAMS})
        for group, loaded in zip(optimizer.param_groups, loaded_groups)
    ]
    return checks, hyperparameters


def load_state_dict(optimizer: Any, state_dict: Mapping[str, Any]) -> None:
    checks: _Loaded = []
    groups: list[tuple[dict[str, Any], Mapping[str, Any]]] = []
    early: BaseException | None = None
    try:
        checks, groups = _prepare_standard(optimizer, state_dict)
    except Exception as caught:  # reaches _agree on every rank
        early = caught
    _check_and_apply(optimizer, checks, groups, early)


# ---------------------------------------------------------- distributed (by FQN) protocol
def distributed_state_dict(
    optimizer: Any, key_to_param: Iterable[tuple[str, torch.Tensor]], save_param_groups: bool
) -> dict[str, Any]:
    """The live state tensors by parameter name (nothing is copied)."""
    param_to_key = {param: key for key, param in key_to_param}
    ret: dict[str, Any] = {
        "state": {
            param_to_key[p]: flatten(optimizer.state[p])
            for group in optimizer.param_groups
            for p in group[PARAMS]
            if p in optimizer.state and p in param_to_key
        }
    }
    missing = [
        str(tuple(p.shape))
        for group in optimizer.param_groups
        for p in group[PARAMS]
        if p not in param_to_key
    ]
    if missing:
        raise KeyError(
            f"key_to_param names no key for optimizer parameters of shapes {missing}; pass "
            "model.named_parameters() of the model whose parameters the optimizer holds."
        )
    if save_param_groups:
        ret["param_groups"] = {
            _group_key(group, param_to_key): _group_hyperparameters(group)
            for group in optimizer.param_groups
        }
    return ret


def _prepare_distributed(
    optimizer: Any,
    state_dict: Mapping[str, Any],
    key_to_param: Iterable[tuple[str, torch.Tensor]],
    save_param_groups: bool,
    enable_missing_key_check: bool,
) -> tuple[_Loaded, list[tuple[dict[str, Any], Mapping[str, Any]]]]:
    key_to_param = dict(key_to_param)
    param_to_key = {param: key for key, param in key_to_param.items()}
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("state"), Mapping):
        raise ValueError(
            "state_dict must be a mapping with a 'state' dict (and 'param_groups' unless "
            "save_param_groups=False), as returned by distributed_state_dict()."
        )
    loaded_states = state_dict["state"]
    checks: _Loaded = []
    for key, flat in loaded_states.items():
        param = key_to_param.get(key)
        if param is None:
            message = f"Parameter key {key} not found in key_to_param mapping!"
            if enable_missing_key_check:
                raise KeyError(message)
            logger.warning(message)
            continue
        if param not in optimizer.state:
            message = f"Parameter {param} not found in state!"  # the reference's text
            sample = next(iter(flat), None) if isinstance(flat, Mapping) else None
            if isinstance(sample, str) and (sample.startswith('["rank_') or _is_sharded(optimizer)):
                message += (
                    f" The checkpoint holds state for it ({sample}) that this rank does not."
                    + _hint(optimizer, sample)
                )
            if enable_missing_key_check:
                raise KeyError(message)
            logger.warning(message)
            continue
        checks.append((key, flatten(optimizer.state[param]), flat))
    # A checkpoint that covers only some parameters loads those and leaves the others as
    # they are, as in the reference; missing keys inside a covered parameter's state still
    # raise (_check_param_state).
    hyperparameters: list[tuple[dict[str, Any], Mapping[str, Any]]] = []
    if save_param_groups:
        loaded_groups = state_dict.get("param_groups")
        if not isinstance(loaded_groups, Mapping):
            raise ValueError(
                "state_dict has no 'param_groups' dict; pass save_param_groups=False to load "
                "a state dict saved without them."
            )
        if len(optimizer.param_groups) != len(loaded_groups):
            current_count, loaded_count = len(optimizer.param_groups), len(loaded_groups)
            raise ValueError(f"Different param_groups count: {current_count} vs {loaded_count}")
        for group in optimizer.param_groups:
            key = _group_key(group, param_to_key)
            if key not in loaded_groups:
                raise ValueError(f"Param group {key} not found in param_groups_to_load!")
            hyperparameters.append((group, loaded_groups[key]))
    return checks, hyperparameters


def load_distributed_state_dict(
    optimizer: Any,
    state_dict: Mapping[str, Any],
    key_to_param: Iterable[tuple[str, torch.Tensor]],
    save_param_groups: bool,
    enable_missing_key_check: bool,
) -> None:
    checks: _Loaded = []
    groups: list[tuple[dict[str, Any], Mapping[str, Any]]] = []
    early: BaseException | None = None
    try:
        checks, groups = _prepare_distributed(
            optimizer, state_dict, key_to_param, save_param_groups, enable_missing_key_check
        )
    except Exception as caught:  # reaches _agree on every rank
        early = caught
    _check_and_apply(optimizer, checks, groups, early)
