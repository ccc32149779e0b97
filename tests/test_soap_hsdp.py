"""Eigenvalue-corrected Shampoo (SOAP, issue 14) under HSDP (FSDP v1 hybrid sharding,
HSDPShampooConfig) and HSDP2 (fully_shard on a 2-D mesh, FullyShardShampooConfig): four gloo
ranks on CPU, mesh [[0, 1], [2, 3]] (replicate x shard), the global batch split over all four.

Sharded SOAP preconditions each shard piece on its own, so every rank's local parameters must
equal the plain torch oracle (tests/soap_oracle.py, written from the paper) run in one process
on the whole batch with every piece of every shard as its own parameter; the replicas of a
shard agree bitwise; under HSDP they split the shard's blocks (eigenbases, second moments)
between them. The eigh runs compute an eigenbasis every step; the QR runs (DefaultSOAPConfig,
warm-started) the first one at step 2, once the 2 x 2 factors have full rank (distinct
eigenvalues: see tests/test_soap.py's docstring); they also save a DCP checkpoint after step 3,
which fresh optimizers load and resume bitwise.
"""

import os
import socket
import tempfile
import warnings
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from distributed_shampoo import DefaultEigenvalueCorrectedShampooConfig, DefaultSOAPConfig
from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import FullyShardShampooConfig, HSDPShampooConfig, PrecisionConfig
from distributed_shampoo.utils.shampoo_fsdp_utils import compile_fsdp_parameter_metadata, split_shard
from tests.soap_oracle import OracleSOAP
from tests.sharded_run import ShardedRunIO
from tests.test_atomicity import assert_bitwise_equal
from tests.dist_teardown import shutdown_process_group

F64 = PrecisionConfig(*(torch.float64,) * 8)
WORLD, BATCH, STEPS = 4, 8, 5
SAVE_AT = 3  # QR runs: a DCP checkpoint between two eigenbasis steps (2, 4)
CONFIGS = {"eigh": DefaultEigenvalueCorrectedShampooConfig, "qr": DefaultSOAPConfig}
SCENARIOS = [(mode, name) for mode in ("hsdp", "hsdp2") for name in CONFIGS]


def kwargs(name: str) -> Dict[str, Any]:
    frequency = 1 if name == "eigh" else 2
    return dict(lr=0.02, betas=(0.9, 0.99), epsilon=1e-3, momentum=0.5, weight_decay=0.01,
                max_preconditioner_dim=2, precondition_frequency=frequency,
                start_preconditioning_step=frequency, preconditioner_config=CONFIGS[name])


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # no biases: each shard's pieces are (2, 6) and (1, 4), in 2 x 2 blocks and blocks of 2
    return nn.Sequential(nn.Linear(6, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False)).double()


def data() -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(BATCH, 6, generator=g, dtype=torch.float64),
            torch.randn(BATCH, 2, generator=g, dtype=torch.float64))


class Run(ShardedRunIO):
    """One rank's hybrid-sharded model and its SOAP optimizer."""

    def __init__(self, mode: str, name: str, rank: int, seed: int = 0) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        model = make_model(seed)
        mesh = init_device_mesh("cpu", (WORLD // 2, 2), mesh_dim_names=("replicate", "shard"))
        self.shard = mesh.get_local_rank(1)
        if mode == "hsdp":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

            options = dict(use_orig_params=True, device_id=torch.device("cpu"), device_mesh=mesh,
                           sharding_strategy=ShardingStrategy.HYBRID_SHARD)
            for i in (0, 2):
                model[i] = FSDP(model[i], **options)
            self.module = FSDP(model, **options)
            metadata = compile_fsdp_parameter_metadata(self.module)
            config: Any = HSDPShampooConfig(device_mesh=mesh, param_to_metadata=metadata)
            self.ranges = [(metadata[p].start_idx, metadata[p].end_idx) for p in self.module.parameters()]
        else:
            from torch.distributed.fsdp import fully_shard

            for i in (0, 2):
                fully_shard(model[i], mesh=mesh)
            fully_shard(model, mesh=mesh)
            self.module, config = model, FullyShardShampooConfig()
            self.ranges = []
            for p in model.parameters():  # dim 0 in two chunks (torch.chunk)
                rows, row = p.shape[0], int(np.prod(p.shape[1:]))
                size = -(-rows // 2)
                self.ranges.append((min(self.shard * size, rows) * row, min((self.shard + 1) * size, rows) * row))
        self.optimizer = DistributedShampoo(self.module.parameters(), distributed_config=config,
                                            precision_config=F64, **kwargs(name))
        x, y = data()
        local = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        self.x, self.y = x[local], y[local]

    def train(self, steps: int) -> None:
        for _ in range(steps):
            self.optimizer.zero_grad()
            nn.functional.mse_loss(self.module(self.x), self.y).backward()
            self.optimizer.step()


def run(mode: str, name: str, rank: int, out: str) -> Dict[str, Any]:
    run = Run(mode, name, rank)
    resume = name == "qr"  # the warm-started eigenbases must survive the checkpoint
    run.train(SAVE_AT if resume else STEPS)
    if resume:
        path = os.path.join(out, f"{mode}-{name}")
        run.save(path)
        saved = run.flat_state()
        run.train(STEPS - SAVE_AT)
    # by position: block keys repeat across parameters (and FSDP1's names across its units)
    params = list(run.module.parameters())
    owned = sorted((i, k) for i, p in enumerate(params) for k in run.optimizer.state.get(p, {}) if k != "step")
    result = dict(shard=run.shard, ranges=run.ranges, final=run.local_params(), owned=owned)
    if resume:
        fresh = Run(mode, name, rank, seed=1)  # other initial values: all from the checkpoint
        fresh.load(path)
        result["loaded"] = _equal(fresh.flat_state(), saved)
        fresh.train(STEPS - SAVE_AT)
        result["resumed"], result["resumed_state"] = fresh.local_params(), fresh.flat_state()
        result["state"] = run.flat_state()
    return result


def _equal(a: Any, b: Any) -> bool:
    try:
        assert_bitwise_equal(a, b)
    except AssertionError:
        return False
    return True


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    try:
        results = {scenario: run(*scenario, rank, out) for scenario in SCENARIOS}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    except BaseException:
        shutdown_process_group(clean=False)
        raise
    shutdown_process_group()


@pytest.fixture(scope="module")
def four_ranks() -> List[Dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(port, out), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def oracle_params(results: List[Dict[str, Any]], scenario: Tuple[str, str]) -> List[torch.Tensor]:
    """OracleSOAP on every (shard, piece) as its own parameter, on the whole batch."""
    by_shard = {r[scenario]["shard"]: r[scenario]["ranges"] for r in results}
    model = make_model()
    params = list(model.parameters())
    pieces = []  # (param, flat start, tensor)
    for shard in (0, 1):
        for i, p in enumerate(params):
            start, end = by_shard[shard][i]
            for offset, shape in split_shard(p.shape, start, end):
                s = start + offset
                pieces.append((i, s, p.detach().reshape(-1)[s : s + int(np.prod(shape))].clone().view(shape)))
    oracle = OracleSOAP([t for *_, t in pieces], **kwargs(scenario[1]))
    x, y = data()
    for _ in range(STEPS):
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        oracle.step([params[i].grad.reshape(-1)[s : s + t.numel()].view(t.shape) for i, s, t in pieces])
        with torch.no_grad():
            for i, s, t in pieces:
                params[i].view(-1)[s : s + t.numel()].copy_(t.reshape(-1))
    return [p.detach().clone() for p in params]


# float64 kernels, the ranks average gradients in another order (HSDP2: measured 5e-16); HSDP
# also all-gathers the replicas' updates in float32, communication_dtype DEFAULT (measured
# 4e-9). The other config's oracle (eigh <-> QR) ends 6e-2 away.
TOL = {"hsdp": dict(rtol=1e-6, atol=1e-7), "hsdp2": dict(rtol=1e-9, atol=1e-12)}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=["-".join(s) for s in SCENARIOS])
def test_soap_hybrid_sharded_equals_piecewise_oracle(four_ranks, scenario) -> None:
    want = oracle_params(four_ranks, scenario)
    initial = list(make_model().parameters())
    assert min((a - b).abs().max().item() for a, b in zip(want, initial)) > 1e-3  # every tensor moved
    for r in four_ranks:
        for got, full, (s, e) in zip(r[scenario]["final"], want, r[scenario]["ranges"]):
            torch.testing.assert_close(got.reshape(-1), full.reshape(-1)[s:e], **TOL[scenario[0]])
    for shard in (0, 1):
        assert_bitwise_equal(four_ranks[shard][scenario]["final"], four_ranks[shard + 2][scenario]["final"],
                             f"replicas of shard {shard}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_soap_hsdp_replicas_split_the_shards_blocks(four_ranks, name: str) -> None:
    """HSDP spreads a shard's blocks over its replicas (DDP-style): together they hold every
    block once, each at least one."""
    for shard in (0, 1):
        a, b = (set(four_ranks[r][("hsdp", name)]["owned"]) for r in (shard, shard + 2))
        assert a and b and not a & b
        assert all(k.startswith(f"rank_{shard}-block_") for _, k in a | b)


@pytest.mark.parametrize("mode", ["hsdp", "hsdp2"])
def test_soap_hybrid_checkpoint_resumes_bitwise(four_ranks, mode: str) -> None:
    """A DCP checkpoint of the QR run after step 3 (eigenbases, corrected second moments,
    factors of each rank's blocks) loads into fresh optimizers and models (other initial
    values), restores the saved state bitwise and reaches the uninterrupted run bitwise."""
    for rank, r in enumerate(four_ranks):
        result = r[(mode, "qr")]
        assert result["loaded"], f"rank {rank}: loaded state differs from the saved one"
        assert_bitwise_equal(result["resumed"], result["final"], f"{mode} rank {rank} parameters")
        assert_bitwise_equal(result["resumed_state"], result["state"], f"{mode} rank {rank} state")
        assert any("eigen" in k for flat in result["state"].values() for k in flat), \
            sorted(k for flat in result["state"].values() for k in flat)[:8]
