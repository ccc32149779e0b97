"""Eigenvalue-corrected Shampoo (SOAP, issue 14) under the staggered root schedule (issue 13):
each factor recomputes its eigenbasis at the steps of its phase, against the plain torch oracle
(tests/soap_oracle.py, root_phases) with the issue's balancing; atomic failures on a staggered
step; resume mid-period bitwise."""

import copy

import numpy as np
import pytest
import torch

from distributed_shampoo import (
    DefaultEigenvalueCorrectedShampooConfig,
    DefaultSOAPConfig,
    DistributedShampoo,
    PrecisionConfig,
    StaggeredRootScheduleConfig,
)
from distributed_shampoo import _backend
from tests.soap_oracle import OracleSOAP
from tests.test_root_schedule import expected_phases, factor_labels

F64 = PrecisionConfig(*(torch.float64,) * 8)
# factors of sizes 4, 3, 2 and 1 (max dim 4); full rank by the start step
SHAPES = [(4, 3), (8, 6), (4, 1)]
HP = dict(lr=0.01, betas=(0.9, 0.99), epsilon=1e-10, max_preconditioner_dim=4, precondition_frequency=4,
          start_preconditioning_step=4, weight_decay=0.01, momentum=0.3)


def _params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def _grads(params, t):
    g = torch.Generator().manual_seed(1000 + t)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _make(params, config, schedule=True):
    return DistributedShampoo(
        params, preconditioner_config=config, precision_config=F64,
        root_schedule_config=StaggeredRootScheduleConfig(cost_model="dense") if schedule else None, **HP,
    )


def _step(params, optimizer, t):
    for p, g in zip(params, _grads(params, t)):
        p.grad = g
    optimizer.step()


@pytest.mark.parametrize("config", [DefaultEigenvalueCorrectedShampooConfig, DefaultSOAPConfig], ids=["eigh", "qr"])
def test_staggered_soap_matches_oracle_over_three_periods(config):
    steps = 4 + 3 * 4
    params = _params()
    optimizer = _make(params, config)
    phases = expected_phases(factor_labels(SHAPES, 4), 4)
    copies = []
    for root_phases in (phases, None):
        mirror = [p.detach().clone() for p in params]
        copies.append((mirror, OracleSOAP(mirror, preconditioner_config=config, root_phases=root_phases, **HP)))
    computed = []
    for t in range(1, steps + 1):
        grads = _grads(params, t)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        computed.append(set(np.flatnonzero(optimizer._engines[0].root_status.numpy() != _backend.ROOT_INACTIVE)))
        for _, oracle in copies:
            oracle.step(grads)
    (staggered, _), (default, _) = copies
    for p, q in zip(params, staggered):
        torch.testing.assert_close(p.detach(), q, rtol=1e-9, atol=1e-9)
    # not vacuous: the default schedule lands measurably elsewhere
    assert max(float((p.detach() - q).abs().max()) for p, q in zip(params, default)) > 1e-6
    labels = factor_labels(SHAPES, 4)
    for t in range(5, steps + 1):
        due = {f for f, (label, _) in enumerate(labels) if phases[label] == t % 4}
        if due:
            assert computed[t - 1] == due, t


def _snapshot(params, optimizer):
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    flat_a, flat_b = [], []

    def walk(node, out):
        if isinstance(node, torch.Tensor):
            out.append(node)
        elif isinstance(node, dict):
            for k in sorted(node, key=str):
                walk(node[k], out)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v, out)

    walk(a[1], flat_a)
    walk(b[1], flat_b)
    assert len(flat_a) == len(flat_b) and flat_a
    for x, y in zip(flat_a, flat_b):
        assert torch.equal(x, y)


def test_failed_staggered_eigenbasis_step_changes_nothing(monkeypatch):
    """use_protected_eigh=False and a failing eigendecomposition on a staggered step: raises,
    parameters and state bitwise unchanged, and the next good step goes on."""
    params = _params()
    optimizer = DistributedShampoo(
        params, preconditioner_config=DefaultEigenvalueCorrectedShampooConfig, precision_config=F64,
        root_schedule_config=StaggeredRootScheduleConfig(cost_model="dense"), use_protected_eigh=False, **HP,
    )
    for t in range(1, 6):
        _step(params, optimizer, t)
    before = _snapshot(params, optimizer)
    from distributed_shampoo import _soap_backend

    real = _soap_backend.eigenbasis

    def failing(*args, status_out, **kwargs):
        real(*args, status_out=status_out, **kwargs)
        computed = status_out != _backend.ROOT_INACTIVE
        status_out[computed] = _backend.ROOT_FAILED

    monkeypatch.setattr(_soap_backend, "eigenbasis", failing)
    for p, g in zip(params, _grads(params, 6)):
        p.grad = g
    with pytest.raises(RuntimeError, match="Matrix computation failed"):
        optimizer.step()
    _assert_same(before, _snapshot(params, optimizer))
    monkeypatch.setattr(_soap_backend, "eigenbasis", real)
    optimizer.step()
    assert not torch.equal(before[0][0], params[0].detach())


def test_resume_mid_period_is_bitwise():
    params = _params()
    optimizer = _make(params, DefaultSOAPConfig)
    for t in range(1, 7):  # 2 steps into a period
        _step(params, optimizer, t)
    saved = _snapshot(params, optimizer)
    for t in range(7, 13):
        _step(params, optimizer, t)
    resumed_params = [torch.nn.Parameter(p.clone()) for p in saved[0]]
    resumed = _make(resumed_params, DefaultSOAPConfig)
    resumed.load_state_dict(saved[1])
    for t in range(7, 13):
        _step(resumed_params, resumed, t)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p.detach(), q.detach())
