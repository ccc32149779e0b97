"""torch.distributed.checkpoint support: `ShampooLoadPlanner`, for atomic, checked loads.

`torch.distributed.checkpoint.load(state_dict, ...)` reads *into* the tensors of the state
dict it is given. The tensors of `distributed_state_dict()` are the optimizer's live state
(saving copies nothing), so with the default planner a bad checkpoint would already be in
the optimizer before `load_distributed_state_dict` could check it; and the default planner
stops at the first missing key or shape mismatch with a message that cannot say why.

`ShampooLoadPlanner` is a `DefaultLoadPlanner` that differs in three ways:
- every plain tensor of the state dict (optimizer state, and a plain model state dict's
  tensors) is read into a new tensor of the checkpoint's own shape and dtype, which replaces
  the caller's tensor in the state dict; `load_distributed_state_dict` and
  `model.load_state_dict` then check it and copy it in. Loading thus needs one temporary copy
  of what it loads. DTensors and ShardedTensors (FSDP model state) are read in place as usual;
- a Shampoo state key or param group that the checkpoint lacks is left out of the state
  dict, and a checkpoint entry that no rank asks for (a block of a shard rank that no longer
  exists, state this optimizer does not keep, one more param group) is added to it as an
  empty placeholder, so that `load_distributed_state_dict` sees exactly what the checkpoint
  holds and reports any mismatch, naming the key, on every rank together, before anything
  changes;
- it skips DCP's guess that a checkpoint predates torch 2.4 (see create_local_plan).

Use the same planner with the older `torch.distributed.checkpoint.load_state_dict`.
"""

import dataclasses
import json
import re
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan

__all__ = ["ShampooLoadPlanner"]

_Path = tuple[Any, ...]
_BLOCK_KEY = re.compile(r"^(rank_\d+-)?block_\d+$")


def _is_state_key(key: Any) -> bool:
    """A flat key of distributed_state_dict(): '["step"]' or '["block_0", ...]'."""
    if not isinstance(key, str) or not key.startswith("["):
        return False
    try:
        path = json.loads(key)
    except ValueError:
        return False
    return (
        isinstance(path, list)
        and bool(path)
        and (path == ["step"] or (isinstance(path[0], str) and bool(_BLOCK_KEY.match(path[0]))))
    )


def _container(root: Any, path: _Path) -> Any:
    for key in path:
        root = root[key]
    return root


class ShampooLoadPlanner(DefaultLoadPlanner):
    """A `DefaultLoadPlanner` that loads DistributedShampoo state atomically (see module doc).

    Keyword arguments go to `DefaultLoadPlanner` (`flatten_state_dict` must stay True).
    """

    def __init__(self, **kwargs: Any) -> None:
        if not kwargs.get("flatten_state_dict", True):
            raise ValueError("ShampooLoadPlanner needs flatten_state_dict=True.")
        super().__init__(**kwargs)
        self._prefixes: set[_Path] = set()

    # ------------------------------------------------------------------- local (each rank)
    def set_up_planner(
        self,
        state_dict: dict[str, Any],
        metadata: Metadata | None = None,
        is_coordinator: bool = False,
    ) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        assert metadata is not None
        self._prefixes = set()
        saved = metadata.state_dict_metadata
        for fqn, path in list(self.mappings.items()):
            current = self.state_dict[fqn]
            entry = saved.get(fqn)
            if len(path) >= 3 and path[-3] == "state" and _is_state_key(path[-1]):
                self._prefixes.add(tuple(path[:-3]))
                if entry is None:
                    self._drop(fqn)  # load_distributed_state_dict names the missing key
                    continue
            elif type(current) not in (torch.Tensor, torch.nn.Parameter) or entry is None:
                continue  # DTensors, ShardedTensors, non-tensors: as DefaultLoadPlanner does
            if isinstance(entry, TensorStorageMetadata):
                # Read into a new tensor of the checkpoint's shape and dtype, never into the
                # caller's (possibly live) one; load_state_dict / load_distributed_state_dict
                # check it and copy it in.
                device = current.device if isinstance(current, torch.Tensor) else None
                self._put(fqn, torch.empty(entry.size, dtype=entry.properties.dtype, device=device))
            # A non-tensor entry: DCP replaces the value with it, and the load reports it.
        groups: dict[_Path, list[str]] = {}
        for fqn, path in self.mappings.items():
            group = self._group_of(path)
            if group is not None:
                groups.setdefault(group, []).append(fqn)
        for group, fqns in groups.items():
            missing = [fqn for fqn in fqns if fqn not in saved]
            for fqn in missing:
                self._drop(fqn)
            if len(missing) == len(fqns):  # the checkpoint has no such group at all
                del _container(self.original_state_dict, group[:-1])[group[-1]]

    def create_local_plan(self) -> LoadPlan:
        # DefaultLoadPlanner re-flattens the state dict the pre-2.4 way when a checkpoint key
        # missing here matches an old-style key, a guess that misfires when this rank simply
        # lacks entries (its empty FSDP shards, other ranks' blocks) and would then ask for
        # whole param-group dicts and empty state dicts. DistributedShampoo checkpoints are
        # always in the current format.
        assert self.metadata is not None
        return create_default_local_load_plan(
            self.state_dict, self.metadata, not self.allow_partial_load
        )

    def _group_of(self, path: _Path) -> _Path | None:
        """prefix + ("param_groups", group_key) for a param-group entry of our state dicts."""
        for prefix in self._prefixes:
            n = len(prefix)
            if len(path) > n + 2 and tuple(path[:n]) == prefix and path[n] == "param_groups":
                return tuple(path[: n + 2])
        return None

    def _drop(self, fqn: str) -> None:
        path = self.mappings.pop(fqn)
        del self.state_dict[fqn]
        del _container(self.original_state_dict, path[:-1])[path[-1]]

    def _put(self, fqn: str, value: torch.Tensor) -> None:
        path = self.mappings[fqn]
        self.state_dict[fqn] = value
        _container(self.original_state_dict, path[:-1])[path[-1]] = value

    # ------------------------------------------------------------------ global (coordinator)
    def _checkpoint_path(self, fqn: str) -> _Path | None:
        """The object path of a checkpoint entry under one of our prefixes, else None."""
        planner_data = getattr(self.metadata, "planner_data", None)
        path = planner_data.get(fqn) if isinstance(planner_data, dict) else None
        if path is None:  # a checkpoint written without flattening mappings: parse the string
            for prefix in self._prefixes:
                lead = ".".join(map(str, prefix)) + "." if prefix else ""
                if fqn.startswith(lead + "state."):
                    rest = fqn[len(lead) + len("state.") :]
                    cut = rest.find('.["')
                    if cut > 0:
                        path = prefix + ("state", rest[:cut], rest[cut + 1 :])
                elif fqn.startswith(lead + "param_groups."):
                    group, _, name = fqn[len(lead) + len("param_groups.") :].rpartition(".")
                    if group:
                        path = prefix + ("param_groups", group, name)
        if path is None:
            return None
        path = tuple(path)
        for prefix in self._prefixes:
            n = len(prefix)
            if tuple(path[:n]) != prefix or len(path) <= n + 2:
                continue
            if path[n] == "state" and len(path) == n + 3 and _is_state_key(path[-1]):
                return path
            if path[n] == "param_groups":
                return path
        return None

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        global_plan = super().create_global_plan(global_plan)
        assert self.metadata is not None
        requested = [{item.dest_index.fqn for item in plan.items} for plan in global_plan]
        everything = set().union(*requested)
        heads: list[set[_Path]] = []  # per rank: prefix + ("state", name) it loads
        loaded_groups: set[_Path] = set()
        for fqns in requested:
            mine: set[_Path] = set()
            for fqn in fqns:
                path = self._checkpoint_path(fqn)
                if path is None:
                    continue
                group = self._group_of(path)
                if group is not None:
                    loaded_groups.add(group)
                else:
                    mine.add(path[:-1])
            heads.append(mine)
        extras: list[list[tuple[_Path, Any]]] = [[] for _ in global_plan]
        for fqn, entry in self.metadata.state_dict_metadata.items():
            if fqn in everything:
                continue
            path = self._checkpoint_path(fqn)
            if path is None:
                continue
            group = self._group_of(path)
            if group is not None:
                if group not in loaded_groups:  # one more param group than this optimizer
                    loaded_groups.add(group)
                    for extra in extras:
                        extra.append((group, None))
                continue
            spec = (
                (tuple(entry.size), entry.properties.dtype)
                if isinstance(entry, TensorStorageMetadata)
                else ((), torch.float32)
            )
            # To the ranks that hold this parameter's state, else to the coordinator.
            ranks = [r for r, mine in enumerate(heads) if path[:-1] in mine] or [0]
            for r in ranks:
                extras[r].append((path, spec))
        return [
            dataclasses.replace(plan, planner_data=extra)
            for plan, extra in zip(global_plan, extras)
        ]

    def finish_plan(self, new_plan: LoadPlan) -> LoadPlan:
        for path, spec in new_plan.planner_data or ():
            node = self.original_state_dict
            for key in path[:-1]:
                node = node.setdefault(key, {})
            if spec is None:
                node[path[-1]] = {}
            else:
                size, dtype = spec
                node[path[-1]] = torch.empty(size, dtype=dtype, device="meta")
        return super().finish_plan(dataclasses.replace(new_plan, planner_data=None))
