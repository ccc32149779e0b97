"""Saving and loading the optimizer state (SPEC B §8, A.3.11).

State is keyed by parameter (index or fully-qualified name) and by block key, never by rank.
Loading validates everything first — keys, shapes, dtypes, finiteness, param groups — and
only then copies in place, so a bad checkpoint leaves the optimizer exactly as it was.
"""

import copy
import logging
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import torch

from distributed_shampoo.shampoo_types import PARAMS
from distributed_shampoo.utils.shampoo_checkpoint_utils import flatten
from distributed_shampoo.utils.shampoo_hyperparameters import validate_group

logger = logging.getLogger("distributed_shampoo.distributed_shampoo")

_Loaded = List[Tuple[str, Dict[str, torch.Tensor], Mapping[str, Any]]]


def _group_key(group: Dict[str, Any], param_to_key: Mapping[torch.Tensor, str]) -> str:
    return "/".join(sorted(param_to_key[p] for p in group[PARAMS]))


def _group_hyperparameters(group: Dict[str, Any]) -> Dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in group.items() if k != PARAMS}


def _check_param_state(name: str, current: Dict[str, torch.Tensor], loaded: Mapping[str, Any]) -> None:
    for key in current:
        if key not in loaded:
            raise KeyError(f"Key {key} not found in state dict to load (parameter {name}).")
    for key, value in loaded.items():
        if key not in current:
            raise KeyError(
                f"Unexpected key {key} in the loaded state of parameter {name}: the optimizer has "
                "no such state (was the checkpoint written with other hyperparameters, e.g. "
                "momentum, betas or grafting_config?)."
            )
        target = current[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"State {key} of parameter {name} must be a tensor; got {type(value).__name__}."
            )
        if value.shape != target.shape:
            raise ValueError(
                f"Shape mismatch for state {key} of parameter {name}: checkpoint has "
                f"{tuple(value.shape)}, the optimizer expects {tuple(target.shape)} (was the "
                "checkpoint written with another max_preconditioner_dim or use_merge_dims?)."
            )
        if value.dtype != target.dtype:
            raise ValueError(
                f"Dtype mismatch for state {key} of parameter {name}: checkpoint has "
                f"{value.dtype}, the optimizer expects {target.dtype} (see precision_config)."
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"State {key} of parameter {name} holds NaN or Inf values.")


def _check_and_apply(
    optimizer: Any,
    loaded_states: _Loaded,
    loaded_groups: Sequence[Tuple[Dict[str, Any], Dict[str, Any]]],
) -> None:
    """Validates every state and group, then copies them in; all-or-nothing."""
    for name, current, loaded in loaded_states:
        _check_param_state(name, current, loaded)
    resolved = []
    for index, (group, hyperparameters) in enumerate(loaded_groups):
        candidate = {**group, **copy.deepcopy(dict(hyperparameters))}
        validate_group(candidate, where=f"loaded param group {index}: ", warn=False)
        resolved.append((group, candidate))
    with torch.no_grad():
        for _, current, loaded in loaded_states:
            for key, target in current.items():
                target.copy_(loaded[key])
    for group, candidate in resolved:
        group.update({k: v for k, v in candidate.items() if k != PARAMS})


# ------------------------------------------------------------------ standard protocol
def state_dict(optimizer: Any) -> Dict[str, Any]:
    """torch.optim-style: {"state": {param_index: {flat_key: tensor}}, "param_groups": [...]}."""
    index = 0
    states: Dict[int, Dict[str, torch.Tensor]] = {}
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


def load_state_dict(optimizer: Any, state_dict: Mapping[str, Any]) -> None:
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
    params: List[torch.Tensor] = []
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
            continue
        if index not in loaded_states:
            raise KeyError(f"Parameter {index} not found in the loaded state.")
        checks.append((str(index), flatten(optimizer.state[p]), loaded_states[index]))
    hyperparameters = [
        (group, {k: v for k, v in loaded.items() if k != PARAMS})
        for group, loaded in zip(optimizer.param_groups, loaded_groups)
    ]
    _check_and_apply(optimizer, checks, hyperparameters)


# ---------------------------------------------------------- distributed (by FQN) protocol
def distributed_state_dict(
    optimizer: Any, key_to_param: Iterable[Tuple[str, torch.Tensor]], save_param_groups: bool
) -> Dict[str, Any]:
    param_to_key = {param: key for key, param in key_to_param}
    ret: Dict[str, Any] = {
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


def load_distributed_state_dict(
    optimizer: Any,
    state_dict: Mapping[str, Any],
    key_to_param: Iterable[Tuple[str, torch.Tensor]],
    save_param_groups: bool,
    enable_missing_key_check: bool,
) -> None:
    key_to_param = dict(key_to_param)
    param_to_key = {param: key for key, param in key_to_param.items()}
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
            message = f"Parameter {key} (shape {tuple(param.shape)}) not found in state!"
            if enable_missing_key_check:
                raise KeyError(message)
            logger.warning(message)
            continue
        checks.append((key, flatten(optimizer.state[param]), flat))
    if enable_missing_key_check:
        for group in optimizer.param_groups:
            for p in group[PARAMS]:
                key = param_to_key.get(p)
                if p in optimizer.state and key is not None and key not in loaded_states:
                    raise KeyError(f"Parameter {key} has optimizer state but none in the checkpoint.")
    hyperparameters = []
    if save_param_groups:
        loaded_groups = state_dict["param_groups"]
        if len(optimizer.param_groups) != len(loaded_groups):
            raise ValueError(
                f"Different param_groups count: {len(optimizer.param_groups)} vs {len(loaded_groups)}"
            )
        for group in optimizer.param_groups:
            key = _group_key(group, param_to_key)
            if key not in loaded_groups:
                raise ValueError(f"Param group {key} not found in param_groups_to_load!")
            hyperparameters.append((group, loaded_groups[key]))
    _check_and_apply(optimizer, checks, hyperparameters)
