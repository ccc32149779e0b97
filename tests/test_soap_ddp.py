"""Eigenvalue-corrected Shampoo (SOAP, issue 14) under DDP on CPU with gloo: two spawned ranks,
the global batch split over them, equal the plain torch oracle (tests/soap_oracle.py) run on the
whole batch; each rank holds only its own blocks' eigenbases and second moments."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn

from distributed_shampoo import DDPShampooConfig, DefaultEigenvalueCorrectedShampooConfig, DefaultSOAPConfig
from distributed_shampoo.distributed_shampoo import DistributedShampoo
from tests.soap_oracle import OracleSOAP
from tests.test_ddp import free_port
from tests.dist_teardown import shutdown_process_group

STEPS = 5
SAVE_AT = 3
BATCH = 8
CONFIGS = {"eigh": DefaultEigenvalueCorrectedShampooConfig, "qr": DefaultSOAPConfig}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # no biases, and blocks (4, 4), (4, 2), (2, 4) of max dim 4: every factor has full rank
        # (distinct eigenvalues) from step 2 on, so QR's warm start is well defined
        self.fc = nn.Linear(6, 4, bias=False)
        self.head = nn.Linear(4, 2, bias=False)
        self.dead = nn.Linear(3, 1)  # never used: its grads stay None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x)))


def data() -> tuple:
    g = torch.Generator().manual_seed(3)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 2, generator=g)


def kwargs(name: str) -> dict:
    # eigh: every step's eigenbasis (frequency 1); QR: the first eigenbasis once the factors
    # have full rank (see tests/test_soap.py's docstring on repeated eigenvalues)
    return dict(lr=0.02, betas=(0.9, 0.99), epsilon=1e-3, weight_decay=0.01, max_preconditioner_dim=4,
                precondition_frequency=1 if name == "eigh" else 2, preconditioner_config=CONFIGS[name])


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    inputs, targets = data()
    local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results = {}
    for name in CONFIGS:
        torch.manual_seed(0)
        model = Net()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = DistributedShampoo(model.parameters(), **kwargs(name), distributed_config=DDPShampooConfig())
        for step in range(STEPS):
            opt.zero_grad()
            nn.functional.mse_loss(ddp(inputs[local]), targets[local]).backward()
            opt.step()
            if step + 1 == SAVE_AT:  # each rank writes its own blocks' eigenbases and moments
                state = {"model": model.state_dict(),
                         "optim": opt.distributed_state_dict(key_to_param=model.named_parameters())}
                dcp.save(state, checkpoint_id=os.path.join(out_dir, f"ckpt-{name}"))
        owned = sum(1 for state in opt.state.values() for key in state if key.startswith("block_"))
        results[name] = ([p.detach().clone() for p in model.parameters()], owned)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown_process_group()


def oracle_result(name: str) -> list:
    torch.manual_seed(0)
    model = Net()
    hp = kwargs(name)
    oracle = OracleSOAP(list(model.parameters()), **hp)
    inputs, targets = data()
    for _ in range(STEPS):
        model.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        oracle.step([p.grad for p in model.parameters()])
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def two_ranks() -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
        for name in CONFIGS:  # the 2-rank checkpoints, resumed in this (single) process
            results[0][f"serial-from-{name}"] = resume_serially(os.path.join(out_dir, f"ckpt-{name}"), name)
        return results


def resume_serially(path: str, name: str) -> list:
    from distributed_shampoo.utils.shampoo_dcp import ShampooLoadPlanner

    torch.manual_seed(1)  # other initial values: everything must come from the checkpoint
    model = Net()
    opt = DistributedShampoo(model.parameters(), **kwargs(name))
    state = {"model": model.state_dict(), "optim": opt.distributed_state_dict(key_to_param=model.named_parameters())}
    dcp.load(state, checkpoint_id=path, planner=ShampooLoadPlanner())
    model.load_state_dict(state["model"])
    opt.load_distributed_state_dict(state["optim"], key_to_param=model.named_parameters())
    inputs, targets = data()
    for _ in range(STEPS - SAVE_AT):
        opt.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_soap_ddp_two_ranks_equals_oracle(two_ranks: list, name: str) -> None:
    expected = oracle_result(name)
    initial = [p.detach() for p in (torch.manual_seed(0), Net())[1].parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(expected, initial))
    for rank_results in two_ranks:
        params, _ = rank_results[name]
        for got, want in zip(params, expected):
            # float32 kernels against the float64 oracle over five steps
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_soap_ddp_checkpoint_resumes_in_one_process(two_ranks: list, name: str) -> None:
    """The 2-rank DCP checkpoint (eigenbases, corrected eigenvalues, factors of each rank's
    blocks) loads into a serial optimizer, which then ends where the oracle does."""
    for got, want in zip(two_ranks[0][f"serial-from-{name}"], oracle_result(name)):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_soap_ddp_blocks_are_split_between_ranks(two_ranks: list) -> None:
    owned = [r["eigh"][1] for r in two_ranks]
    assert min(owned) >= 1
    torch.manual_seed(0)
    serial = DistributedShampoo(Net().parameters(), **kwargs("eigh"))
    total = sum(1 for state in serial.state.values() for key in state if key.startswith("block_"))
    assert sum(owned) == total and max(owned) < total
