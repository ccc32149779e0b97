"""The opt-in staggered inverse-root schedule (issue 13, StaggeredRootScheduleConfig).

Against the issue's definition, written independently here and in tests/oracle.py: each
factor gets a phase in [0, frequency) (largest n^3 first onto the least-loaded phase, ties to
the lowest phase, equal costs in factor order); every root is computed at
start_preconditioning_step and factor f's root at the steps t > start with
t % frequency == phase[f].
"""

import copy
import os
import pathlib
import socket
import sys
import tempfile
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import oracle as O
from test_atomicity import assert_bitwise_equal

from distributed_shampoo import _backend
from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.matrix_functions_types import CoupledHigherOrderConfig
from distributed_shampoo.shampoo_types import (
    AdaGradGraftingConfig,
    DDPShampooConfig,
    PrecisionConfig,
    StaggeredRootScheduleConfig,
)
from distributed_shampoo.utils.shampoo_safe_globals import config_classes
from tests.dist_teardown import shutdown_process_group

F64 = PrecisionConfig(**{f: torch.float64 for f in (
    "computation_dtype", "factor_matrix_dtype", "inv_factor_matrix_dtype", "filtered_grad_dtype",
    "momentum_dtype", "grafting_state_dtype")})
# several factor sizes with max_preconditioner_dim=5: 5, 4, 3, 2, 1 and blocks of order 1 and 2
SHAPES = ((9, 7), (7,), (3, 9), (3,), (1, 4))


def expected_phases(labels_dims: list[tuple[str, int]], frequency: int) -> dict[str, int]:
    """The issue's balancing with cost n^3 (1x1 free), in factor order."""
    load = [0.0] * frequency
    phases = {}
    order = sorted(range(len(labels_dims)), key=lambda i: (-(labels_dims[i][1] ** 3 if labels_dims[i][1] > 1 else 0), i))
    for i in order:
        label, n = labels_dims[i]
        cost = float(n**3) if n > 1 else 0.0
        p = min(range(frequency), key=lambda q: (load[q] + cost, q))
        load[p] += cost
        phases[label] = p
    return phases


def factor_labels(shapes, max_dim: int) -> list[tuple[str, int]]:
    """(label, size) of every factor, in the optimizer's factor order (oracle's blocking)."""
    out = []
    for i, shape in enumerate(shapes):
        merged = O.merge_small_dims(shape, max_dim)
        for b, block in enumerate(O.block_shapes(merged, max_dim)):
            for k, d in enumerate(block):
                out.append((f"{i}.block_{b}.{k}", d))
    return out


def make(shapes=SHAPES, schedule=True, dtype=torch.float64, **kwargs: Any):
    g = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    defaults = dict(lr=0.05, betas=(0.9, 0.99), epsilon=1e-4, momentum=0.3, weight_decay=0.01,
                    max_preconditioner_dim=5, precondition_frequency=4, start_preconditioning_step=4,
                    grafting_config=AdaGradGraftingConfig(epsilon=1e-8))
    if dtype == torch.float64:
        defaults["precision_config"] = F64
    defaults.update(kwargs)
    config = StaggeredRootScheduleConfig(cost_model="dense") if schedule is True else (schedule or None)
    return params, DistributedShampoo(params, root_schedule_config=config, **defaults), defaults


def grads_for(shapes, step: int, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def set_grads(params, step: int) -> None:
    for p, grad in zip(params, grads_for([tuple(p.shape) for p in params], step, params[0].dtype)):
        p.grad = grad


def train(params, optimizer, steps, first=1) -> None:
    for t in range(first, first + steps):
        set_grads(params, t)
        optimizer.step()


# ---------------------------------------------------------------------------------- config
def test_config_validation_and_type() -> None:
    with pytest.raises(ValueError, match=r"StaggeredRootScheduleConfig.cost_model.*'cubic'.*Must be one of \('auto', 'dense', 'count'\)"):
        StaggeredRootScheduleConfig(cost_model="cubic")
    config = StaggeredRootScheduleConfig()
    config.cost_model = "nope"  # mutable: validated again when read
    with pytest.raises(ValueError, match="cost_model"):
        make(schedule=config)
    with pytest.raises(TypeError, match="root_schedule_config must be None"):
        make(schedule="staggered")
    assert StaggeredRootScheduleConfig in config_classes()  # torch.load(weights_only=True)


def test_keyword_is_last_so_positions_are_unchanged() -> None:
    import inspect

    names = list(inspect.signature(DistributedShampoo.__init__).parameters)
    # the reference's positional order, then its preconditioner_config, then our schedule
    assert names[-3:] == ["root_inv_config", "preconditioner_config", "root_schedule_config"]


# ---------------------------------------------------------------------------------- phases
def test_phases_follow_the_definition() -> None:
    _, optimizer, _ = make(precondition_frequency=3, start_preconditioning_step=3)
    engine = optimizer._engines[0]
    labels = factor_labels(SHAPES, 5)
    assert [engine.layout.factor_label(f) for f in range(engine.layout.factor_count)] == [l for l, _ in labels]
    want = expected_phases(labels, 3)
    got = engine.schedule.phases(3)
    assert {l: int(p) for (l, _), p in zip(labels, got)} == want
    assert set(engine.schedule.phases(1).tolist()) == {0}


def test_auto_balances_the_mlp_one_big_root_per_step() -> None:
    """MLP 1024-1024-1024-10: seven 1024 factors over 10 phases, at most one per phase."""
    from distributed_shampoo.utils.shampoo_root_schedule import assign_phases

    dims = np.array([1024, 1024, 1024, 1024, 1024, 1024, 1024, 10, 10])
    phases = assign_phases(dims, 10, "auto", on_cuda=False)
    big = phases[:7]
    assert len(set(big.tolist())) == 7 and list(big) == list(range(7))
    cuda = assign_phases(np.array([64] * 8 + [32] * 8), 4, "auto", on_cuda=True)
    # CUDA batches equal sizes: each phase gets two of each size (one launch per size)
    for p in range(4):
        assert sorted(np.array([64] * 8 + [32] * 8)[cuda == p].tolist()) == [32, 32, 64, 64]


# ---------------------------------------------------------------------------------- numerics
# factors stored in another dtype than the kernels': the staged-factor path of a root step
STAGED = PrecisionConfig(factor_matrix_dtype=torch.float64)


def test_frequency_one_is_the_default_schedule_bitwise() -> None:
    for dtype, extra in ((torch.float32, {}), (torch.float64, {}), (torch.float32, {"precision_config": STAGED})):
        runs = []
        for schedule in (None, True):
            params, optimizer, _ = make(schedule=schedule, dtype=dtype, precondition_frequency=1,
                                        start_preconditioning_step=2, **extra)
            train(params, optimizer, 6)
            runs.append(([p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())))
        assert_bitwise_equal(runs[0], runs[1], f"frequency 1 {dtype}")


@pytest.mark.parametrize("start,staged", [(4, False), (6, False), (4, True)])
def test_matches_oracle_over_three_periods(start: int, staged: bool) -> None:
    frequency, steps = 4, start + 3 * 4
    extra = dict(dtype=torch.float32, precision_config=STAGED) if staged else {}
    params, optimizer, kwargs = make(precondition_frequency=frequency, start_preconditioning_step=start, **extra)
    labels = factor_labels(SHAPES, 5)
    oracle_kwargs = {k: v for k, v in kwargs.items() if k not in ("precision_config", "grafting_config")}
    oracle_kwargs["grafting_config"] = O.AdaGradGraftingConfig(epsilon=1e-8)
    copies = []
    for phases in (expected_phases(labels, frequency), None):
        tensors = [p.detach().clone() for p in params]
        copies.append((tensors, O.OracleShampoo(tensors, root_phases=phases, **oracle_kwargs)))
    computed = []
    for t in range(1, steps + 1):
        set_grads(params, t)
        optimizer.step()
        engine = optimizer._engines[0]
        computed.append(set(np.flatnonzero(engine.root_status.numpy() != _backend.ROOT_INACTIVE).tolist()))
        for _, oracle in copies:
            oracle.step(grads_for(SHAPES, t, params[0].dtype))
    staggered, default = copies
    rtol, atol = (2e-4, 2e-6) if staged else (1e-9, 1e-11)
    for p, q in zip(params, staggered[0]):
        torch.testing.assert_close(p.detach().double(), q.double(), rtol=rtol, atol=atol)
    # the test can fail: the default schedule's result is measurably different
    assert max((p.detach().double() - q.double()).abs().max().item() for p, q in zip(params, default[0])) > 1e-4
    # exactly the due factors were computed at each root step
    phases = expected_phases(labels, frequency)
    for t in range(start + 1, steps + 1):
        due = {f for f, (label, _) in enumerate(labels) if phases[label] == t % frequency}
        assert computed[t - 1] == due or (not due and computed[t - 1] == computed[t - 2]), t


def test_staging_is_bounded_by_the_phase() -> None:
    """A phase's staging (packed factors of its blocks + packed roots of its factors) is far
    below the default root step's two copies of every packed factor."""
    shapes = [(5, 5)] * 8
    _, optimizer, _ = make(shapes=shapes, precondition_frequency=4)
    engine = optimizer._engines[0]
    total = engine.packing.numel
    for phase in range(4):
        plan = engine.schedule.plan(4, phase)
        assert plan.root_numel == 4 * 15  # four 5x5 factors, packed
        assert plan.factor_numel <= 2 * plan.root_numel
        # the default root step stages 2 * total; here a quarter of the roots plus the
        # factors of the blocks they belong to (siblings of another phase included)
        assert plan.factor_numel + plan.root_numel <= 0.75 * total


# ---------------------------------------------------------------------------------- atomicity
def _factor(optimizer, param, block: str, k: int) -> torch.Tensor:
    return optimizer.state[param][block]["shampoo"]["factor_matrices"][k]["quantized_values"]


def test_nan_factor_of_a_due_factor_raises_and_changes_nothing() -> None:
    params, optimizer, _ = make()
    train(params, optimizer, 5)  # start 4, then step 5 (phase 1)
    engine = optimizer._engines[0]
    labels = factor_labels(SHAPES, 5)
    phases = expected_phases(labels, 4)
    label = next(l for l, d in labels if phases[l] == 6 % 4 and d > 1)
    i, block, k = label.split(".")
    _factor(optimizer, params[int(i)], f"block_{block.split('_')[1]}", int(k))[0] = float("nan")
    before = copy.deepcopy(([p.detach().clone() for p in params], optimizer.state_dict()))
    set_grads(params, 6)
    with pytest.raises(ValueError, match=rf"nan values in bias-corrected factor matrix {label.replace('.', '[.]')}"):
        optimizer.step()
    assert_bitwise_equal(([p.detach().clone() for p in params], optimizer.state_dict()), before, "failed step")
    assert int(engine.step_count) == 5


def _failing_setup(use_protected_eigh: bool):
    """A (3, 3) parameter, higher-order roots limited to one iteration: the dense, badly
    conditioned gradient of step 3 makes the root of factor 1 (phase 1) fail."""
    p = nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))
    optimizer = DistributedShampoo(
        [p], lr=0.1, betas=(0.0, 1.0), epsilon=1e-6, max_preconditioner_dim=3,
        precondition_frequency=2, start_preconditioning_step=2, precision_config=F64,
        root_inv_config=CoupledHigherOrderConfig(max_iterations=1),
        use_protected_eigh=use_protected_eigh,
        root_schedule_config=StaggeredRootScheduleConfig(cost_model="dense"),
    )
    grads = [torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))] * 2 + [
        torch.tensor([[5.0, 1.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 0.01]], dtype=torch.float64).T
    ]
    assert optimizer._engines[0].schedule.phases(2).tolist() == [0, 1]
    for grad in grads[:2]:
        p.grad = grad.clone()
        optimizer.step()
    p.grad = grads[2].clone()
    return p, optimizer


def test_failed_root_protected_keeps_previous_and_unprotected_changes_nothing(caplog) -> None:
    p, optimizer = _failing_setup(use_protected_eigh=True)
    shampoo = optimizer.state[p]["block_0"]["shampoo"]
    previous = [shampoo["inv_factor_matrices"][k]["quantized_values"].clone() for k in range(2)]
    optimizer.step()
    engine = optimizer._engines[0]
    assert engine.root_status.tolist() == [_backend.ROOT_INACTIVE, _backend.ROOT_FAILED]
    assert "0.block_0.1" in caplog.text and "previous" in caplog.text
    for k in range(2):  # factor 0 was not due, factor 1 failed: both keep their roots
        assert_bitwise_equal(shampoo["inv_factor_matrices"][k]["quantized_values"], previous[k])

    p, optimizer = _failing_setup(use_protected_eigh=False)
    before = copy.deepcopy((p.detach().clone(), optimizer.state_dict()))
    with pytest.raises(ArithmeticError, match="0.block_0.1"):
        optimizer.step()
    assert_bitwise_equal((p.detach().clone(), optimizer.state_dict()), before, "unprotected failure")


def test_residual_logging_covers_the_computed_factors(caplog) -> None:
    import logging

    params, optimizer, _ = make(track_root_inv_residuals=True)
    train(params, optimizer, 4)
    with caplog.at_level(logging.DEBUG, logger="distributed_shampoo.distributed_shampoo"):
        train(params, optimizer, 1, first=5)
    assert "Relative Error" in caplog.text


# ---------------------------------------------------------------------------------- checkpoints
def test_resume_mid_period_is_bitwise() -> None:
    params, optimizer, _ = make()
    train(params, optimizer, 14)
    reference = [p.detach().clone() for p in params]

    params, optimizer, _ = make()
    train(params, optimizer, 6)  # mid-period (start 4, frequency 4)
    saved = copy.deepcopy((optimizer.state_dict(), [p.detach().clone() for p in params]))
    params, optimizer, _ = make()
    with torch.no_grad():
        for p, q in zip(params, saved[1]):
            p.copy_(q)
    optimizer.load_state_dict(saved[0])
    train(params, optimizer, 8, first=7)
    assert_bitwise_equal([p.detach() for p in params], reference, "resumed")


# ---------------------------------------------------------------------------------- DDP
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(9, 6)
        self.mid = nn.Linear(6, 3)
        self.head = nn.Linear(3, 1)
        self.dead = nn.Linear(4, 1)  # never used: its grads stay None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(torch.tanh(self.fc(x)))))


DDP_STEPS = 11
DDP_KW = dict(lr=0.05, betas=(0.9, 0.99), epsilon=1e-4, max_preconditioner_dim=4,
              precondition_frequency=3, start_preconditioning_step=3)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 9, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = Net().double()
        optimizer = DistributedShampoo(
            model.parameters(), precision_config=F64, distributed_config=DDPShampooConfig(),
            root_schedule_config=StaggeredRootScheduleConfig(cost_model="dense"), **DDP_KW)
        x, y = _data()
        part = slice(rank * 8 // world, (rank + 1) * 8 // world)
        for _ in range(DDP_STEPS):
            optimizer.zero_grad()
            (nn.functional.mse_loss(model(x[part]), y[part]) / world).backward()
            for p in model.parameters():  # the DDP wrapper's gradient average, by hand
                if p.grad is not None:
                    dist.all_reduce(p.grad)
            optimizer.step()
        engine = optimizer._engines[0]
        phases = engine.schedule.phases(3)
        labels = {engine.layout.factor_label(f): int(phases[f]) for f in range(engine.layout.factor_count)}
        state = optimizer.distributed_state_dict(key_to_param=model.named_parameters())
        dcp.save({"optim": state}, checkpoint_id=f"{out}/checkpoint")
        own = {fqn: {k: v.clone() for k, v in blocks.items() if k != "step"}
               for fqn, blocks in state["state"].items()}
        torch.save(([p.detach() for p in model.parameters()], labels, own), f"{out}/{rank}.pt")
    except BaseException:
        shutdown_process_group(clean=False)
        raise
    shutdown_process_group()


def test_ddp_two_ranks_follow_each_ranks_own_phases() -> None:
    """Under DDP each rank balances the blocks it owns, so the phases are those of each
    owner's blocks (not the serial run's): the result equals the oracle with those phases,
    and every rank holds the same parameters."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
        results = [torch.load(f"{out}/{r}.pt") for r in range(2)]
        _check_ddp_checkpoint_loads_serially(f"{out}/checkpoint", results)
    assert_bitwise_equal(results[0][0], results[1][0], "ranks agree")
    phases = {**results[0][1], **results[1][1]}
    assert len(phases) == len(results[0][1]) + len(results[1][1])  # each factor on one rank
    torch.manual_seed(0)
    model = Net().double()
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert sorted(phases) == sorted(l for l, _ in factor_labels(shapes, 4))
    x, y = _data()
    finals = []
    for oracle_phases in (phases, None):
        tensors = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        oracle = O.OracleShampoo(list(tensors), root_phases=oracle_phases, **DDP_KW)
        for _ in range(DDP_STEPS):
            for t in tensors:
                t.grad = None
            fc_w, fc_b, mid_w, mid_b, head_w, head_b, _, _ = tensors
            h = torch.tanh(torch.tanh(x @ fc_w.T + fc_b) @ mid_w.T + mid_b)
            nn.functional.mse_loss(h @ head_w.T + head_b, y).backward()
            oracle.step([t.grad for t in tensors])
        finals.append([t.detach() for t in tensors])
    # the batch split over ranks rounds the gradients differently (1e-16), which the
    # preconditioned steps amplify; the default schedule is orders of magnitude further off
    for p, q in zip(results[0][0], finals[0]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-8)
    assert max((p - q).abs().max().item() for p, q in zip(results[0][0], finals[1])) > 1e-4


def _check_ddp_checkpoint_loads_serially(path: str, results: list) -> None:
    """The 2-rank checkpoint (schedule on) into one process (schedule on): every saved tensor
    restored bitwise; training goes on with the phases of the serial layout (every factor's
    own, balanced over all blocks now), computing exactly the due factors."""
    from distributed_shampoo.utils.shampoo_dcp import ShampooLoadPlanner

    torch.manual_seed(0)
    model = Net().double()
    with torch.no_grad():
        for p, q in zip(model.parameters(), results[0][0]):
            p.copy_(q)
    optimizer = DistributedShampoo(
        model.parameters(), precision_config=F64,
        root_schedule_config=StaggeredRootScheduleConfig(cost_model="dense"), **DDP_KW)
    state = {"optim": optimizer.distributed_state_dict(key_to_param=model.named_parameters())}
    dcp.load(state, checkpoint_id=path, planner=ShampooLoadPlanner())
    optimizer.load_distributed_state_dict(state["optim"], key_to_param=model.named_parameters())
    loaded = optimizer.distributed_state_dict(key_to_param=model.named_parameters())["state"]
    saved = {}
    for _, _, own in results:
        for fqn, blocks in own.items():
            saved.setdefault(fqn, {}).update(blocks)
    for fqn, blocks in saved.items():
        for key, value in blocks.items():
            assert_bitwise_equal(loaded[fqn][key], value, f"{fqn}/{key}")
    engine = optimizer._engines[0]
    assert int(engine.step_count) == DDP_STEPS
    serial = expected_phases(factor_labels([tuple(p.shape) for p in model.parameters()], 4), 3)
    labels = [engine.layout.factor_label(f) for f in range(engine.layout.factor_count)]
    x, y = _data()
    for t in range(DDP_STEPS + 1, DDP_STEPS + 4):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        computed = {labels[f] for f in np.flatnonzero(engine.root_status.numpy() != _backend.ROOT_INACTIVE)}
        live = {l for l in labels if not l.startswith("6.") and not l.startswith("7.")}  # dead layer
        assert computed == {l for l in live if serial[l] == t % 3}, t
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_edited_frequency_rebalances_for_the_new_frequency() -> None:
    """precondition_frequency is a group value the user may edit: the phases are those of
    the frequency in force (derived again, deterministically)."""
    params, optimizer, _ = make()
    train(params, optimizer, 6)
    optimizer.param_groups[0]["precondition_frequency"] = 2
    engine = optimizer._engines[0]
    labels = factor_labels(SHAPES, 5)
    phases = expected_phases(labels, 2)
    for t in (7, 8):
        train(params, optimizer, 1, first=t)
        computed = set(np.flatnonzero(engine.root_status.numpy() != _backend.ROOT_INACTIVE).tolist())
        assert computed == {f for f, (label, _) in enumerate(labels) if phases[label] == t % 2}
