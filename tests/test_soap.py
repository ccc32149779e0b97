"""Eigenvalue-corrected Shampoo / SOAP (issue 14) through DistributedShampoo: against the plain
torch oracle (tests/soap_oracle.py) in float64 and float32, its configs and their checks,
atomic failed steps, and checkpoints that resume bitwise.

Test problems keep every factor's eigenvalues distinct where an eigenbasis is computed, or
rank-deficient only where D is still zero: elsewhere an eigenbasis is only defined up to a
rotation inside a repeated eigenvalue's eigenspace, and SOAP's result depends on that choice
(as it does in the reference), so no two implementations need agree there.
"""

import copy
import inspect
import io
import logging

import pytest
import torch

from distributed_shampoo import (
    AdamGraftingConfig,
    CoupledNewtonConfig,
    DefaultEigenvalueCorrectedShampooConfig,
    DefaultShampooConfig,
    DefaultSOAPConfig,
    DistributedShampoo,
    EigenConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    EighEigenvectorConfig,
    PrecisionConfig,
    QRConfig,
    ShampooPreconditionerConfig,
)
from distributed_shampoo import _backend, _soap_backend
from tests.soap_oracle import OracleSOAP

F64 = PrecisionConfig(*(torch.float64,) * 8)


def _params(shapes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _grads(params, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _compare(shapes, steps, config, precision=F64, tol=1e-9, **hp):
    params = _params(shapes, dtype=torch.float64 if precision is F64 else torch.float32)
    mirror = [p.detach().clone() for p in params]
    optimizer = DistributedShampoo(params, preconditioner_config=config, precision_config=precision, **hp)
    oracle = OracleSOAP(mirror, preconditioner_config=config, **hp)
    for t in range(steps):
        grads = _grads(params, t)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        oracle.step(grads)
    moved = max(float((p.detach() - q).abs().max().detach()) for p, q in zip(params, _params(shapes)))
    assert moved > 1e-3  # the comparison below is not vacuous
    for p, q in zip(params, mirror):
        torch.testing.assert_close(p.detach().double(), q.double(), rtol=tol, atol=tol)
    return optimizer, oracle


# Frequency 1: each eigenbasis is computed where D has seen only the gradients whose span the
# factor holds (see the module docstring). Shapes: blocking (max dim 4), merging, 1-d, 0-d.
SHAPES_ANY = [(5, 3), (7,), (6, 9), (), (2, 1, 3)]
# 2-d blocks whose factors are full rank after two steps: any frequency.
SHAPES_2D = [(4, 3), (8, 6)]

CASES = [
    ("adam", SHAPES_ANY, dict(betas=(0.9, 0.95), precondition_frequency=1)),
    ("l2+momentum", SHAPES_ANY, dict(betas=(0.9, 0.95), precondition_frequency=1, weight_decay=0.01,
                                     use_decoupled_weight_decay=False, momentum=0.5)),
    ("adamw+nesterov", SHAPES_ANY, dict(betas=(0.8, 0.99), precondition_frequency=1, weight_decay=0.05,
                                        momentum=0.3, use_nesterov=True, beta3=0.6)),
    ("adagrad-like", SHAPES_ANY, dict(betas=(0.0, 1.0), precondition_frequency=1)),
    ("no-bias-correction", SHAPES_ANY, dict(betas=(0.9, 0.99), precondition_frequency=1,
                                            use_bias_correction=False)),
    ("root-4", SHAPES_ANY, dict(betas=(0.0, 0.99), precondition_frequency=1, inv_root_override=[0, 4, 3])),
    ("frequency-2", SHAPES_2D, dict(betas=(0.0, 0.999), precondition_frequency=2)),
    ("grafting", SHAPES_2D, dict(betas=(0.9, 0.999), precondition_frequency=2, start_preconditioning_step=4,
                                 grafting_config=AdamGraftingConfig(beta2=0.99, epsilon=1e-8))),
]


@pytest.mark.parametrize("config", [DefaultEigenvalueCorrectedShampooConfig, DefaultSOAPConfig],
                         ids=["eigh", "qr"])
@pytest.mark.parametrize("name,shapes,hp", CASES, ids=[c[0] for c in CASES])
def test_soap_matches_oracle_float64(config, name, shapes, hp):
    if type(config.amortized_computation_config) is QRConfig and hp["precondition_frequency"] == 1:
        # QR warm-starts from the previous eigenbasis: a rank-deficient first one (step 1) is
        # arbitrary inside its null space, so the first eigenbasis waits for full-rank factors
        shapes, hp = SHAPES_2D, {**hp, "precondition_frequency": 2}
    _compare(shapes, 8, config, lr=0.01, epsilon=1e-10, max_preconditioner_dim=4, **hp)


def test_soap_qr_converged_iterations_match_oracle():
    config = EigenvalueCorrectedShampooPreconditionerConfig(
        amortized_computation_config=QRConfig(max_iterations=5, tolerance=1e-7))
    _compare(SHAPES_2D, 8, config, lr=0.01, betas=(0.9, 0.99), epsilon=1e-10,
             max_preconditioner_dim=4, precondition_frequency=2)


def test_soap_float32_matches_oracle():
    _compare(SHAPES_2D, 6, DefaultEigenvalueCorrectedShampooConfig, precision=PrecisionConfig(),
             tol=2e-4, lr=0.01, betas=(0.9, 0.99), epsilon=1e-8, max_preconditioner_dim=4,
             precondition_frequency=2)


def test_soap_differs_from_shampoo_and_keeps_its_state():
    opt, oracle = _compare(SHAPES_2D, 4, DefaultSOAPConfig, lr=0.01, betas=(0.0, 0.99),
                           epsilon=1e-10, max_preconditioner_dim=4, precondition_frequency=2)
    state = opt.state[opt.param_groups[0]["params"][0]]["block_0"]["shampoo"]
    assert set(state) == {"factor_matrices", "factor_matrices_eigenvectors", "corrected_eigenvalues",
                          "is_factor_matrices_diagonal"}
    Q = state["factor_matrices_eigenvectors"][0]["quantized_values"]
    assert Q.shape == (4, 4)
    torch.testing.assert_close(Q.T @ Q, torch.eye(4, dtype=Q.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(state["corrected_eigenvalues"]["quantized_values"],
                               oracle.blocks[0][0].corrected, atol=1e-12, rtol=1e-9)
    shampoo = _params(SHAPES_2D)
    s_opt = DistributedShampoo(shampoo, lr=0.01, betas=(0.0, 0.99), epsilon=1e-10,
                               max_preconditioner_dim=4, precondition_frequency=2, precision_config=F64)
    for t in range(4):
        for p, g in zip(shampoo, _grads(shampoo, t)):
            p.grad = g
        s_opt.step()
    assert not torch.allclose(shampoo[0], opt.param_groups[0]["params"][0])


# ------------------------------------------------------------------ configs and checks
def test_preconditioner_config_follows_root_inv_config_and_keeps_positional_order():
    names = list(inspect.signature(DistributedShampoo.__init__).parameters)
    # the reference's positional order, then its preconditioner_config, then our schedule
    assert names[-3:] == ["root_inv_config", "preconditioner_config", "root_schedule_config"]
    p = _params([(3, 2)])
    opt = DistributedShampoo(p, 0.1, (0.0, 0.99), -1.0, 1e-12, 0.0, 0.0, 0.0, 1024, 1, -1, 0, 1.0,
                             False, True, True, None, True, None, None, None, None, None, True,
                             False, EigenConfig(), DefaultSOAPConfig)
    assert opt.param_groups[0]["preconditioner_config"] is DefaultSOAPConfig


def test_config_defaults_fields_and_types():
    assert DefaultShampooConfig.amortized_computation_config == EigenConfig()
    assert DefaultEigenvalueCorrectedShampooConfig.amortized_computation_config == EighEigenvectorConfig()
    assert DefaultSOAPConfig.amortized_computation_config == QRConfig(max_iterations=1, tolerance=1e-5)
    assert EighEigenvectorConfig().retry_double_precision is True
    with pytest.raises(TypeError):
        QRConfig(2)  # keyword-only, as in the reference
    with pytest.raises(TypeError):
        ShampooPreconditionerConfig(EigenConfig())
    with pytest.raises(TypeError, match="abstract"):
        from distributed_shampoo import PreconditionerConfig
        PreconditionerConfig()


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"Invalid max_iterations: -1\. Must be an integer in \[0, 1000\]\."):
        QRConfig(max_iterations=-1)
    with pytest.raises(ValueError, match="Invalid tolerance"):
        QRConfig(tolerance=-1.0)
    with pytest.raises(NotImplementedError, match="Eigenvector computation method is not implemented!"):
        EigenvalueCorrectedShampooPreconditionerConfig(amortized_computation_config=EigenConfig())
    with pytest.raises(NotImplementedError, match="Root inverse config is not implemented!"):
        ShampooPreconditionerConfig(amortized_computation_config=QRConfig())
    p = _params([(3, 2)])
    with pytest.raises(ValueError, match=r"^track_root_inv_residuals=True has to be set to False when "
                       r"amortized_computation_config=QRConfig\(max_iterations=1, tolerance=1e-05\) "
                       r"is not an instance of RootInvConfig\.$"):
        DistributedShampoo(p, preconditioner_config=DefaultSOAPConfig, track_root_inv_residuals=True)
    with pytest.raises(NotImplementedError, match=r"group\[PRECONDITIONER_CONFIG\]=.* not supported!"):
        DistributedShampoo(p, preconditioner_config=EigenConfig())
    with pytest.raises(ValueError, match="Both root_inv_config and preconditioner_config"):
        DistributedShampoo(p, root_inv_config=CoupledNewtonConfig(), preconditioner_config=DefaultShampooConfig)
    with pytest.raises(ValueError, match="exponent_multiplier"):
        DistributedShampoo(p, preconditioner_config=DefaultSOAPConfig, exponent_multiplier=0.5)
    with pytest.raises(ValueError, match="inv_root_override"):
        DistributedShampoo(p, preconditioner_config=DefaultSOAPConfig, inv_root_override=2.5)


def test_shampoo_preconditioner_config_selects_the_root_method():
    p = _params([(4, 3)])
    q = [t.detach().clone().requires_grad_() for t in p]
    newton = CoupledNewtonConfig(max_iterations=50)
    a = DistributedShampoo(p, preconditioner_config=ShampooPreconditionerConfig(amortized_computation_config=newton),
                           precision_config=F64)
    b = DistributedShampoo(q, root_inv_config=newton, precision_config=F64)
    assert a.param_groups[0]["root_inv_config"] is newton
    for t in range(3):
        for x, y, g in zip(p, q, _grads(p, t)):
            x.grad, y.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert all(torch.equal(x, y) for x, y in zip(p, q))


def test_mutated_config_is_revalidated_and_group_change_refused():
    config = EigenvalueCorrectedShampooPreconditionerConfig(amortized_computation_config=QRConfig())
    p = _params([(4, 3)])
    opt = DistributedShampoo(p, preconditioner_config=config, precision_config=F64)
    p[0].grad = torch.ones_like(p[0])
    config.amortized_computation_config.max_iterations = -3
    with pytest.raises(ValueError, match="Invalid max_iterations"):
        opt.step()
    config.amortized_computation_config.max_iterations = 1
    opt.param_groups[0]["preconditioner_config"] = DefaultShampooConfig
    with pytest.raises(ValueError, match="preconditioner_config was changed"):
        opt.step()


# ------------------------------------------------------------------ atomic failed steps
def _snapshot(opt):
    return [p.detach().clone() for p in opt.param_groups[0]["params"]], copy.deepcopy(opt.state_dict())


def _assert_unchanged(opt, before):
    params, state = before
    assert all(torch.equal(a, b) for a, b in zip(params, opt.param_groups[0]["params"]))
    now = opt.state_dict()
    flat_before, flat_now = state["state"], now["state"]
    assert flat_before.keys() == flat_now.keys()
    for k in flat_before:
        for key in flat_before[k]:
            a, b = flat_before[k][key], flat_now[k][key]
            assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), key


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_changes_nothing(bad):
    p = _params([(4, 3), (5,)])
    opt = DistributedShampoo(p, preconditioner_config=DefaultSOAPConfig, betas=(0.9, 0.99),
                             precision_config=F64)
    for t in range(3):
        for x, g in zip(p, _grads(p, t)):
            x.grad = g
        opt.step()
    before = _snapshot(opt)
    p[0].grad = p[0].grad.clone()
    p[0].grad[1, 1] = bad
    with pytest.raises(ValueError, match="nan or inf values in the gradient"):
        opt.step()
    _assert_unchanged(opt, before)


def _fail_eigenbasis(monkeypatch):
    real = _soap_backend.eigenbasis

    def failing(*args, **kwargs):
        real(*args, **kwargs)
        kwargs["status_out"][0] = _backend.ROOT_FAILED

    monkeypatch.setattr(_soap_backend, "eigenbasis", failing)


def test_unprotected_eigendecomposition_failure_raises_and_changes_nothing(monkeypatch):
    p = _params([(4, 3)])
    opt = DistributedShampoo(p, preconditioner_config=DefaultEigenvalueCorrectedShampooConfig,
                             use_protected_eigh=False, precision_config=F64)
    for t in range(2):
        p[0].grad = _grads(p, t)[0]
        opt.step()
    before = _snapshot(opt)
    _fail_eigenbasis(monkeypatch)
    p[0].grad = _grads(p, 5)[0]
    with pytest.raises(ArithmeticError, match="Matrix computation failed for factor matrix 0.block_0.0"):
        opt.step()
    _assert_unchanged(opt, before)


def test_protected_eigendecomposition_failure_keeps_previous_eigenbasis(monkeypatch, caplog):
    p = _params([(4, 3)])
    opt = DistributedShampoo(p, preconditioner_config=DefaultEigenvalueCorrectedShampooConfig,
                             precision_config=F64, max_preconditioner_dim=4)
    for t in range(2):
        p[0].grad = _grads(p, t)[0]
        opt.step()
    shampoo = opt.state[p[0]]["block_0"]["shampoo"]
    Q0 = shampoo["factor_matrices_eigenvectors"][0]["quantized_values"].clone()
    Q1 = shampoo["factor_matrices_eigenvectors"][1]["quantized_values"].clone()
    _fail_eigenbasis(monkeypatch)
    p[0].grad = _grads(p, 5)[0]
    with caplog.at_level(logging.WARNING):
        opt.step()
    assert "Using previous factor matrix eigenvectors and continuing..." in caplog.text
    assert torch.equal(shampoo["factor_matrices_eigenvectors"][0]["quantized_values"], Q0)
    assert not torch.equal(shampoo["factor_matrices_eigenvectors"][1]["quantized_values"], Q1)


def test_overflowing_factor_update_raises_and_changes_nothing():
    """A finite gradient whose factor update would overflow float32, on a root step."""
    p = _params([(3, 2)], dtype=torch.float32)
    opt = DistributedShampoo(p, preconditioner_config=DefaultSOAPConfig, betas=(0.0, 1.0),
                             precondition_frequency=2)
    p[0].grad = _grads(p, 0)[0]
    opt.step()
    before = _snapshot(opt)
    p[0].grad = torch.full((3, 2), 1e19)
    with pytest.raises(ValueError, match="could exceed the largest finite value"):
        opt.step()
    _assert_unchanged(opt, before)


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("config", [DefaultEigenvalueCorrectedShampooConfig, DefaultSOAPConfig],
                         ids=["eigh", "qr"])
def test_checkpoint_resumes_bitwise(config):
    hp = dict(preconditioner_config=config, betas=(0.9, 0.99), momentum=0.5, lr=0.01,
              precondition_frequency=2, max_preconditioner_dim=4)
    a = _params(SHAPES_2D, dtype=torch.float32)
    opt_a = DistributedShampoo(a, **hp)
    for t in range(3):
        for x, g in zip(a, _grads(a, t)):
            x.grad = g
        opt_a.step()
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    b = [x.detach().clone().requires_grad_() for x in a]
    opt_b = DistributedShampoo(b, **hp)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    for t in range(3, 7):
        for x, y, g in zip(a, b, _grads(a, t)):
            x.grad, y.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    key_to_param = [(f"p{i}", x) for i, x in enumerate(b)]
    flat = opt_b.distributed_state_dict(key_to_param)
    assert any("factor_matrices_eigenvectors" in k for k in flat["state"]["p0"])
    assert any("corrected_eigenvalues" in k for k in flat["state"]["p0"])


def test_precision_config_storage_dtypes_of_soap_state():
    """corrected_eigenvalues_dtype and factor_matrix_eigenvectors_dtype store the SOAP states
    (bfloat16 here), computed in the kernels' float32; the result stays near the float32 run."""
    hp = dict(preconditioner_config=DefaultSOAPConfig, betas=(0.9, 0.99), lr=0.01, epsilon=1e-8,
              precondition_frequency=2, max_preconditioner_dim=4)
    a = _params(SHAPES_2D, dtype=torch.float32)
    b = [x.detach().clone().requires_grad_() for x in a]
    low = PrecisionConfig(corrected_eigenvalues_dtype=torch.bfloat16,
                          factor_matrix_eigenvectors_dtype=torch.bfloat16)
    opt_a = DistributedShampoo(a, **hp)
    opt_b = DistributedShampoo(b, precision_config=low, **hp)
    for t in range(4):
        for x, y, g in zip(a, b, _grads(a, t)):
            x.grad, y.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    shampoo = opt_b.state[b[0]]["block_0"]["shampoo"]
    assert shampoo["corrected_eigenvalues"]["quantized_values"].dtype == torch.bfloat16
    assert shampoo["factor_matrices_eigenvectors"][0]["quantized_values"].dtype == torch.bfloat16
    assert not all(torch.equal(x, y) for x, y in zip(a, b))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=2e-2)


def test_soap_and_shampoo_groups_side_by_side():
    """preconditioner_config per param group: a SOAP group equals the oracle, a Shampoo group
    equals a Shampoo-only optimizer, in one optimizer."""
    soap_params, shampoo_params = _params(SHAPES_2D), _params([(3, 5)], seed=4)
    mirror = [p.detach().clone() for p in soap_params]
    alone = [p.detach().clone().requires_grad_() for p in shampoo_params]
    hp = dict(lr=0.01, betas=(0.0, 0.99), epsilon=1e-10, max_preconditioner_dim=4,
              precondition_frequency=2)
    opt = DistributedShampoo(
        [{"params": soap_params, "preconditioner_config": DefaultSOAPConfig},
         {"params": shampoo_params}],
        precision_config=F64, **hp,
    )
    oracle = OracleSOAP(mirror, preconditioner_config=DefaultSOAPConfig, **hp)
    shampoo = DistributedShampoo(alone, precision_config=F64, **hp)
    for t in range(6):
        grads = _grads(soap_params, t)
        for p, g in zip(soap_params, grads):
            p.grad = g.clone()
        for p, q, g in zip(shampoo_params, alone, _grads(shampoo_params, t)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        oracle.step(grads)
        shampoo.step()
    for p, q in zip(soap_params, mirror):
        torch.testing.assert_close(p.detach(), q, rtol=1e-9, atol=1e-9)
    assert all(torch.equal(p, q) for p, q in zip(shampoo_params, alone))
    assert type(opt._engines[0]).__name__ == "SOAPGroupEngine"
    assert type(opt._engines[1]).__name__ == "ShampooGroupEngine"


def test_param_group_shampoo_preconditioner_config_sets_its_root_method():
    p, q = _params([(4, 3)]), _params([(4, 3)])
    newton = CoupledNewtonConfig(max_iterations=50)
    opt = DistributedShampoo(
        [{"params": p, "preconditioner_config": ShampooPreconditionerConfig(amortized_computation_config=newton)},
         {"params": q}], precision_config=F64,
    )
    assert opt.param_groups[0]["root_inv_config"] is newton
    assert opt.param_groups[1]["root_inv_config"] == EigenConfig()
    assert opt._engines[0].root_kwargs["method"] == "newton"
    with pytest.raises(ValueError, match="Both root_inv_config and preconditioner_config"):
        DistributedShampoo([{"params": _params([(2, 2)]), "root_inv_config": CoupledNewtonConfig(),
                             "preconditioner_config": DefaultShampooConfig}])
