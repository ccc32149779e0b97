"""The staggered root schedule (issue 13) on CUDA parameters: the CUDA kernels against the
same optimizer on CPU (held to tests/oracle.py by tests/test_root_schedule.py), frequency 1
bitwise equal to the default schedule, and an atomic failed step. Runs on a GPU or under the
emulation tier (python tools/cuda_emu/run.py)."""

import pytest
import torch
from test_atomicity import assert_bitwise_equal
from test_cuda_optimizer import _cuda_skip_reason, _snapshot
from torch import nn

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import AdamGraftingConfig, StaggeredRootScheduleConfig

pytestmark = pytest.mark.skipif(_cuda_skip_reason() is not None, reason=str(_cuda_skip_reason()))

SHAPES = ((9, 7), (7,), (3, 9), (1, 4))
KW = dict(lr=0.05, betas=(0.9, 0.99), epsilon=1e-3, momentum=0.3, max_preconditioner_dim=5,
          precondition_frequency=3, start_preconditioning_step=3,
          grafting_config=AdamGraftingConfig(beta2=0.99, epsilon=1e-8))


def _run(device: str, steps: int, schedule, **overrides):
    g = torch.Generator().manual_seed(5)
    params = [nn.Parameter(torch.randn(s, generator=g).to(device)) for s in SHAPES]
    optimizer = DistributedShampoo(params, root_schedule_config=schedule, **{**KW, **overrides})
    for t in range(1, steps + 1):
        gen = torch.Generator().manual_seed(50 + t)
        for p in params:
            p.grad = torch.randn(tuple(p.shape), generator=gen).to(device)
        optimizer.step()
    return params, optimizer


def test_cuda_matches_cpu_over_three_periods() -> None:
    # cost_model "dense": the same phases on both devices ("auto" balances CUDA batch groups)
    cpu, cpu_opt = _run("cpu", 12, StaggeredRootScheduleConfig(cost_model="dense"))
    cuda, cuda_opt = _run("cuda", 12, StaggeredRootScheduleConfig(cost_model="dense"))
    assert (cpu_opt._engines[0].schedule.phases(3) == cuda_opt._engines[0].schedule.phases(3)).all()
    for p, q in zip(cpu, cuda):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-4, atol=1e-6)


def test_cuda_frequency_one_is_the_default_bitwise() -> None:
    a, _ = _run("cuda", 5, None, precondition_frequency=1, start_preconditioning_step=1)
    b, _ = _run("cuda", 5, StaggeredRootScheduleConfig(), precondition_frequency=1, start_preconditioning_step=1)
    assert_bitwise_equal([p.detach().cpu() for p in a], [p.detach().cpu() for p in b])


def test_cuda_nan_factor_of_a_due_factor_raises_and_changes_nothing() -> None:
    params, optimizer = _run("cuda", 4, StaggeredRootScheduleConfig(cost_model="dense"))
    engine = optimizer._engines[0]
    layout = engine.layout
    phases = engine.schedule.phases(3)
    f = next(f for f in range(layout.factor_count) if phases[f] == 5 % 3)
    label = layout.factor_label(f)
    param, block, k = label.split(".")
    factor = optimizer.state[params[int(param)]][block]["shampoo"]["factor_matrices"][int(k)]["quantized_values"]
    factor[0] = float("nan")
    before = _snapshot(params, optimizer)
    for p in params:
        p.grad = torch.ones(tuple(p.shape)).to("cuda")
    with pytest.raises(ValueError, match="nan values in bias-corrected factor matrix " + label.replace(".", "[.]")):
        optimizer.step()
    assert_bitwise_equal(_snapshot(params, optimizer), before, "failed CUDA step")
