"""SPEC B §12 shampoo_grafting_test: in the grafting-only phase (start_preconditioning_step far
away) Shampoo with AdaGrad / RMSprop / Adam / SGD grafting is exactly torch.optim's Adagrad,
RMSprop, Adam / AdamW and SGD (momentum, Nesterov) on the same model and data.

Two problems:
  * the reference's: a (10 -> 1 -> 1) bias-free linear model plus a learnable scalar and a dead
    layer (never used, so its grad stays None), weights filled with 1.0, MSE to a zero target,
    5 steps, float32.  Compared with torch.testing.assert_close's float32 defaults
    (rtol 1.3e-6, atol 1e-5), as the reference does: the two optimizers round differently
    (Shampoo uses a float32 lr and float32 bias corrections, torch uses doubles).
  * float64 parameters with random gradients and hyperparameters that are exact in float32
    (dyadic), so the float32 scalars of SPEC B §4.12 are exact and only the association
    order of the few elementwise operations differs: rtol 1e-12.  The same check is run on the
    oracle (tests/oracle.py), which anchors the oracle's first-order paths to torch.optim.
"""

import pathlib
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import oracle as O  # noqa: E402

from distributed_shampoo.distributed_shampoo import DistributedShampoo  # noqa: E402
from distributed_shampoo.shampoo_types import (
    AdaGradGraftingConfig,
    AdamGraftingConfig,
    PrecisionConfig,
    RMSpropGraftingConfig,
    SGDGraftingConfig,
)

NEVER = 1000  # start_preconditioning_step beyond the run: grafting only

F64_PRECISION = PrecisionConfig(
    computation_dtype=torch.float64,
    factor_matrix_dtype=torch.float64,
    inv_factor_matrix_dtype=torch.float64,
    filtered_grad_dtype=torch.float64,
    momentum_dtype=torch.float64,
    grafting_state_dtype=torch.float64,
)


class _ScalarLinearDeadModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scalar = nn.Parameter(torch.zeros(()))
        self.linear_layers = nn.Sequential(
            nn.Linear(10, 1, bias=False), nn.Linear(1, 1, bias=False)
        )
        self.dead_layers = nn.Sequential(nn.Linear(10, 10, bias=False))
        for layer in self.linear_layers:
            layer.weight.data.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_layers(x) + self.scalar


def _train(
    optim_factory: Callable[[Any], torch.optim.Optimizer],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)  # the dead layer's random init is the same in both runs
    model = _ScalarLinearDeadModel()
    data = torch.arange(10, dtype=torch.float)
    data /= torch.linalg.norm(data)
    target = torch.zeros(1)
    loss_fn = nn.MSELoss()
    optimizer = optim_factory(model.parameters())
    for _ in range(5):
        optimizer.zero_grad()
        objective = loss_fn(model(data), target)
        objective.backward()
        optimizer.step()
    assert model.dead_layers[0].weight.grad is None
    return [p.detach().clone() for p in model.parameters()], objective.detach()


# (id, baseline factory, shampoo kwargs) following SPEC B §12 / §4.8.
def _scenarios() -> list[tuple[str, Callable, dict[str, Any]]]:
    scenarios = []
    for wd in (0.0, 0.3):
        scenarios.append(
            (
                f"adagrad-wd{wd}",
                partial(torch.optim.Adagrad, lr=0.01, eps=1e-10, weight_decay=wd),
                dict(
                    lr=0.01,
                    betas=(0.0, 1.0),
                    epsilon=1e-10,
                    weight_decay=wd,
                    use_decoupled_weight_decay=False,
                    grafting_config=AdaGradGraftingConfig(epsilon=1e-10),
                ),
            )
        )
        scenarios.append(
            (
                f"rmsprop-wd{wd}",
                partial(torch.optim.RMSprop, lr=0.01, alpha=0.99, eps=1e-8, weight_decay=wd),
                dict(
                    lr=0.01,
                    betas=(0.0, 0.99),
                    epsilon=1e-8,
                    weight_decay=wd,
                    use_decoupled_weight_decay=False,
                    grafting_config=RMSpropGraftingConfig(beta2=0.99, epsilon=1e-8),
                ),
            )
        )
        scenarios.append(
            (
                f"adam-wd{wd}",
                partial(torch.optim.Adam, lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd),
                dict(
                    lr=0.001,
                    betas=(0.9, 0.999),
                    epsilon=1e-8,
                    weight_decay=wd,
                    use_decoupled_weight_decay=False,
                    grafting_config=AdamGraftingConfig(beta2=0.999, epsilon=1e-8),
                ),
            )
        )
        scenarios.append(
            (
                f"adamw-wd{wd}",
                partial(torch.optim.AdamW, lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd),
                dict(
                    lr=0.001,
                    betas=(0.9, 0.999),
                    epsilon=1e-8,
                    weight_decay=wd,
                    use_decoupled_weight_decay=True,
                    grafting_config=AdamGraftingConfig(beta2=0.999, epsilon=1e-8),
                ),
            )
        )
        for nesterov in (False, True):
            scenarios.append(
                (
                    f"sgd-momentum-nesterov{nesterov}-wd{wd}",
                    partial(
                        torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=wd
                    ),
                    dict(
                        lr=0.1,
                        betas=(0.0, 0.9),
                        epsilon=1e-10,
                        momentum=0.9,
                        use_nesterov=nesterov,
                        weight_decay=wd,
                        use_decoupled_weight_decay=False,
                        grafting_config=SGDGraftingConfig(),
                    ),
                )
            )
    return scenarios


SCENARIOS = _scenarios()


@pytest.mark.parametrize("name,baseline,shampoo_kwargs", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_grafting_phase_equals_torch_optimizer(
    name: str, baseline: Callable, shampoo_kwargs: dict[str, Any]
) -> None:
    expected_params, expected_loss = _train(baseline)
    shampoo = partial(
        DistributedShampoo,
        max_preconditioner_dim=10,
        precondition_frequency=1,
        start_preconditioning_step=NEVER,
        **shampoo_kwargs,
    )
    params, loss = _train(shampoo)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(params, expected_params)
    # The run must have moved the live parameters (else the comparison says nothing).
    assert not torch.equal(params[1], torch.ones(1, 10))


# ---------------------------------------------------------------------------------------------
# float64, random gradients, dyadic hyperparameters (exact in float32): near-bitwise agreement.
# ---------------------------------------------------------------------------------------------

LR = 2.0**-6
WD = 2.0**-3


def _exact_scenarios() -> list[tuple[str, Callable, dict[str, Any]]]:
    return [
        (
            "adagrad-l2",
            partial(torch.optim.Adagrad, lr=LR, eps=2.0**-20, weight_decay=WD),
            dict(
                lr=LR,
                betas=(0.0, 1.0),
                weight_decay=WD,
                use_decoupled_weight_decay=False,
                grafting_config=AdaGradGraftingConfig(epsilon=2.0**-20),
            ),
        ),
        (
            "rmsprop",
            partial(torch.optim.RMSprop, lr=LR, alpha=0.875, eps=2.0**-20),
            dict(
                lr=LR,
                betas=(0.0, 0.5),
                grafting_config=RMSpropGraftingConfig(beta2=0.875, epsilon=2.0**-20),
            ),
        ),
        (
            "adam-l2",
            partial(torch.optim.Adam, lr=LR, betas=(0.75, 0.9375), eps=2.0**-20, weight_decay=WD),
            dict(
                lr=LR,
                betas=(0.75, 0.5),
                weight_decay=WD,
                use_decoupled_weight_decay=False,
                grafting_config=AdamGraftingConfig(beta2=0.9375, epsilon=2.0**-20),
            ),
        ),
        (
            "adamw",
            partial(torch.optim.AdamW, lr=LR, betas=(0.75, 0.9375), eps=2.0**-20, weight_decay=WD),
            dict(
                lr=LR,
                betas=(0.75, 0.5),
                weight_decay=WD,
                use_decoupled_weight_decay=True,
                grafting_config=AdamGraftingConfig(beta2=0.9375, epsilon=2.0**-20),
            ),
        ),
        (
            "sgd-nesterov-l2",
            partial(torch.optim.SGD, lr=LR, momentum=0.875, nesterov=True, weight_decay=WD),
            dict(
                lr=LR,
                betas=(0.0, 1.0),
                momentum=0.875,
                use_nesterov=True,
                weight_decay=WD,
                use_decoupled_weight_decay=False,
                grafting_config=SGDGraftingConfig(),
            ),
        ),
        (
            "sgd-momentum",
            partial(torch.optim.SGD, lr=LR, momentum=0.875),
            dict(lr=LR, betas=(0.0, 1.0), momentum=0.875, grafting_config=SGDGraftingConfig()),
        ),
    ]


EXACT = _exact_scenarios()


@pytest.mark.parametrize("name,baseline,shampoo_kwargs", EXACT, ids=[s[0] for s in EXACT])
def test_grafting_phase_float64_exact(
    name: str, baseline: Callable, shampoo_kwargs: dict[str, Any]
) -> None:
    shapes = [(6, 5), (7,), (), (3, 2, 2)]
    generator = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    grads = [
        [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes] for _ in range(6)
    ]

    def run(factory: Callable) -> list[torch.Tensor]:
        params = [nn.Parameter(p.clone()) for p in init]
        optimizer = factory(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        return [p.detach() for p in params]

    expected = run(baseline)
    actual = run(
        partial(
            DistributedShampoo,
            max_preconditioner_dim=4,
            start_preconditioning_step=NEVER,
            precision_config=F64_PRECISION,
            **shampoo_kwargs,
        )
    )
    for a, e, p0 in zip(actual, expected, init):
        # Relative to the size of the total update, which is what the optimizer computed.
        scale = (e - p0).abs().max().item()
        assert (a - e).abs().max().item() <= 1e-12 * scale, (
            name,
            (a - e).abs().max().item(),
            scale,
        )


@pytest.mark.parametrize("name,baseline,shampoo_kwargs", EXACT, ids=[s[0] for s in EXACT])
def test_oracle_grafting_phase_float64_exact(
    name: str, baseline: Callable, shampoo_kwargs: dict[str, Any]
) -> None:
    """The oracle itself (tests/oracle.py) reproduces torch.optim in its grafting phase: this
    anchors the oracle's filtering, grafting, weight-decay and momentum code to torch.optim,
    independently of the product."""
    shapes = [(6, 5), (7,), (), (3, 2, 2)]
    generator = torch.Generator().manual_seed(6)
    init = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    grads = [
        [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes] for _ in range(6)
    ]
    expected = [nn.Parameter(p.clone()) for p in init]
    optimizer = baseline(expected)
    actual = [p.clone() for p in init]
    oracle = O.OracleShampoo(
        actual, max_preconditioner_dim=4, start_preconditioning_step=NEVER, **shampoo_kwargs
    )
    for step_grads in grads:
        for p, g in zip(expected, step_grads):
            p.grad = g.clone()
        optimizer.step()
        oracle.step(step_grads)
    for a, e, p0 in zip(actual, expected, init):
        scale = (e.detach() - p0).abs().max().item()
        assert (a - e.detach()).abs().max().item() <= 1e-12 * scale, name
