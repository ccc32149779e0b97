"""Resumable checkpoints for the examples: torch.distributed.checkpoint (DCP) save and load
of the model, the optimizer (DistributedShampoo's distributed state dict, or torch's), the
step and each rank's RNG state."""

import argparse
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
    optimizer state dict), the step, and each rank's RNG state. A checkpoint counts once its
    .metadata exists: DCP writes that last, after every rank has written its data.
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

        if isinstance(self.optimizer, DistributedShampoo):
            optim = self.optimizer.distributed_state_dict(key_to_param=named_parameters(self.model))
        else:
            optim = get_optimizer_state_dict(self.model, self.optimizer)
        progress = {
            "step": torch.tensor(step),
            "seed": torch.tensor(args.seed),
            "batch_size": torch.tensor(args.batch_size),
        }
        return {"model": get_model_state_dict(self.model), "optim": optim, "progress": progress}

    def latest(self) -> Optional[Path]:
        found = sorted(self.directory.glob("step_*/.metadata")) if self.directory.is_dir() else []
        choice = [str(found[-1].parent) if found else None]
        if dist.is_initialized():  # rank 0 decides, so every rank loads the same one
            dist.broadcast_object_list(choice, src=0)
        return None if choice[0] is None else Path(choice[0])

    def save(self, step: int, args: argparse.Namespace) -> None:
        import torch.distributed.checkpoint as dcp

        path = self.directory / f"step_{step:08d}"
        (path / "rng").mkdir(parents=True, exist_ok=True)
        rng = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }
        if self.runtime.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.runtime.device)
        torch.save(rng, path / "rng" / f"rank_{self.runtime.rank}.pt")
        dcp.save(self._state(step, args), checkpoint_id=str(path))
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
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(self.model, state["model"])
        if isinstance(self.optimizer, DistributedShampoo):
            self.optimizer.load_distributed_state_dict(
                state["optim"], key_to_param=named_parameters(self.model)
            )
        else:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
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
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            if "cuda" in rng and self.runtime.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.runtime.device)
        else:
            logger.warning(
                "%s has no RNG state for rank %d (another world size?)", path, self.runtime.rank
            )
        step = int(progress["step"])
        logger.info("resumed from %s at step %d", path, step)
        return step
