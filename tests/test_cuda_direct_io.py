"""DistributedShampoo on CUDA with the direct parameter I/O (the pointer-table kernels read
gradients and write parameters in place, csrc/cuda/param_io_cuda.h) against the same steps
with the staged I/O it replaced (param-layout copies, updates added by torch), forced by
making ShampooGroupEngine._direct_io answer False. Both must agree bit for bit at every
step: parameters, every state tensor, step counters; including L2 and decoupled weight
decay, momentum / Nesterov, SGD and no grafting, bfloat16 parameters, a parameter without a
gradient, a non-contiguous gradient, eigenvalue-corrected Shampoo, the staggered root schedule, and a NaN gradient
(a failed step changes nothing on either path)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from test_atomicity import assert_bitwise_equal
from torch import nn

from distributed_shampoo import _backend
from distributed_shampoo import _backend_io
from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import (
    AdamGraftingConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    SGDGraftingConfig,
    StaggeredRootScheduleConfig,
)
from distributed_shampoo.utils.shampoo_param_io import ParamIO


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if not _backend.cuda_available():
        return "the CUDA kernels (distributed_shampoo._C_cuda) are not built"
    if not _backend_io.cuda_io_available():
        return "this build has no CUDA pointer-table kernels"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

DEVICE = torch.device("cuda")
SHAPES = [(9, 6), (7,), (5, 3, 4), (1,), (3, 11)]
BASE: dict[str, Any] = {
    "lr": 0.05, "betas": (0.9, 0.95), "epsilon": 1e-3, "max_preconditioner_dim": 4,
    "precondition_frequency": 3, "start_preconditioning_step": 3,
    "grafting_config": AdamGraftingConfig(beta2=0.99, epsilon=1e-8),
}
CASES = {
    "plain": {},
    "l2_decay_momentum": {"weight_decay": 0.01, "use_decoupled_weight_decay": False, "momentum": 0.5},
    "decoupled_decay_nesterov": {"weight_decay": 0.02, "momentum": 0.9, "use_nesterov": True,
                                 "dampening": 0.1, "beta3": 0.8},
    "sgd_grafting": {"grafting_config": SGDGraftingConfig(), "weight_decay": 0.01},
    "no_grafting": {"grafting_config": None, "momentum": 0.3},
    "soap": {"preconditioner_config": EigenvalueCorrectedShampooPreconditionerConfig(),
             "weight_decay": 0.01},
    "staggered": {"root_schedule_config": StaggeredRootScheduleConfig(cost_model="dense"),
                  "momentum": 0.5},
}
STEPS = 7


def _grads(step: int, dtype: torch.dtype, skip: int | None) -> list[torch.Tensor | None]:
    generator = torch.Generator().manual_seed(1000 + step)
    out: list[torch.Tensor | None] = []
    for i, s in enumerate(SHAPES):
        g = torch.randn(s, generator=generator).to(dtype)
        out.append(None if i == skip else g)
    return out


def _on_device(g: torch.Tensor, i: int) -> torch.Tensor:
    """Parameter 0's gradient as a transposed (non-contiguous) view, the others as they are."""
    if i == 0:
        return g.t().contiguous().to(DEVICE).t()
    return g.to(DEVICE)


def _run(staged: bool, dtype: torch.dtype, overrides: dict[str, Any], monkeypatch,
         skip_at: int | None = None, nan_at: int | None = None):
    """STEPS steps; a snapshot after each (parameters and optimizer state)."""
    with monkeypatch.context() as patch:
        if staged:
            patch.setattr(ParamIO, "_direct_io", lambda self, grads: False)
        generator = torch.Generator().manual_seed(7)
        params = [nn.Parameter(torch.randn(s, generator=generator).to(dtype).to(DEVICE)) for s in SHAPES]
        optimizer = DistributedShampoo(params, **{**BASE, **overrides})
        snapshots, errors = [], []
        for t in range(1, STEPS + 1):
            grads = _grads(t, dtype, 2 if t == skip_at else None)
            if t == nan_at:
                grads[1][3] = float("nan")
            for i, (p, g) in enumerate(zip(params, grads)):
                p.grad = None if g is None else _on_device(g, i)
            try:
                optimizer.step()
                errors.append(None)
            except ValueError as e:
                errors.append(str(e).split(".")[0])
            torch.cuda.synchronize()
            snapshots.append({
                "params": [p.detach().clone() for p in params],
                "state": {i: copy.deepcopy(optimizer.state[p]) for i, p in enumerate(params)},
            })
        return snapshots, errors


def _assert_paths_agree(dtype, overrides, monkeypatch, **kw):
    direct, direct_errors = _run(False, dtype, overrides, monkeypatch, **kw)
    staged, staged_errors = _run(True, dtype, overrides, monkeypatch, **kw)
    assert direct_errors == staged_errors
    for t, (a, b) in enumerate(zip(direct, staged), start=1):
        assert_bitwise_equal(a, b, f"step {t}")
    return direct, direct_errors


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_direct_io_steps_equal_staged_steps(case, monkeypatch):
    direct, _ = _assert_paths_agree(torch.float32, CASES[case], monkeypatch, skip_at=4)
    # the steps did something (a vacuous comparison would pass too)
    assert not torch.equal(direct[0]["params"][0], direct[-1]["params"][0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_direct_io_other_parameter_dtypes(dtype, monkeypatch):
    overrides = dict(CASES["decoupled_decay_nesterov"])
    if dtype == torch.float64:
        from test_optimizer_oracle import F64_PRECISION
        overrides["precision_config"] = F64_PRECISION
    _assert_paths_agree(dtype, overrides, monkeypatch, skip_at=5)


def test_direct_io_is_used_on_cuda(monkeypatch):
    """The direct path really runs (no staged copy) for float32 CUDA parameters."""
    calls = []
    real = _backend_io.finish_io

    def spy(*args, **kwargs):
        calls.append(args[0][0].device.type if args[0][0] is not None else None)
        return real(*args, **kwargs)

    monkeypatch.setattr("distributed_shampoo.utils.shampoo_step_pipeline.finish_io", spy)
    params = [nn.Parameter(torch.randn(s).to(DEVICE)) for s in SHAPES]
    optimizer = DistributedShampoo(params, **BASE)
    for p in params:
        p.grad = torch.randn(p.shape).to(DEVICE)
    optimizer.step()
    assert calls and set(calls) == {"cuda"}


def test_nan_gradient_changes_nothing_on_either_path(monkeypatch):
    """Step 5 (no root) gets a NaN: found later without a wait, reported at step 6 (the
    synchronize makes the flag's copy arrive), parameters and state as after step 4."""
    direct, errors = _assert_paths_agree(torch.float32, CASES["l2_decay_momentum"], monkeypatch, nan_at=5)
    assert errors[:4] == [None] * 4 and any(e is not None for e in errors[4:]), errors
    first_error = next(t for t, e in enumerate(errors) if e is not None)
    assert_bitwise_equal(direct[first_error]["params"], direct[3]["params"], "after the reported failure")
