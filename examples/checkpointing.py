"""Resumable checkpoints for the examples: torch.distributed.checkpoint (DCP) save and load
of the model, the optimizer (DistributedShampoo's distributed state dict, or torch's), the
step and each rank's RNG state."""

import argparse
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from runtime_setup import Runtime
from torch import nn

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.utils.shampoo_dcp import ShampooLoadPlanner
from distributed_shampoo.utils.shampoo_digest import state_digests, verify_digests

logger = logging.getLogger("examples")


# Wrapper prefixes that named_parameters() shows but the model's state-dict keys do not:
# stripping them keys the optimizer state like get_model_state_dict() keys the weights.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def named_parameters(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """model.named_parameters() with DDP's module. and FSDP's wrapper prefixes removed."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    for name, param in model.named_parameters():
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        yield name, param


class Checkpointer:
    """torch.distributed.checkpoint checkpoints in DIR/step_XXXXXXXX/: the model (sharded as
    the model is), the optimizer (DistributedShampoo.distributed_state_dict, or torch's
    optimizer state dict, with a digest of each Shampoo state tensor), the step, and each
    rank's RNG state. Each checkpoint is written into a fresh DIR/.tmp_step_XXXXXXXX/ and
    renamed to DIR/step_XXXXXXXX/ only once every rank has finished, so a step_* directory
    with a .metadata is always complete (a run killed while saving leaves only a .tmp_*).
    Loading reads into new tensors (ShampooLoadPlanner), verifies the digests and checks the
    model state's keys, shapes and dtypes before copying anything into model or optimizer.
    torch.distributed.checkpoint is imported only here: it pulls in DTensor (~1.5 s)."""

    def __init__(
        self,
        directory: str,
        runtime: Runtime,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        keep: int,
    ):
        self.directory, self.runtime, self.keep = Path(directory), runtime, keep
        self.model, self.optimizer = model, optimizer

    def _state(self, step: int, args: argparse.Namespace) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        state: Dict[str, Any] = {"model": get_model_state_dict(self.model)}
        if isinstance(self.optimizer, DistributedShampoo):
            state["optim"] = self.optimizer.distributed_state_dict(key_to_param=named_parameters(self.model))
            state["optim_digests"] = _all_ranks_digests(state["optim"])
        else:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        state["progress"] = {
            "step": torch.tensor(step),
            "seed": torch.tensor(args.seed),
            "batch_size": torch.tensor(args.batch_size),
        }
        return state

    def latest(self) -> Optional[Path]:
        found = sorted(self.directory.glob("step_*/.metadata")) if self.directory.is_dir() else []
        choice = [str(found[-1].parent) if found else None]
        if dist.is_initialized():  # rank 0 decides, so every rank loads the same one
            dist.broadcast_object_list(choice, src=0)
        return None if choice[0] is None else Path(choice[0])

    def save(self, step: int, args: argparse.Namespace) -> None:
        import torch.distributed.checkpoint as dcp

        path = self.directory / f"step_{step:08d}"
        fresh = self.directory / f".tmp_step_{step:08d}"
        if self.runtime.is_main:  # a killed earlier attempt's leftovers
            shutil.rmtree(fresh, ignore_errors=True)
        _barrier()
        (fresh / "rng").mkdir(parents=True, exist_ok=True)
        rng = {"torch": torch.get_rng_state(), **_plain_rng_states()}
        if self.runtime.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.runtime.device)
        torch.save(rng, fresh / "rng" / f"rank_{self.runtime.rank}.pt")
        dcp.save(self._state(step, args), checkpoint_id=str(fresh))
        _barrier()  # every rank's files are written
        if self.runtime.is_main:
            _publish(fresh, path)
        _barrier()
        if self.runtime.is_main and self.keep > 0:
            for old in sorted(self.directory.glob("step_*/.metadata"))[: -self.keep]:
                shutil.rmtree(old.parent, ignore_errors=True)
        logger.info("saved checkpoint %s", path)

    def load(self, path: Path, args: argparse.Namespace) -> int:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = self._state(0, args)
        if "optim_digests" in state:
            state["optim_digests"] = ""  # placeholder: DCP reads the saved digests into it
        live_model = dict(state["model"])
        shampoo = isinstance(self.optimizer, DistributedShampoo)
        # the planner reads into new tensors: nothing live changes until the copies below
        dcp.load(state, checkpoint_id=str(path), planner=ShampooLoadPlanner() if shampoo else None)
        _check_model_state(live_model, state["model"])
        if shampoo:
            _verify_on_every_rank(state["optim"], state["optim_digests"])
            # validates everything before changing anything; the model was checked above
            self.optimizer.load_distributed_state_dict(
                state["optim"], key_to_param=named_parameters(self.model)
            )
        else:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        set_model_state_dict(self.model, state["model"])
        progress = state["progress"]
        if int(progress["seed"]) != args.seed or int(progress["batch_size"]) != args.batch_size:
            logger.warning(
                "the checkpoint was written with --seed %d --batch-size %d: the data "
                "order from here on differs from that run's",
                int(progress["seed"]),
                int(progress["batch_size"]),
            )
        rng_file = path / "rng" / f"rank_{self.runtime.rank}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["torch"])
            _set_plain_rng_states(rng)
            if "cuda" in rng and self.runtime.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.runtime.device)
        else:
            logger.warning(
                "%s has no RNG state for rank %d (another world size?)", path, self.runtime.rank
            )
        step = int(progress["step"])
        logger.info("resumed from %s at step %d", path, step)
        return step


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _publish(fresh: Path, path: Path) -> None:
    """Makes the complete checkpoint in `fresh` visible as `path` by renames (atomic on one
    file system); an older checkpoint at `path` is moved aside first and then removed."""
    aside = path.with_name(f".old_{path.name}")
    shutil.rmtree(aside, ignore_errors=True)
    if path.exists():
        path.rename(aside)
    fresh.rename(path)
    shutil.rmtree(aside, ignore_errors=True)


def _check_model_state(live: Dict[str, Any], loaded: Dict[str, Any]) -> None:
    """ValueError/KeyError before any copy if the loaded model state does not fit the model."""
    missing = sorted(set(live) ^ set(loaded))
    if missing:
        raise KeyError(f"model state key {missing[0]!r} is in only one of the model and the checkpoint")
    for key, value in live.items():
        other = loaded[key]
        if isinstance(value, torch.Tensor) and (
            not isinstance(other, torch.Tensor) or other.shape != value.shape or other.dtype != value.dtype
        ):
            raise ValueError(
                f"model state {key!r}: the checkpoint has {getattr(other, 'shape', type(other))} "
                f"{getattr(other, 'dtype', '')}, the model {value.shape} {value.dtype}"
            )


def _plain_rng_states() -> Dict[str, Any]:
    """Python's and NumPy's RNG states as lists, ints and tensors: what
    torch.load(weights_only=True) reads without unpickling arbitrary objects."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, torch.tensor(words, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def _set_plain_rng_states(rng: Dict[str, Any]) -> None:
    version, words, gauss = rng["python"]
    random.setstate((version, tuple(int(w) for w in words.tolist()), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _all_ranks_digests(optim: Dict[str, Any]) -> str:
    """Every rank's digests merged (each rank saves its own blocks; keys never collide), so
    the one copy DCP keeps of this non-tensor entry covers every rank's state."""
    text = state_digests(optim)
    if not dist.is_initialized():
        return text
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, text)
    merged: Dict[str, int] = {}
    for part in parts:
        merged.update(json.loads(part))
    return json.dumps(merged, sort_keys=True)


def _verify_on_every_rank(optim: Dict[str, Any], digests: str) -> None:
    """verify_digests on each rank; every rank raises if any rank's check failed."""
    error = None
    try:
        verify_digests(optim, digests)
    except ValueError as caught:
        error = caught
    if dist.is_initialized():
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        failed = torch.tensor([error is not None], dtype=torch.int64, device=device)
        dist.all_reduce(failed)
        if int(failed) and error is None:
            raise ValueError("Checkpoint integrity check failed on another rank (that rank names the key).")
    if error is not None:
        raise error
