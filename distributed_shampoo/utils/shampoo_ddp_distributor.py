"""DDP (SPEC B §7.2, A.3.6, A.3.8): blocks spread over the ranks of a trainer group.

Each rank keeps state for, and computes, only the blocks it owns; the updates (or, with
communicate_params, the updated parameters) travel in one flat all-gather in the
communication dtype, and every rank then applies all of them. Ownership is computed from the
block sizes alone, identically on every rank, so no rank needs to ask another.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from distributed_shampoo import _backend
from distributed_shampoo.shampoo_types import COMMUNICATION_TORCH_DTYPES, DDPShampooConfig
from distributed_shampoo.utils.shampoo_block_layout import BlockLayout

# Each block's slot in the byte budget is rounded up to this, as the reference does, so that
# the greedy balance it produces is the documented one (SPEC B §7.2.2).
_ALIGNMENT_BYTES = 64


def assign_blocks(numels: np.ndarray, element_size: int, group_size: int) -> np.ndarray:
    """Owner rank of each block: largest blocks first (stable), each to the least-loaded rank
    (ties to the lowest rank). Deterministic, so every rank computes the same answer."""
    sizes = -(-numels.astype(np.int64) * element_size // _ALIGNMENT_BYTES) * _ALIGNMENT_BYTES
    owners = np.zeros(len(sizes), dtype=np.int64)
    load = np.zeros(group_size, dtype=np.int64)
    for block in np.argsort(-sizes, kind="stable"):
        rank = int(np.argmin(load))
        owners[block] = rank
        load[rank] += sizes[block]
    return owners


@dataclass
class DDPPlacement:
    """The trainer group one optimizer spreads its blocks over (shared by its param groups)."""

    config: DDPShampooConfig
    process_group: dist.ProcessGroup | None
    group_size: int
    group_rank: int

    def owners(self, layout: BlockLayout) -> np.ndarray:
        dtype = COMMUNICATION_TORCH_DTYPES[self.config.communication_dtype]
        element_size = torch.empty((), dtype=dtype).element_size()
        return assign_blocks(layout.table.numpy()[:, _backend.BF_NUMEL], element_size, self.group_size)


def _all_gather_into(output: torch.Tensor, chunk: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    # torch 2.13 renames all_gather_into_tensor (deprecated there) to all_gather_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, chunk, group=group)


def trainer_group(config: DDPShampooConfig) -> DDPPlacement:
    """(process group, its size, this rank's index in it) for num_trainers_per_group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "DDPShampooConfig needs torch.distributed to be initialized: call "
            "torch.distributed.init_process_group(...) before constructing DistributedShampoo."
        )
    world = dist.get_world_size()
    size = config.num_trainers_per_group
    if size == -1:
        size = world
    if size < 1 or world % size != 0:
        raise ValueError(
            f"Invalid num_trainers_per_group: {config.num_trainers_per_group}. Must be -1 (all "
            f"{world} ranks) or a positive divisor of the world size {world}."
        )
    if size == world:
        return DDPPlacement(config, None, world, dist.get_rank())
    group, _ = dist.new_subgroups(group_size=size)
    return DDPPlacement(config, group, size, dist.get_rank(group))


class DDPExchange:
    """The all-gather of one param group's updates, through one flat buffer.

    Rank r's chunk holds the updates of the blocks r owns, packed in their local block order;
    `receive_table` addresses every global block inside the gathered buffer, so that one C
    pass writes all of them into the parameters' layout.
    """

    def __init__(
        self,
        layout: BlockLayout,
        owners: np.ndarray,
        placement: DDPPlacement,
        device: torch.device,
        working_dtype: torch.dtype,
    ) -> None:
        self.process_group = placement.process_group
        group_size, group_rank = placement.group_size, placement.group_rank
        self.communicate_params = placement.config.communicate_params
        self.comm_dtype = COMMUNICATION_TORCH_DTYPES[placement.config.communication_dtype]
        numels = layout.table.numpy()[:, _backend.BF_NUMEL]
        local_numel = [int(numels[owners == r].sum()) for r in range(group_size)]
        self.chunk = max(max(local_numel), 1)
        # Where each global block sits in the gathered buffer: owner's chunk, then its local
        # position among the blocks that owner holds (they keep global order).
        receive = layout.table.numpy().copy()
        for r in range(group_size):
            mine = owners == r
            sizes = numels[mine]
            receive[mine, _backend.BF_BLOCK_OFFSET] = r * self.chunk + np.cumsum(sizes) - sizes
        self.receive_table = _backend.KernelTable(receive, device)
        self.group_size, self.group_rank = group_size, group_rank
        self.device, self.working_dtype = device, working_dtype
        self.local_numel = local_numel[group_rank]
        self.failure_flag = torch.zeros(1, device=device)
        # The all-gather's buffers live for one step (new_payload ... release): between steps
        # the memory is the model's.
        self.buffer: torch.Tensor | None = None
        self.own: torch.Tensor | None = None

    def new_payload(self) -> torch.Tensor:
        """This step's payload (this rank's updates, packed, working dtype): a view of the
        gathered buffer's own chunk when the communication dtype is the working dtype, so the
        updates are written where they are sent from."""
        self.buffer = torch.zeros(self.chunk * self.group_size, dtype=self.comm_dtype, device=self.device)
        self.own = self.buffer[self.group_rank * self.chunk : (self.group_rank + 1) * self.chunk]
        if self.comm_dtype == self.working_dtype:
            return self.own[: self.local_numel]
        return torch.zeros(self.local_numel, dtype=self.working_dtype, device=self.device)

    def exchange(self, local_payload: torch.Tensor) -> torch.Tensor:
        """All-gathers each rank's payload (its blocks, packed); returns the gathered buffer in
        the working dtype, addressed by receive_table."""
        assert self.buffer is not None and self.own is not None, "new_payload() first"
        if local_payload.data_ptr() != self.own.data_ptr():
            self.own[: self.local_numel].copy_(local_payload[: self.local_numel])
        _all_gather_into(self.buffer, self.own, self.process_group)
        return self.buffer if self.comm_dtype == self.working_dtype else self.buffer.to(self.working_dtype)

    def release(self) -> None:
        """The step's buffers go (after the gathered updates were applied)."""
        self.buffer = self.own = None

    def agree_on_failure(self, failed: bool) -> bool:
        """Whether any rank of the trainer group failed its step's checks; every rank calls
        this each step so that all of them raise together instead of one hanging in the
        all-gather (SPEC A.3.6)."""
        self.failure_flag.fill_(1.0 if failed else 0.0)
        dist.all_reduce(self.failure_flag, op=dist.ReduceOp.MAX, group=self.process_group)
        return bool(self.failure_flag.item())

    def agree_on_device_failure(self, fail: torch.Tensor) -> None:
        """The CUDA form, without waiting for the device: every rank's failure flag
        (_backend.new_failure_flag) takes the earliest failed step of the group, so that all
        ranks skip the step together (the block index stays the local one)."""
        dist.all_reduce(fail[:1], op=dist.ReduceOp.MIN, group=self.process_group)
