"""DDP (SPEC B §7.2, A.3.6, A.3.8) on CPU with gloo: N spawned ranks equal one process.

Each configuration trains the same model (linear, conv and 1-d parameters, plus a layer that
gets no gradient) for several steps, including inverse-root steps, with the global batch
split over the ranks, and compares with a single-process DistributedShampoo on the whole
batch. One spawn per world size runs every configuration, to keep the suite fast.
"""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import (
    AdamGraftingConfig,
    CommunicationDType,
    DDPShampooConfig,
)
from tests.dist_teardown import shutdown_process_group

STEPS = 5
GLOBAL_BATCH = 8


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(12, 5)
        self.head = nn.Linear(5, 1)
        self.dead = nn.Linear(4, 1)  # never used: its grads stay None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def make_data() -> tuple:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 2, 4, 4, generator=g), torch.randn(GLOBAL_BATCH, 1, generator=g)


def optimizer_kwargs() -> dict:
    return dict(
        lr=0.01, betas=(0.9, 0.99), epsilon=1e-3,  # well conditioned: see TOLERANCE
        momentum=0.5, weight_decay=0.01,
        max_preconditioner_dim=4, precondition_frequency=2, start_preconditioning_step=2,
        grafting_config=AdamGraftingConfig(beta2=0.99, epsilon=1e-8),
    )


def train(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def serial_result() -> list:
    torch.manual_seed(0)
    model = Net()
    train(model, DistributedShampoo(model.parameters(), **optimizer_kwargs()), *make_data())
    return [p.detach().clone() for p in model.parameters()]


CONFIGS_2 = [
    ("fp32", dict(communication_dtype=CommunicationDType.FP32)),
    ("default+params", dict(communicate_params=True)),
    ("fp16", dict(communication_dtype=CommunicationDType.FP16)),
    ("bf16", dict(communication_dtype=CommunicationDType.BF16)),
]
CONFIGS_4 = [
    ("trainers=1", dict(num_trainers_per_group=1)),
    ("trainers=2", dict(num_trainers_per_group=2)),
    ("trainers=-1", dict(num_trainers_per_group=-1)),
]


def worker(rank: int, world: int, port: int, configs: list, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    inputs, targets = make_data()
    shard = GLOBAL_BATCH // world
    local = slice(rank * shard, (rank + 1) * shard)
    results = {}
    for name, config in configs:
        torch.manual_seed(0)
        model = Net()
        ddp_model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        optimizer = DistributedShampoo(
            model.parameters(), **optimizer_kwargs(), distributed_config=DDPShampooConfig(**config)
        )
        train(ddp_model, optimizer, inputs[local], targets[local])
        state_bytes = sum(
            t.numel() * t.element_size()
            for state in optimizer.state.values()
            for t in _tensors(state)
        )
        results[name] = ([p.detach().clone() for p in model.parameters()], state_bytes)
    # A model whose only parameter is one block: the other ranks own nothing, and still
    # take part in every collective (no hang).
    one = nn.Linear(3, 1, bias=False)
    torch.manual_seed(0)
    nn.init.normal_(one.weight)
    optimizer = DistributedShampoo(
        one.parameters(), lr=0.1, precondition_frequency=1, distributed_config=DDPShampooConfig()
    )
    one.weight.grad = torch.ones_like(one.weight)
    optimizer.step()
    results["single-block"] = ([one.weight.detach().clone()], 0)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown_process_group()


def _tensors(state: object) -> list:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for value in state.values() for t in _tensors(value)]
    return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, configs: list) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(world, free_port(), configs, out_dir), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


# Tolerances: fp32 communication changes only the order of the gradient all-reduce (float32
# rounding, ~1e-6 relative after a few steps); fp16/bf16 round each update to 11/8 mantissa
# bits (relative 2^-11 / 2^-8 of an update of size ~lr) before it is applied.
TOLERANCE = {"fp32": 1e-5, "default+params": 1e-5, "fp16": 1e-4, "bf16": 1e-3}


@pytest.fixture(scope="module")
def two_ranks() -> list:
    return run(2, CONFIGS_2)


@pytest.mark.parametrize("name", [c[0] for c in CONFIGS_2])
def test_ddp_two_ranks_equals_serial(two_ranks: list, name: str) -> None:
    expected = serial_result()
    for rank_results in two_ranks:
        params, _ = rank_results[name]
        for got, want in zip(params, expected):
            torch.testing.assert_close(got, want, rtol=TOLERANCE[name], atol=TOLERANCE[name])


def test_ddp_low_precision_communication_is_not_exact(two_ranks: list) -> None:
    """bf16 communication really rounds: it differs from fp32 communication."""
    fp32 = two_ranks[0]["fp32"][0]
    bf16 = two_ranks[0]["bf16"][0]
    assert any(not torch.equal(a, b) for a, b in zip(fp32, bf16))


def test_ddp_state_is_split_between_ranks(two_ranks: list) -> None:
    torch.manual_seed(0)
    model = Net()
    serial = DistributedShampoo(model.parameters(), **optimizer_kwargs())
    serial_bytes = sum(
        t.numel() * t.element_size() for state in serial.state.values() for t in _tensors(state)
    )
    per_rank = [r["fp32"][1] for r in two_ranks]
    # Each rank holds its own blocks only (the step counter is on every rank).
    assert max(per_rank) < 0.75 * serial_bytes
    assert abs(sum(per_rank) - serial_bytes) <= 8


def test_ddp_single_block_model_does_not_hang(two_ranks: list) -> None:
    a, b = (r["single-block"][0][0] for r in two_ranks)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddp_four_ranks_trainer_groups() -> None:
    results = run(4, CONFIGS_4)
    expected = serial_result()
    for rank_results in results:
        for name, _ in CONFIGS_4:
            for got, want in zip(rank_results[name][0], expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ddp_without_process_group_is_a_clear_error() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedShampoo(model.parameters(), distributed_config=DDPShampooConfig())


def test_invalid_num_trainers_per_group() -> None:
    with pytest.raises(ValueError, match="num_trainers_per_group"):
        DDPShampooConfig(num_trainers_per_group=0)
