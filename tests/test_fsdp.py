"""FSDP (v1), HSDP, FSDP2 and HSDP2 on CPU with gloo (SPEC B §7.3-§7.5).

Sharded Shampoo preconditions each rank's shard pieces on their own, so the oracle is a
single-process run that treats every piece of every rank as a separate parameter, on the
whole global batch; it must match. Where shard edges fall on block edges, the pieces' blocks
are the unsharded blocks, so sharded Shampoo must also equal plain unsharded Shampoo, and
where they do not, it must not (both facts of SPEC B §7.3).
"""

import os
import socket
import tempfile
from typing import List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import (
    AdamGraftingConfig,
    FSDPShampooConfig,
    FullyShardShampooConfig,
    HSDPShampooConfig,
)
from distributed_shampoo.utils.shampoo_fsdp_utils import compile_fsdp_parameter_metadata, split_shard
from tests.dist_teardown import shutdown_process_group

STEPS = 4
BATCH = 8
# Well conditioned (epsilon 1e-3), so float32 rounding differences between the runs stay at
# the 1e-6 level after a few steps instead of being amplified by tiny eigenvalues.
KWARGS = dict(
    lr=0.02, betas=(0.9, 0.99), epsilon=1e-3, momentum=0.5, weight_decay=0.01,
    precondition_frequency=2, start_preconditioning_step=2,
    grafting_config=AdamGraftingConfig(beta2=0.99, epsilon=1e-8),
)
TOL = dict(rtol=2e-5, atol=2e-5)


def aligned_model() -> nn.Module:
    # Weights without bias whose halves are whole blocks of max_preconditioner_dim=2.
    return nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False))


def unaligned_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))


def data() -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(BATCH, 4, generator=g), torch.randn(BATCH, 8, generator=g)


def batch_for(model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    x, y = data()
    first, last = model[0], model[2]
    return x[:, : first.in_features], y[:, : last.out_features]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def serial_unsharded(build, max_dim: int) -> List[torch.Tensor]:
    torch.manual_seed(0)
    model = build()
    opt = DistributedShampoo(model.parameters(), max_preconditioner_dim=max_dim, **KWARGS)
    x, y = batch_for(model)
    for _ in range(STEPS):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def serial_pieces(build, max_dim: int, ranges: List[List[Tuple[int, int]]]) -> List[torch.Tensor]:
    """Plain Shampoo on every (rank, piece) of every parameter as its own tensor.

    ranges[param][rank] = (start, end) of that rank's shard in the flattened parameter."""
    torch.manual_seed(0)
    model = build()
    params = list(model.parameters())
    pieces: List[Tuple[int, int, torch.Tensor]] = []  # (param, flat start, tensor)
    for index, p in enumerate(params):
        for start, end in ranges[index]:
            for offset, shape in split_shard(p.shape, start, end):
                flat_start = start + offset
                numel = int(torch.tensor(shape).prod())
                piece = p.detach().reshape(-1)[flat_start : flat_start + numel].clone().view(shape)
                pieces.append((index, flat_start, piece.requires_grad_()))
    opt = DistributedShampoo([t for _, _, t in pieces], max_preconditioner_dim=max_dim, **KWARGS)
    x, y = batch_for(model)
    for _ in range(STEPS):
        model.zero_grad()
        loss_of(model, x, y).backward()
        for index, flat_start, piece in pieces:
            piece.grad = params[index].grad.reshape(-1)[flat_start : flat_start + piece.numel()].view(piece.shape).clone()
        opt.step()
        with torch.no_grad():
            for index, flat_start, piece in pieces:
                params[index].view(-1)[flat_start : flat_start + piece.numel()].copy_(piece.reshape(-1))
    return [p.detach().clone() for p in params]


def chunk_ranges(shape: torch.Size, shards: int) -> List[Tuple[int, int]]:
    """FSDP2 shards dim 0 like torch.chunk; the local shard is a contiguous flat range."""
    rows = shape[0] if len(shape) else 1
    row = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
    size = -(-rows // shards)
    return [(min(r * size, rows) * row, min((r + 1) * size, rows) * row) for r in range(shards)]


def run_fsdp1(rank: int, world: int, build, max_dim: int, hybrid: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

    torch.manual_seed(0)
    model = build()
    names = [n for n, _ in model.named_parameters()]
    x, y = batch_for(model)
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("replicate", "shard")) if hybrid else None
    options = dict(use_orig_params=True, device_id=torch.device("cpu"))
    if hybrid:
        options.update(device_mesh=mesh, sharding_strategy=ShardingStrategy.HYBRID_SHARD)
    # Each layer is its own FSDP unit, so shards cut through weight matrices.
    for i, layer in enumerate(model):
        if any(True for _ in layer.parameters()):
            model[i] = FSDP(layer, **options)
    wrapped = FSDP(model, **options)
    if hybrid:
        config = HSDPShampooConfig(device_mesh=mesh, param_to_metadata=compile_fsdp_parameter_metadata(wrapped))
        shard_rank, shards = mesh.get_local_rank(1), 2
    else:
        config = FSDPShampooConfig(param_to_metadata=compile_fsdp_parameter_metadata(wrapped))
        shard_rank, shards = rank, world
    metadata = config.param_to_metadata
    params = list(wrapped.parameters())
    opt = DistributedShampoo(params, max_preconditioner_dim=max_dim, distributed_config=config, **KWARGS)
    per_rank = BATCH // world
    local = slice(rank * per_rank, (rank + 1) * per_rank)
    for _ in range(STEPS):
        opt.zero_grad()
        loss_of(wrapped, x[local], y[local]).backward()
        opt.step()
    # By position: FQNs are relative to each FSDP unit, so they repeat across layers.
    mine = [(metadata[p].start_idx, metadata[p].end_idx) for p in params]
    gathered: List[List[Tuple[int, int]]] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine)
    shard_ranks: List[int] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(shard_ranks, shard_rank)
    # Ranks of one replica set hold the same ranges: keep one per shard index.
    by_shard = {shard_ranks[r]: gathered[r] for r in range(world)}
    ranges = [[by_shard[s][i] for s in range(shards)] for i in range(len(params))]
    keys = sorted((i, k) for i, p in enumerate(params) for k in opt.state.get(p, {}) if k != "step")
    return dict(
        local=[(metadata[p].start_idx, metadata[p].end_idx, p.detach().clone()) for p in params],
        ranges=ranges, keys=keys, names=names,
    )


def run_fsdp2(rank: int, world: int, build, max_dim: int, hybrid: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = build()
    x, y = batch_for(model)
    mesh = (
        init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("replicate", "shard"))
        if hybrid
        else init_device_mesh("cpu", (world,))
    )
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = DistributedShampoo(model.parameters(), max_preconditioner_dim=max_dim, distributed_config=FullyShardShampooConfig(), **KWARGS)
    per_rank = BATCH // world
    local = slice(rank * per_rank, (rank + 1) * per_rank)
    for _ in range(STEPS):
        opt.zero_grad()
        loss_of(model, x[local], y[local]).backward()
        opt.step()
    shards = 2 if hybrid else world
    shard_rank = mesh.get_local_rank(mesh.ndim - 1)
    result = []
    for p in model.parameters():
        start, end = chunk_ranges(p.shape, shards)[shard_rank]
        result.append((start, end, p.to_local().detach().clone()))
    ranges = [chunk_ranges(p.shape, shards) for p in model.parameters()]
    keys = sorted((i, k) for i, p in enumerate(model.parameters()) for k in opt.state.get(p, {}) if k != "step")
    return dict(local=result, ranges=ranges, keys=keys)


SCENARIOS = {
    "fsdp-aligned": (run_fsdp1, aligned_model, 2, False),
    "fsdp-unaligned": (run_fsdp1, unaligned_model, 4, False),
    # Row chunks 4 | 4 of every tensor are whole blocks of max_preconditioner_dim=4.
    "fsdp2-aligned": (run_fsdp2, lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)), 4, False),
    "fsdp2-unaligned": (run_fsdp2, unaligned_model, 4, False),
}
SCENARIOS_4 = {
    "hsdp-unaligned": (run_fsdp1, unaligned_model, 4, True),
    "hsdp2-unaligned": (run_fsdp2, unaligned_model, 4, True),
}


def worker(rank: int, world: int, port: int, names: List[str], out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    table = {**SCENARIOS, **SCENARIOS_4}
    results = {}
    for name in names:
        run, build, max_dim, hybrid = table[name]
        results[name] = run(rank, world, build, max_dim, hybrid)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown_process_group()


def spawn(world: int, names: List[str]) -> List[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(world, port, names, out_dir), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks() -> List[dict]:
    return spawn(2, list(SCENARIOS))


def local_slices(expected: List[torch.Tensor], local: list) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    pairs = []
    for full, (start, end, got) in zip(expected, local):
        pairs.append((got.reshape(-1), full.reshape(-1)[start:end]))
    return pairs


def check(results: List[dict], name: str) -> None:
    _, build, max_dim, _ = {**SCENARIOS, **SCENARIOS_4}[name]
    pieces = serial_pieces(build, max_dim, results[0][name]["ranges"])
    unsharded = serial_unsharded(build, max_dim)
    differs_from_unsharded = False
    for rank_result in results:
        for got, want in local_slices(pieces, rank_result[name]["local"]):
            torch.testing.assert_close(got, want, **TOL)
        for got, want in local_slices(unsharded, rank_result[name]["local"]):
            if name.endswith("-aligned"):
                torch.testing.assert_close(got, want, **TOL)
            elif got.numel() and (got - want).abs().max() > 10 * TOL["atol"]:
                differs_from_unsharded = True
    if name.endswith("unaligned"):
        assert differs_from_unsharded, "unaligned shards should precondition other blocks"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sharded_equals_piecewise_oracle(two_ranks: List[dict], name: str) -> None:
    check(two_ranks, name)


def test_block_keys_name_the_rank(two_ranks: List[dict]) -> None:
    for rank, result in enumerate(two_ranks):
        for name in SCENARIOS:
            assert result[name]["keys"], name
            assert all(k.startswith(f"rank_{rank}-block_") for _, k in result[name]["keys"]), result[name]["keys"]


def test_hybrid_four_ranks() -> None:
    results = spawn(4, list(SCENARIOS_4))
    for name in SCENARIOS_4:
        check(results, name)
    # HSDP keys use the shard-dimension rank (mesh [[0, 1], [2, 3]]: ranks 0 and 2 hold shard
    # 0), and the replicas of a shard split its blocks between them (DDP-style).
    keys = [set(r["hsdp-unaligned"]["keys"]) for r in results]
    for shard, replicas in ((0, (0, 2)), (1, (1, 3))):
        a, b = (keys[r] for r in replicas)
        assert a and b and not a & b
        assert all(k.startswith(f"rank_{shard}-block_") for _, k in a | b)


def test_fsdp_config_without_process_group() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises((RuntimeError, ValueError), match="init_process_group|param_to_metadata"):
        DistributedShampoo(model.parameters(), distributed_config=FSDPShampooConfig(param_to_metadata={}))


def test_fully_shard_config_on_plain_model_is_rejected() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="fully_shard"):
        DistributedShampoo(model.parameters(), distributed_config=FullyShardShampooConfig())


def test_no_shard_parameters_are_taken_whole() -> None:
    """FSDP falls back to NO_SHARD when a shard group has one rank: parameters keep their
    shape and must be blocked whole, not treated as a flat shard."""
    from torch.distributed.fsdp import ShardingStrategy

    from distributed_shampoo.shampoo_types import FSDPParameterMetadata
    from distributed_shampoo.utils.shampoo_fsdp_utils import fsdp_pieces

    weight = nn.Parameter(torch.zeros(4, 3, 3, 3))
    shard = nn.Parameter(torch.zeros(7))
    metadata = {
        weight: FSDPParameterMetadata("w", weight.shape, 108, 0, 108, ShardingStrategy.NO_SHARD),
        shard: FSDPParameterMetadata("s", torch.Size([3, 5]), 15, 3, 10, ShardingStrategy.FULL_SHARD),
    }
    pieces = fsdp_pieces([weight, shard], metadata)
    assert [(p.param_index, p.shape, p.offset) for p in pieces] == [
        (0, (4, 3, 3, 3), 0), (1, (2,), 0), (1, (1, 5), 2),
    ]
