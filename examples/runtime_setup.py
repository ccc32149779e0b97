"""The process the CIFAR-10 examples run in: device choice, torchrun's process group, logging
set-up and seeding, kept apart so that the data, checkpoint and training modules share one
``Runtime`` without importing each other."""

import argparse
import logging
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger("examples")


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(args: argparse.Namespace, distributed: bool) -> Runtime:
    """Picks the device, and for the multi-process examples joins torchrun's process group
    (nccl on CUDA, gloo on CPU)."""
    script = Path(sys.argv[0]).name
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # The optimizer's per-block INFO lines are noise here (its warnings still show), and so
    # is torch.distributed's deprecation chatter about its own internals.
    logging.getLogger("distributed_shampoo").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    for message in (
        "`_get_pg_default_device` will be deprecated",
        "Multiple backends are registered",
        "torch.distributed is disabled",
    ):
        warnings.filterwarnings("ignore", message=message)
    device_type = args.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if distributed:
        if "RANK" not in os.environ:
            raise SystemExit(
                f"{script} runs several processes: start it with\n"
                f"  torchrun --standalone --nproc_per_node=N {script} ..."
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, device_id=device if device.type == "cuda" else None
        )
    elif world > 1:
        raise SystemExit(
            f"{script} is the single-process example but was started with WORLD_SIZE={world}; "
            "use --nproc_per_node=1, or ddp_cifar10_example.py for several processes."
        )
    logger.info(
        "device %s, %d process(es)%s",
        device,
        world,
        f", backend {dist.get_backend()}" if dist.is_initialized() else "",
    )
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, device=device)


def set_seed(seed: int) -> None:
    """The same seed on every rank: FSDP and FSDP2 keep each rank's shard of its own init."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cleanup() -> None:
    if dist.is_initialized():
        # gloo's worker thread destroys a finished work (a barrier keeps the tensors of the
        # works before it) after the waiting rank has moved on, and that needs the GIL. If
        # the process group's last reference (DDP's reducer) is then dropped while this
        # thread holds the GIL, its destructor joins the worker thread: a deadlock at exit
        # (seen under load). So: a last barrier, a pause without the GIL for the worker to
        # finish, then the group goes.
        dist.barrier()
        time.sleep(0.2)
        dist.destroy_process_group()
