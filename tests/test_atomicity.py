"""SPEC A.3.12 (a NaN/Inf in a factor or a gradient raises a ValueError naming the parameter and
block, and the failed step changes nothing), SPEC §4.6.5 (use_protected_eigh keeps the previous
inverse factor and warns) and SPEC A.3.1 (p.grad is only read, never written; the filtered
gradient state is never corrupted by aliasing).
"""

import copy
import logging
import pathlib
import re
import sys
from typing import Any

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import oracle as O

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.matrix_functions_types import CoupledHigherOrderConfig
from distributed_shampoo.shampoo_types import (
    AdamGraftingConfig,
    PrecisionConfig,
    SGDGraftingConfig,
)

SHAPES = ((6, 5), (7,), ())


def _make(shapes=SHAPES, groups=None, **kwargs: Any):
    generator = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    defaults = dict(
        lr=0.1,
        betas=(0.9, 0.95),
        beta3=0.8,
        momentum=0.5,
        weight_decay=0.01,
        max_preconditioner_dim=4,
        grafting_config=AdamGraftingConfig(),
        epsilon=1e-3,
    )
    defaults.update(kwargs)
    spec = (
        params
        if groups is None
        else [dict(g, params=[params[i] for i in idx]) for idx, g in groups]
    )
    return params, DistributedShampoo(spec, **defaults)


def _set_grads(params: list[torch.nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def _snapshot(params, optimizer) -> dict[str, Any]:
    """Deep copies of every parameter and every tensor (and flag) in the optimizer state."""
    return {
        "params": [p.detach().clone() for p in params],
        "state": {i: copy.deepcopy(optimizer.state[p]) for i, p in enumerate(params)},
    }


def assert_bitwise_equal(a: Any, b: Any, where: str = "") -> None:
    """Bit for bit: floats compared as integers (so -0.0 != 0.0 and NaN payloads count)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert a.device == b.device, f"{where}: device {a.device} != {b.device}"
        a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
        if a.is_floating_point():
            ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            a, b = a.view(ints), b.view(ints)
        assert torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _factor(optimizer, param, block: str, k: int) -> torch.Tensor:
    return optimizer.state[param][block]["shampoo"]["factor_matrices"][k]["quantized_values"]


def _steps(optimizer, params) -> list[int]:
    return [int(optimizer.state[g["params"][0]]["step"]) for g in optimizer.param_groups]


# --------------------------------------------------------------------------------------------
# NaN / Inf in a factor matrix.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,word", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_non_finite_factor_raises_and_changes_nothing(value: float, word: str) -> None:
    params, optimizer = _make()
    for seed in (1, 2):
        _set_grads(params, seed)
        optimizer.step()
    # Param 0 is (6, 5): blocks (4,4),(4,1),(2,4),(2,1); poison dim 1 of block_2.
    _factor(optimizer, params[0], "block_2", 1)[O.packed_index(4, 1, 2)] = value
    before = _snapshot(params, optimizer)
    steps_before = _steps(optimizer, params)
    _set_grads(params, 3)
    with pytest.raises(
        ValueError,
        match=rf"(?i)encountered {word} values in bias-corrected factor matrix 0\.block_2\.1",
    ):
        optimizer.step()
    assert_bitwise_equal(_snapshot(params, optimizer), before, "after failed step")
    assert _steps(optimizer, params) == steps_before


def test_non_finite_factor_in_second_group_leaves_first_group_unchanged() -> None:
    """'leaves every parameter and optimizer state exactly as before the step' (A.3.12), also
    for the groups stepped before the failing one."""
    params, optimizer = _make(groups=[([0], {}), ([1, 2], {"lr": 0.05})])
    _set_grads(params, 1)
    optimizer.step()
    _factor(optimizer, params[1], "block_1", 0).fill_(float("nan"))
    before = _snapshot(params, optimizer)
    _set_grads(params, 2)
    with pytest.raises(ValueError, match=r"(?i)nan.*0\.block_1\.0"):
        optimizer.step()
    assert_bitwise_equal(_snapshot(params, optimizer), before, "after failed step")
    assert _steps(optimizer, params) == [1, 1]


# --------------------------------------------------------------------------------------------
# NaN / Inf gradients (our deviation: raise at once instead of poisoning the state).
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,word", [(float("nan"), "nan"), (float("inf"), "inf")])
@pytest.mark.parametrize("frequency", [1, 3], ids=["root_this_step", "no_root_this_step"])
def test_non_finite_gradient_raises_and_changes_nothing(
    value: float, word: str, frequency: int
) -> None:
    params, optimizer = _make(
        precondition_frequency=frequency, start_preconditioning_step=frequency
    )
    _set_grads(params, 1)
    optimizer.step()
    before = _snapshot(params, optimizer)
    _set_grads(params, 2)
    params[1].grad[5] = value  # vector of 7 -> blocks (4,), (3,): element 5 is in block_1
    grad_before = params[1].grad.clone()
    with pytest.raises(ValueError) as info:
        optimizer.step()
    message = str(info.value)
    assert word in message.lower(), message
    assert "block_1" in message and re.search(r"\b1\b", message), (
        f"must name parameter 1 and block_1: {message}"
    )
    assert_bitwise_equal(_snapshot(params, optimizer), before, "after failed step")
    assert_bitwise_equal(params[1].grad, grad_before, "grad")
    assert _steps(optimizer, params) == [1]


def test_step_after_failure_continues_normally() -> None:
    """A failed step is a no-op: repairing the gradient and stepping again gives exactly the
    run that never failed."""
    params_a, optimizer_a = _make()
    params_b, optimizer_b = _make()
    for params, optimizer in ((params_a, optimizer_a), (params_b, optimizer_b)):
        _set_grads(params, 1)
        optimizer.step()
    _set_grads(params_b, 2)
    params_b[0].grad[0, 0] = float("nan")
    with pytest.raises(ValueError):
        optimizer_b.step()
    for params, optimizer in ((params_a, optimizer_a), (params_b, optimizer_b)):
        _set_grads(params, 2)
        optimizer.step()
    assert_bitwise_equal(
        _snapshot(params_b, optimizer_b), _snapshot(params_a, optimizer_a), "resumed"
    )


# --------------------------------------------------------------------------------------------
# use_protected_eigh (SPEC B §4.6.5).
# --------------------------------------------------------------------------------------------


def _failing_root_setup(use_protected_eigh: bool):
    """A (3, 3) parameter with the higher-order method limited to one iteration.

    Step 1's gradient is diagonal, so the factor is diagonal and its root takes the exact
    diagonal path.  Step 2's gradient makes the factor dense and badly conditioned; one Newton
    step then leaves max|A X^p - I| > 0.1, an ArithmeticError inside the root computation.
    """
    p = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))
    kwargs = dict(
        lr=0.1,
        betas=(0.0, 1.0),
        epsilon=1e-6,
        max_preconditioner_dim=3,
        root_inv_config=CoupledHigherOrderConfig(max_iterations=1),
        use_protected_eigh=use_protected_eigh,
    )
    precision = PrecisionConfig(
        **{
            f: torch.float64
            for f in (
                "computation_dtype",
                "factor_matrix_dtype",
                "inv_factor_matrix_dtype",
                "filtered_grad_dtype",
                "momentum_dtype",
                "grafting_state_dtype",
            )
        }
    )
    optimizer = DistributedShampoo([p], precision_config=precision, **kwargs)
    grads = [
        torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)),
        torch.tensor([[5.0, 1.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 0.01]], dtype=torch.float64),
    ]
    # The oracle confirms the second root really fails (else the test would prove nothing).
    oracle_param = torch.zeros(3, 3, dtype=torch.float64)
    oracle = O.OracleShampoo(
        [oracle_param],
        use_protected_eigh=False,
        root_inv_config=O.CoupledHigherOrderConfig(max_iterations=1),
        **{k: v for k, v in kwargs.items() if k not in ("root_inv_config", "use_protected_eigh")},
    )
    oracle.step([grads[0]])
    with pytest.raises(ArithmeticError):
        oracle.step([grads[1]])
    return p, optimizer, grads


def test_protected_eigh_keeps_previous_inverse_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    p, optimizer, grads = _failing_root_setup(use_protected_eigh=True)
    p.grad = grads[0].clone()
    optimizer.step()
    shampoo = optimizer.state[p]["block_0"]["shampoo"]
    previous = [shampoo["inv_factor_matrices"][k]["quantized_values"].clone() for k in range(2)]
    # The diagonal path gave diag((d + eps)^(-1/4)) with d = (1, 4, 9).
    expected = torch.diag((torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64) + 1e-6) ** -0.25)
    torch.testing.assert_close(O.unpacked(previous[0]), expected, rtol=1e-12, atol=0)
    p.grad = grads[1].clone()
    with caplog.at_level(logging.WARNING):
        optimizer.step()  # does not raise
    for k in range(2):
        assert_bitwise_equal(
            shampoo["inv_factor_matrices"][k]["quantized_values"], previous[k], f"inverse {k}"
        )
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert re.search(r"(?i)0\.block_0\.0.*previous|previous.*0\.block_0\.0", warnings), warnings
    assert int(optimizer.state[p]["step"]) == 2


def test_unprotected_root_failure_propagates_and_changes_nothing() -> None:
    p, optimizer, grads = _failing_root_setup(use_protected_eigh=False)
    p.grad = grads[0].clone()
    optimizer.step()
    before = _snapshot([p], optimizer)
    p.grad = grads[1].clone()
    with pytest.raises((ArithmeticError, ValueError, RuntimeError)):
        optimizer.step()
    assert_bitwise_equal(_snapshot([p], optimizer), before, "after failed step")


# --------------------------------------------------------------------------------------------
# SPEC A.3.1: p.grad is never mutated; aliasing never corrupts the filtered gradient.
# --------------------------------------------------------------------------------------------

ALIASING_CONFIGS = {
    # beta1 = 0, SGD grafting in the grafting phase: the reference's P aliased p.grad.
    "beta1_0_sgd_grafting_phase": dict(
        betas=(0.0, 1.0),
        grafting_config=SGDGraftingConfig(),
        start_preconditioning_step=100,
        momentum=0.0,
        weight_decay=0.0,
    ),
    # L2 weight decay was added into p.grad in place.
    "l2_weight_decay": dict(
        betas=(0.0, 1.0), weight_decay=0.1, use_decoupled_weight_decay=False, grafting_config=None
    ),
    # 0-d block without merging (identity preconditioner), beta1 = 0, decoupled decay, momentum.
    "order0_block": dict(
        betas=(0.0, 1.0), use_merge_dims=False, weight_decay=0.1, momentum=0.9, use_nesterov=True
    ),
    # Shampoo phase with SGD grafting and L2.
    "shampoo_phase_l2_sgd": dict(
        betas=(0.0, 0.9),
        weight_decay=0.2,
        use_decoupled_weight_decay=False,
        grafting_config=SGDGraftingConfig(),
    ),
}


@pytest.mark.parametrize("kwargs", ALIASING_CONFIGS.values(), ids=ALIASING_CONFIGS.keys())
def test_grad_is_never_mutated(kwargs: dict[str, Any]) -> None:
    params, optimizer = _make(**kwargs)
    for seed in range(1, 4):
        _set_grads(params, seed)
        grads = [p.grad.clone() for p in params]
        grad_objects = [p.grad for p in params]
        optimizer.step()
        for i, (p, g, obj) in enumerate(zip(params, grads, grad_objects)):
            assert p.grad is obj, f"param {i}: grad replaced"
            assert torch.equal(p.grad, g), f"step {seed} param {i}: p.grad was written"


def test_filtered_grad_not_corrupted_by_aliasing() -> None:
    """SPEC §4.13 second case: beta1 > 0, beta3 == beta1, no bias correction, filtered grad
    stored in the computation dtype, SGD grafting phase, plus a 0-d block: the filtered-gradient
    state must stay the EMA of the gradients, F_t = beta1 F_{t-1} + (1 - beta1) G_t."""
    beta1 = 0.75
    params, optimizer = _make(
        shapes=((3, 2), ()),
        betas=(beta1, 1.0),
        beta3=-1.0,
        use_bias_correction=False,
        grafting_config=SGDGraftingConfig(),
        start_preconditioning_step=100,
        momentum=0.5,
        weight_decay=0.0,
        use_merge_dims=False,
    )
    ema = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for seed in range(1, 5):
        _set_grads(params, seed)
        for i, p in enumerate(params):
            ema[i] = beta1 * ema[i] + (1 - beta1) * p.grad.double()
        optimizer.step()
    for i, p in enumerate(params):
        stored = optimizer.state[p]["block_0"]["filtered_grad"]["quantized_values"]
        torch.testing.assert_close(stored.double(), ema[i], rtol=1e-6, atol=1e-7)


def test_float64_retry_is_committed_and_logged(monkeypatch, caplog):
    """SPEC B §5.3: when float32 eigh fails and the float64 retry succeeds, the root is used
    and a warning says so. LAPACK cannot be made to fail on demand here, so the kernel's
    per-factor status is forced to RETRIED_DOUBLE after a real computation."""
    import logging

    from distributed_shampoo import _backend

    def run(patched: bool):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2, bias=False)
        optimizer = DistributedShampoo(model.parameters(), lr=0.1, epsilon=1e-3)
        model.weight.grad = torch.randn(2, 3)
        if patched:
            real = _backend.root_inverse

            def retried(*args, **kwargs):
                real(*args, **kwargs)
                kwargs["status_out"][0] = _backend.ROOT_RETRIED_DOUBLE

            monkeypatch.setattr(_backend, "root_inverse", retried)
        with caplog.at_level(logging.WARNING):
            optimizer.step()
        monkeypatch.undo()
        return model.weight.detach().clone()

    plain = run(False)
    caplog.clear()
    retried = run(True)
    assert torch.equal(plain, retried)
    assert any("Retried in double precision" in r.getMessage() and "0.block_0.0" in r.getMessage()
               for r in caplog.records)
