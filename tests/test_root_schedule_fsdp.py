"""The staggered root schedule (issue 13) under FSDP (v1) and FSDP2, two gloo ranks on CPU.

Each rank preconditions its own shard pieces, so the schedule balances each rank's own
factors (issue 13: "under FSDP/FSDP2 the same per rank"): the phases of a rank are
tests/test_root_schedule.py's independent balancing of that rank's factors alone, and every
root step computes exactly that rank's due factors. The trained parameters equal the plain
torch oracle (tests/oracle.py) run in one process on the whole batch, with every piece of every
rank as its own parameter and those per-rank phases (root_phases); the default schedule ends
measurably elsewhere, so the comparison can fail. A DCP checkpoint written mid-period and
loaded into fresh optimizers (other initial values) resumes bitwise.

The harness (run_mode, check_*) serves tests/test_root_schedule_hsdp.py and, with a mode
'fsdp+eigh' or 'fsdp2+qr' (SOAP, tests/soap_oracle.py), tests/test_soap_schedule_sharded.py too.
"""

import dataclasses
import os
import pathlib
import socket
import sys
import tempfile
import warnings
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import oracle as O
from sharded_run import ShardedRunIO
from test_atomicity import assert_bitwise_equal
from test_root_schedule import expected_phases

from tests.soap_oracle import OracleSOAP

from distributed_shampoo import _backend
from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import (
    AdaGradGraftingConfig,
    FSDPShampooConfig,
    FullyShardShampooConfig,
    HSDPShampooConfig,
    PrecisionConfig,
    StaggeredRootScheduleConfig,
)
from distributed_shampoo.utils.shampoo_fsdp_utils import compile_fsdp_parameter_metadata, split_shard
from tests.dist_teardown import shutdown_process_group

# every state in float64, SOAP's eigenvectors and corrected eigenvalues included
F64 = PrecisionConfig(**{f.name: torch.float64 for f in dataclasses.fields(PrecisionConfig)})
BATCH = 8
MAX_DIM = 4
FREQUENCY, START = 3, 3
STEPS = 10
SAVE_AT = 7  # 7 % 3 == 1: mid-period, two phases of the period still to come
KWARGS = dict(lr=0.05, betas=(0.9, 0.99), epsilon=1e-3, momentum=0.3, weight_decay=0.01,
              max_preconditioner_dim=MAX_DIM, precondition_frequency=FREQUENCY,
              start_preconditioning_step=START)
EPS_GRAFT = 1e-8


def base(mode: str) -> str:
    """'ddp', 'fsdp', 'fsdp2', 'hsdp', 'hsdp2' of a mode; '+eigh' / '+qr' selects SOAP (issue 14)."""
    return mode.split("+")[0]


def soap_config(mode: str) -> Any:
    from distributed_shampoo import DefaultEigenvalueCorrectedShampooConfig, DefaultSOAPConfig

    variant = mode.partition("+")[2]
    return {"": None, "eigh": DefaultEigenvalueCorrectedShampooConfig, "qr": DefaultSOAPConfig}[variant]


def method_kwargs(mode: str, oracle: bool = False) -> Dict[str, Any]:
    """Shampoo with AdaGrad grafting, or SOAP (no grafting: the reference drops it there)."""
    if soap_config(mode) is not None:
        return dict(preconditioner_config=soap_config(mode), grafting_config=None)
    return dict(grafting_config=(O.AdaGradGraftingConfig if oracle else AdaGradGraftingConfig)(epsilon=EPS_GRAFT))


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # 8x6 and 3x8 weights with biases: the flat shards cut through rows and blocks
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def data() -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return (torch.randn(BATCH, 6, generator=g, dtype=torch.float64),
            torch.randn(BATCH, 3, generator=g, dtype=torch.float64))


def chunk_ranges(shape: torch.Size, shards: int) -> List[Tuple[int, int]]:
    """FSDP2 shards dim 0 like torch.chunk: the local shard is a contiguous flat range."""
    rows = shape[0]
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    size = -(-rows // shards)
    return [(min(r * size, rows) * row, min((r + 1) * size, rows) * row) for r in range(shards)]


class Run(ShardedRunIO):
    """One rank's wrapped model (mode fsdp, fsdp2, hsdp or hsdp2) and its scheduled optimizer."""

    def __init__(self, mode: str, rank: int, world: int, seed: int = 0) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        method, mode = method_kwargs(mode), base(mode)

        model = make_model(seed)
        self.names = [n for n, _ in model.named_parameters()]
        if mode == "ddp":  # whole parameters, blocks spread over the ranks
            from distributed_shampoo.shampoo_types import DDPShampooConfig

            self.module, config = nn.parallel.DistributedDataParallel(model), DDPShampooConfig()
            self.shard, self.shards = 0, 1
            self.ranges = [(0, p.numel()) for p in model.parameters()]
        elif mode in ("fsdp", "hsdp"):
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

            options: Dict[str, Any] = dict(use_orig_params=True, device_id=torch.device("cpu"))
            if mode == "hsdp":
                mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("replicate", "shard"))
                options.update(device_mesh=mesh, sharding_strategy=ShardingStrategy.HYBRID_SHARD)
                self.shard, self.shards = mesh.get_local_rank(1), 2
            else:
                self.shard, self.shards = rank, world
            for i in (0, 2):  # each layer its own unit: the shards cut through its weight
                model[i] = FSDP(model[i], **options)
            self.module = FSDP(model, **options)
            metadata = compile_fsdp_parameter_metadata(self.module)
            config: Any = (HSDPShampooConfig(device_mesh=mesh, param_to_metadata=metadata) if mode == "hsdp"
                           else FSDPShampooConfig(param_to_metadata=metadata))
            self.ranges = [(metadata[p].start_idx, metadata[p].end_idx) for p in self.module.parameters()]
        else:  # fsdp2, hsdp2 (fully_shard on a replicate x shard mesh)
            from torch.distributed.fsdp import fully_shard

            if mode == "hsdp2":
                mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("replicate", "shard"))
                self.shard, self.shards = mesh.get_local_rank(1), 2
            else:
                mesh = init_device_mesh("cpu", (world,))
                self.shard, self.shards = rank, world
            for i in (0, 2):
                fully_shard(model[i], mesh=mesh)
            fully_shard(model, mesh=mesh)
            self.module, config = model, FullyShardShampooConfig()
            self.ranges = [chunk_ranges(p.shape, self.shards)[self.shard] for p in model.parameters()]
        self.optimizer = DistributedShampoo(
            self.module.parameters(), distributed_config=config, precision_config=F64,
            root_schedule_config=StaggeredRootScheduleConfig(cost_model="dense"),
            **method, **KWARGS)
        x, y = data()
        local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        self.x, self.y = x[local], y[local]
        self.computed: Dict[int, set] = {}

    def engine(self) -> Any:
        (engine,) = self.optimizer._engines
        return engine

    def labels(self) -> List[str]:
        layout = self.engine().layout
        return [layout.factor_label(f) for f in range(layout.factor_count)]

    def train(self, steps: int) -> None:
        for _ in range(steps):
            self.optimizer.zero_grad()
            nn.functional.mse_loss(self.module(self.x), self.y).backward()
            self.optimizer.step()
            engine = self.engine()
            status = engine.root_status.numpy()
            labels = self.labels()
            self.computed[int(engine.step_count)] = {labels[f] for f in np.flatnonzero(status != _backend.ROOT_INACTIVE)}


def run_mode(mode: str, rank: int, world: int, out: str) -> Dict[str, Any]:
    """Trains STEPS steps (checkpoint at SAVE_AT), then resumes that checkpoint in a fresh
    optimizer."""
    run = Run(mode, rank, world)
    engine = run.engine()
    phases = engine.schedule.phases(FREQUENCY)
    dims = engine.schedule.factor_dims
    factors = [(label, int(dims[f]), int(phases[f])) for f, label in enumerate(run.labels())]
    path = os.path.join(out, f"{mode}-checkpoint")
    run.train(SAVE_AT)
    run.save(path)
    saved_state = run.flat_state()
    run.train(STEPS - SAVE_AT)
    result = dict(shard=run.shard, shards=run.shards, ranges=run.ranges, factors=factors,
                  computed=run.computed, final=run.local_params(), state=run.flat_state())
    resumed = Run(mode, rank, world, seed=1)  # other initial values: all from the checkpoint
    resumed.load(path)
    result["loaded_state_equal"] = _equal(resumed.flat_state(), saved_state)
    resumed.train(STEPS - SAVE_AT)
    result.update(resumed=resumed.local_params(), resumed_state=resumed.flat_state())
    return result


def _equal(a: Any, b: Any) -> bool:
    try:
        assert_bitwise_equal(a, b)
    except AssertionError:
        return False
    return True


def worker(rank: int, world: int, port: int, modes: List[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # FSDP1 state-dict notices
    try:
        results = {mode: run_mode(mode, rank, world, out) for mode in modes}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    except BaseException:
        shutdown_process_group(clean=False)
        raise
    shutdown_process_group()


def spawn(world: int, modes: List[str]) -> List[Dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(world, port, modes, out), nprocs=world, join=True)
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# ------------------------------------------------------------------------------- checks
def pieces_of(results: List[Dict[str, Any]], mode: str) -> List[Tuple[int, int, int, Tuple[int, ...], List[Tuple[str, str]]]]:
    """Every (shard, param, flat start, piece shape, its factors) in shard order; a factor is
    (its label on its rank, its label in the oracle without the parameter index). The rank's
    label is '{param}.rank_{shard}-block_{b}.{k}', b counting the blocks of all that shard's
    pieces of the parameter (SPEC B §7.3); the oracle's blocks of a piece count from 0. DDP:
    one shard, the whole parameters, labels '{param}.block_{b}.{k}'."""
    by_shard = {r[mode]["shard"]: r[mode]["ranges"] for r in results}
    shapes = [tuple(p.shape) for p in make_model().parameters()]
    out = []
    for shard in range(results[0][mode]["shards"]):
        for i, shape in enumerate(shapes):
            start, end = by_shard[shard][i]
            b, prefix = 0, "" if base(mode) == "ddp" else f"rank_{shard}-"
            for offset, piece in split_shard(shape, start, end):
                labels = []
                for own, block in enumerate(O.block_shapes(O.merge_small_dims(piece, MAX_DIM), MAX_DIM)):
                    labels += [(f"{i}.{prefix}block_{b}.{k}", f"block_{own}.{k}") for k in range(len(block))]
                    b += 1
                out.append((shard, i, start + offset, piece, labels))
    return out


def primary(results: List[Dict[str, Any]], mode: str) -> List[Dict[str, Any]]:
    """The ranks whose factors make up the model once. HSDP2 (fully_shard on a 2-D mesh)
    computes every block of a shard on each of its replicas, named by the global rank, with
    the same phases: ranks 0 and 1 (shards 0 and 1) stand for them."""
    if base(mode) != "hsdp2":
        return results
    strip = lambda r: [(l.split("-", 1)[1], n, p) for l, n, p in r[mode]["factors"]]  # noqa: E731
    for shard in (0, 1):
        assert strip(results[shard]) == strip(results[shard + 2]), f"replicas of shard {shard}"
    return results[:2]


def check_phases(results: List[Dict[str, Any]], mode: str) -> None:
    """Each rank's phases are the balancing of its own factors, and each step computes that
    rank's due factors: all at START, then those of phase t % FREQUENCY."""
    results = primary(results, mode)
    owners: Dict[str, int] = {}
    for rank, r in enumerate(results):
        factors = r[mode]["factors"]
        assert factors, f"rank {rank} has factors"
        for label, _, _ in factors:
            assert owners.setdefault(label, rank) == rank, f"{label} on two ranks"
        got = {label: phase for label, _, phase in factors}
        assert got == expected_phases([(label, n) for label, n, _ in factors], FREQUENCY), rank
        # 1x1 factors are free; every phase of a rank with enough big factors is used
        big = [p for _, n, p in factors if n > 1]
        if len(big) >= FREQUENCY:
            assert set(big) == set(range(FREQUENCY)), rank
        computed = r[mode]["computed"]
        assert computed[START] == set(got)
        for t in range(START + 1, STEPS + 1):
            due = {label for label, phase in got.items() if phase == t % FREQUENCY}
            assert computed[t] == due or (not due and computed[t] == computed[t - 1]), (rank, t)
    # the labels the ranks hold are exactly the pieces' factors (the oracle's blocking)
    want = [label for *_, labels in pieces_of(results, mode) for label, _ in labels]
    assert sorted(owners) == sorted(want)
    dims = {label: n for r in results for label, n, _ in r[mode]["factors"]}
    for *_, piece, labels in pieces_of(results, mode):
        blocks = O.block_shapes(O.merge_small_dims(piece, MAX_DIM), MAX_DIM)
        assert [dims[label] for label, _ in labels] == [d for block in blocks for d in block]


def oracle_params(results: List[Dict[str, Any]], mode: str, scheduled: bool = True) -> List[torch.Tensor]:
    """The oracle on every piece as its own parameter, whole batch, the ranks' phases."""
    results = primary(results, mode)
    pieces = pieces_of(results, mode)
    phases = {label: phase for r in results for label, _, phase in r[mode]["factors"]}
    model = make_model()
    params = list(model.parameters())
    tensors = [params[i].detach().reshape(-1)[s : s + int(np.prod(shape))].clone().view(shape)
               for _, i, s, shape, _ in pieces]
    root_phases = None
    if scheduled:
        root_phases = {f"{j}.{own}": phases[label] for j, (*_, labels) in enumerate(pieces) for label, own in labels}
    if soap_config(mode) is None:
        oracle: Any = O.OracleShampoo(tensors, root_phases=root_phases, **method_kwargs(mode, oracle=True), **KWARGS)
    else:
        oracle = OracleSOAP(tensors, root_phases=root_phases, **method_kwargs(mode, oracle=True), **KWARGS)
    x, y = data()
    for _ in range(STEPS):
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        oracle.step([params[i].grad.reshape(-1)[s : s + t.numel()].view(t.shape)
                     for (_, i, s, _, _), t in zip(pieces, tensors)])
        with torch.no_grad():
            for (_, i, s, _, _), t in zip(pieces, tensors):
                params[i].view(-1)[s : s + t.numel()].copy_(t.reshape(-1))
    return [p.detach().clone() for p in params]


def local_parts(full: List[torch.Tensor], ranges: list) -> List[torch.Tensor]:
    return [p.reshape(-1)[s:e] for p, (s, e) in zip(full, ranges)]


# float64 throughout, the ranks only average gradients in another order (measured 4e-16);
# HSDP also all-gathers its replicas' updates in communication_dtype, float32 by default
# (measured 7e-9). The default schedule ends 3e-3 away.
ORACLE_TOL = {"fsdp": dict(rtol=1e-9, atol=1e-12), "fsdp2": dict(rtol=1e-9, atol=1e-12),
              "hsdp": dict(rtol=1e-6, atol=1e-7), "hsdp2": dict(rtol=1e-9, atol=1e-12),
              "ddp": dict(rtol=1e-6, atol=1e-7)}  # DDP all-gathers in float32 too


def check_oracle(results: List[Dict[str, Any]], mode: str) -> None:
    want, default = oracle_params(results, mode), oracle_params(results, mode, scheduled=False)
    farthest = 0.0
    for r in results:
        for got, ref, other in zip(r[mode]["final"], local_parts(want, r[mode]["ranges"]),
                                   local_parts(default, r[mode]["ranges"])):
            tol = ORACLE_TOL[base(mode)]
            if mode.endswith("+qr"):  # QR's iterations stop at a tolerance: measured 4e-12
                tol = dict(rtol=max(tol["rtol"], 1e-9), atol=max(tol["atol"], 1e-10))
            torch.testing.assert_close(got.reshape(-1), ref, **tol)
            if got.numel():
                farthest = max(farthest, (got.reshape(-1) - other).abs().max().item())
    assert farthest > 1e-4, "the default schedule's oracle ends elsewhere: the test can fail"


def check_resume(results: List[Dict[str, Any]], mode: str) -> None:
    for rank, r in enumerate(results):
        assert r[mode]["loaded_state_equal"], f"rank {rank}: the checkpoint restores the saved state bitwise"
        assert_bitwise_equal(r[mode]["resumed"], r[mode]["final"], f"{mode} rank {rank} parameters")
        assert_bitwise_equal(r[mode]["resumed_state"], r[mode]["state"], f"{mode} rank {rank} state")


MODES = ["fsdp", "fsdp2"]


@pytest.fixture(scope="module")
def two_ranks() -> List[Dict[str, Any]]:
    return spawn(2, MODES)


@pytest.mark.parametrize("mode", MODES)
def test_each_rank_balances_its_own_factors(two_ranks, mode: str) -> None:
    check_phases(two_ranks, mode)


@pytest.mark.parametrize("mode", MODES)
def test_equals_oracle_with_the_ranks_phases(two_ranks, mode: str) -> None:
    check_oracle(two_ranks, mode)


@pytest.mark.parametrize("mode", MODES)
def test_mid_period_checkpoint_resumes_bitwise(two_ranks, mode: str) -> None:
    check_resume(two_ranks, mode)
