"""DistributedShampoo against the independent oracle (tests/oracle.py) over a configuration matrix.

Every case runs the product and the oracle side by side on the same parameters and the same
pre-drawn gradients for a few steps, and after every step compares the parameters and every
per-block state tensor (factor matrices, inverse factors, diagonal flags, grafting
accumulator, momentum, filtered gradient) and the step counter.

Tolerances (why these numbers):
  * float64 product vs float64 oracle: the two differ only in summation order and LAPACK
    driver.  Swapping the oracle's eigh for NumPy's moves results by <= 3e-13 (relative to the
    parameter scale) for epsilon >= 1e-6 and by <= 3e-10 for the default epsilon 1e-12, whose
    rank-deficient early factors amplify rounding by epsilon^(-1/2).  So rtol 1e-9 (1e-8 for
    epsilon 1e-12) leaves a margin of >= 30x while any formula error shows up at >= 1e-3.
  * float32 product vs float64 oracle: the oracle run in float32 differs from itself in
    float64 by <= 5e-6 over 5 steps at epsilon 1e-3 (rounding 6e-8 per op, amplified by the
    conditioning of the factors and accumulated over steps).  rtol 1e-4 gives a 20x margin.
    Small epsilon makes float32 factors numerically singular (errors of 1e-1), so float32
    cases use epsilon 1e-3.
  * Inverse factors: early factors are rank-deficient, and the null-space eigenvalues
    (epsilon + rounding noise of ~1e-16 resp. 6e-8 times the largest eigenvalue) enter the
    inverse root as epsilon^(-1/r); measured LAPACK variation is <= 2e-9 (float64, epsilon
    1e-6) and <= 1.3e-6 (float32, epsilon 1e-3) of the inverse factor's scale, so they are
    compared to 1e-7 resp. 1e-3.
  * bfloat16 / float16 parameters: the update is computed in float32 and rounded to the
    parameter dtype each step; a rounding boundary can flip one unit in the last place, so
    parameters are compared to two units (2^-7 resp. 2^-10 relative).
"""

import pathlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import oracle as O

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.matrix_functions_types import (
    CoupledHigherOrderConfig,
    CoupledNewtonConfig,
    EigenConfig,
)
from distributed_shampoo.shampoo_types import (
    AdaGradGraftingConfig,
    AdamGraftingConfig,
    PrecisionConfig,
    RMSpropGraftingConfig,
    SGDGraftingConfig,
)

F64_PRECISION = PrecisionConfig(
    computation_dtype=torch.float64,
    factor_matrix_dtype=torch.float64,
    inv_factor_matrix_dtype=torch.float64,
    filtered_grad_dtype=torch.float64,
    momentum_dtype=torch.float64,
    grafting_state_dtype=torch.float64,
)

# Shapes chosen so that with max_preconditioner_dim=4 we get: a matrix split into edge blocks
# (4,4),(4,1),(2,4),(2,1); a vector split into (4,),(3,); a 0-d parameter (merged to (1,), a
# 1x1 factor, or kept 0-d without merging); a conv-like 4-d tensor merged to (3,4,2).
SHAPES = ((6, 5), (7,), (), (3, 2, 2, 2))

DTYPES = {
    "f64": torch.float64,
    "f32": torch.float32,
    "bf16": torch.bfloat16,
    "f16": torch.float16,
}


@dataclass
class Case:
    id: str
    kwargs: dict[str, Any]
    dtype: str = "f64"
    shapes: Sequence[Sequence[int]] = SHAPES
    steps: int = 5
    # Param-group layout: list of (indices into shapes, per-group overrides); None = one group.
    groups: list[Any] | None = None
    # step (1-based) -> indices of parameters whose grad is None in that step.
    none_grads: dict[int, set[int]] = field(default_factory=dict)
    # Gradient generator: "randn", or "diagonal_then_dense" for the (3, 3) shape.
    grad_kind: str = "randn"
    rtol: float | None = None
    # Tolerance for inverse factors (see module docstring); None = by dtype.
    inv_rtol: float | None = None
    # Per-parameter dtypes overriding `dtype` for the parameters (and their gradients).
    param_dtypes: list[torch.dtype] | None = None
    # Arguments given to the product only (the oracle computes in float64 anyway).
    product_only: dict[str, Any] = field(default_factory=dict)


BASE = dict(lr=0.45, max_preconditioner_dim=4)  # lr not exact in float32: fl32(lr) matters
F32_BASE = dict(BASE, epsilon=1e-3)
F64_BASE = dict(BASE, epsilon=1e-6)

CASES = [
    # --- defaults (betas (0.9, 1.0), no grafting, eigen), float64 and float32 ---
    # epsilon 1e-12: null-space eigenvalues of the early rank-deficient factors are 1e-12 plus
    # rounding noise of ~1e-14, so inverse factors agree only to ~1e-2 there (module docstring).
    Case("default_eps1e-12_f64", dict(BASE), rtol=1e-8, inv_rtol=5e-2),
    Case("default_f64", dict(F64_BASE)),
    Case("default_f32", dict(F32_BASE), dtype="f32"),
    # --- grafting types ---
    Case("graft_sgd_f64", dict(F64_BASE, grafting_config=SGDGraftingConfig())),
    Case("graft_adagrad_f64", dict(F64_BASE, grafting_config=AdaGradGraftingConfig(epsilon=1e-8))),
    Case(
        "graft_rmsprop_f64",
        dict(F64_BASE, grafting_config=RMSpropGraftingConfig(beta2=0.9, epsilon=1e-6)),
    ),
    Case(
        "graft_adam_f64",
        dict(F64_BASE, grafting_config=AdamGraftingConfig(beta2=0.95, epsilon=1e-7)),
    ),
    Case("graft_sgd_f32", dict(F32_BASE, grafting_config=SGDGraftingConfig()), dtype="f32"),
    Case("graft_adagrad_f32", dict(F32_BASE, grafting_config=AdaGradGraftingConfig()), dtype="f32"),
    Case("graft_rmsprop_f32", dict(F32_BASE, grafting_config=RMSpropGraftingConfig()), dtype="f32"),
    Case("graft_adam_f32", dict(F32_BASE, grafting_config=AdamGraftingConfig()), dtype="f32"),
    # --- root inverse methods ---
    Case(
        "eigen_no_psd_f64",
        dict(F64_BASE, root_inv_config=EigenConfig(make_positive_semidefinite=False)),
    ),
    Case("newton_f64", dict(F64_BASE, root_inv_config=CoupledNewtonConfig())),
    Case("higher_order_f64", dict(F64_BASE, root_inv_config=CoupledHigherOrderConfig())),
    Case(
        "higher_order4_releps_f64",
        dict(F64_BASE, root_inv_config=CoupledHigherOrderConfig(order=4, rel_epsilon=1e-5)),
    ),
    # Converged iterations agree whatever their details; a fixed, small iteration count (tolerance
    # 0) makes the result depend on every detail of §5.4/§5.5 (it is smooth in the data, so
    # rounding differences stay ~1e-15: the float32 oracle moves it by 3e-7 only).
    Case(
        "newton_3_iterations_f64",
        dict(F64_BASE, root_inv_config=CoupledNewtonConfig(max_iterations=3, tolerance=0.0)),
    ),
    Case(
        "higher_order4_3_iterations_f64",
        dict(
            F64_BASE,
            root_inv_config=CoupledHigherOrderConfig(order=4, max_iterations=3, tolerance=0.0),
        ),
    ),
    Case("newton_f32", dict(F32_BASE, root_inv_config=CoupledNewtonConfig()), dtype="f32"),
    Case(
        "higher_order_f32", dict(F32_BASE, root_inv_config=CoupledHigherOrderConfig()), dtype="f32"
    ),
    # --- momentum / Nesterov / dampening ---
    Case("momentum_f64", dict(F64_BASE, momentum=0.5)),
    Case("momentum_dampening_f64", dict(F64_BASE, momentum=0.6, dampening=0.3)),
    Case("nesterov_dampening_f64", dict(F64_BASE, momentum=0.6, dampening=0.3, use_nesterov=True)),
    Case("nesterov_f32", dict(F32_BASE, momentum=0.5, use_nesterov=True), dtype="f32"),
    # --- weight decay ---
    Case("l2_f64", dict(F64_BASE, weight_decay=0.1, use_decoupled_weight_decay=False)),
    Case("decoupled_wd_f64", dict(F64_BASE, weight_decay=0.1, use_decoupled_weight_decay=True)),
    Case(
        "decoupled_wd_momentum_adam_f64",
        dict(F64_BASE, weight_decay=0.2, momentum=0.5, grafting_config=AdamGraftingConfig()),
    ),
    Case(
        "l2_graft_sgd_beta0_f32",
        dict(
            F32_BASE,
            betas=(0.0, 1.0),
            weight_decay=0.1,
            use_decoupled_weight_decay=False,
            grafting_config=SGDGraftingConfig(),
        ),
        dtype="f32",
    ),
    # --- first moment and bias corrections ---
    Case("beta3_ne_beta1_f64", dict(F64_BASE, betas=(0.9, 1.0), beta3=0.5)),
    Case("no_bias_correction_f64", dict(F64_BASE, betas=(0.8, 0.95), use_bias_correction=False)),
    Case("beta2_lt_1_f64", dict(F64_BASE, betas=(0.8, 0.95))),
    Case(
        "beta2_lt_1_beta3_adam_f64",
        dict(F64_BASE, betas=(0.7, 0.9), beta3=0.2, grafting_config=AdamGraftingConfig()),
    ),
    Case("beta1_zero_f64", dict(F64_BASE, betas=(0.0, 0.99))),
    # --- merging / blocking ---
    Case("no_merge_f64", dict(F64_BASE, use_merge_dims=False)),
    Case(
        "no_merge_f32",
        dict(F32_BASE, use_merge_dims=False, grafting_config=AdaGradGraftingConfig()),
        dtype="f32",
    ),
    Case("block3_f64", dict(F64_BASE, max_preconditioner_dim=3)),
    Case("no_blocking_merge_f64", dict(F64_BASE, max_preconditioner_dim=12)),
    Case("block1_f64", dict(F64_BASE, max_preconditioner_dim=1), shapes=((3, 2), (2,)), steps=3),
    # --- schedule ---
    Case(
        "frequency3_start4_adam_f64",
        dict(
            F64_BASE,
            precondition_frequency=3,
            start_preconditioning_step=4,
            grafting_config=AdamGraftingConfig(),
        ),
        steps=7,
    ),
    # Stale inverse roots (frequency 2) meet new gradients outside the factor's range, which the
    # null-space eigenvalue epsilon^(-1/4) amplifies: LAPACK variation measured 2.3e-10.
    Case(
        "frequency2_start2_no_graft_f64",
        dict(F64_BASE, precondition_frequency=2),
        steps=5,
        rtol=1e-8,
    ),
    Case(
        "frequency2_start5_no_graft_decoupled_f64",
        dict(F64_BASE, precondition_frequency=2, start_preconditioning_step=5, weight_decay=0.1),
        steps=7,
    ),
    # --- roots ---
    Case("inv_root_override_int_f64", dict(F64_BASE, inv_root_override=2)),
    Case(
        "inv_root_override_list_f64",
        dict(F64_BASE, inv_root_override=[0, 3, 0, 2], use_merge_dims=False),
    ),
    Case("exponent_multiplier_f64", dict(F64_BASE, exponent_multiplier=0.82)),
    Case(
        "exponent_multiplier_override_f32",
        dict(F32_BASE, exponent_multiplier=1.5, inv_root_override=[1, 4, 6]),
        dtype="f32",
    ),
    # --- diagonal factors (flags flip when the gradient stops being diagonal) ---
    Case(
        "diagonal_then_dense_f64",
        dict(F64_BASE, max_preconditioner_dim=4),
        shapes=((3, 3),),
        grad_kind="diagonal_then_dense",
        steps=4,
    ),
    Case(
        "diagonal_then_dense_newton_f64",
        dict(F64_BASE, root_inv_config=CoupledNewtonConfig()),
        shapes=((3, 3),),
        grad_kind="diagonal_then_dense",
        steps=4,
    ),
    # --- missing gradients ---
    Case(
        "none_grads_f64",
        dict(F64_BASE, momentum=0.5, grafting_config=AdaGradGraftingConfig()),
        none_grads={2: {0}, 3: {1, 3}, 4: {0, 1, 2, 3}},
    ),
    # --- param groups with different hyperparameters ---
    Case(
        "param_groups_f64",
        dict(F64_BASE),
        groups=[
            (
                [0, 1],
                dict(lr=0.3, betas=(0.9, 0.95), momentum=0.5, grafting_config=AdamGraftingConfig()),
            ),
            (
                [2, 3],
                dict(
                    lr=0.1,
                    betas=(0.5, 1.0),
                    beta3=-1.0,
                    max_preconditioner_dim=3,
                    use_merge_dims=False,
                    precondition_frequency=2,
                    start_preconditioning_step=-1,
                    weight_decay=0.05,
                    use_decoupled_weight_decay=False,
                    grafting_config=RMSpropGraftingConfig(beta2=0.9),
                    root_inv_config=CoupledNewtonConfig(),
                ),
            ),
        ],
    ),
    Case(
        "param_groups_one_group_without_grads_f64",
        dict(F64_BASE, grafting_config=SGDGraftingConfig()),
        groups=[([0, 1], dict(lr=0.2)), ([2, 3], dict(lr=0.4, momentum=0.3))],
        none_grads={2: {2, 3}, 3: {2, 3}, 4: {0}},
    ),
    # --- deprecated preconditioner_dtype=float64 (SPEC A.3.4): float64 factors and roots ---
    Case(
        "preconditioner_dtype_f64",
        dict(F32_BASE, grafting_config=AdaGradGraftingConfig()),
        dtype="f32",
        product_only=dict(preconditioner_dtype=torch.float64),
    ),
    # --- SPEC A.3.5: float64 computation, parameters of mixed dtypes; the first block is
    # float64 (no cast needed), later float32 blocks must still be cast per block.  Both sides
    # round the float32 parameters identically, so float64 tolerances apply. ---
    Case(
        "mixed_param_dtypes_f64_computation",
        dict(F64_BASE, grafting_config=AdamGraftingConfig(), momentum=0.5),
        param_dtypes=[torch.float64, torch.float32, torch.float32, torch.float64],
    ),
    # --- low-precision parameters (computation in float32) ---
    Case(
        "bf16_params",
        dict(F32_BASE, grafting_config=AdamGraftingConfig(), momentum=0.5),
        dtype="bf16",
    ),
    Case("f16_params", dict(F32_BASE, weight_decay=0.01), dtype="f16"),
]


# --------------------------------------------------------------------------------------------
# Harness.
# --------------------------------------------------------------------------------------------


def _dtypes(case: Case, dtype: torch.dtype) -> list[torch.dtype]:
    return list(case.param_dtypes) if case.param_dtypes is not None else [dtype] * len(case.shapes)


def draw_gradients(case: Case, dtype: torch.dtype) -> list[list[torch.Tensor | None]]:
    generator = torch.Generator().manual_seed(1234)
    steps = []
    for t in range(1, case.steps + 1):
        grads: list[torch.Tensor | None] = []
        for i, (shape, param_dtype) in enumerate(zip(case.shapes, _dtypes(case, dtype))):
            g = torch.randn(shape, generator=generator, dtype=torch.float64)
            if case.grad_kind == "diagonal_then_dense" and t <= 2:
                g = torch.diag(torch.diagonal(g))  # diagonal factors for the first two steps
            grads.append(None if i in case.none_grads.get(t, set()) else g.to(param_dtype))
        steps.append(grads)
    return steps


def initial_params(case: Case, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    # Small initial values so that the comparison is dominated by the updates (lr ~ 0.5).
    return [
        (0.1 * torch.randn(s, generator=generator, dtype=torch.float64)).to(d)
        for s, d in zip(case.shapes, _dtypes(case, dtype))
    ]


def group_specs(case: Case, tensors: list[torch.Tensor]) -> list[Any]:
    if case.groups is None:
        return tensors
    return [
        dict(overrides, params=[tensors[i] for i in indices]) for indices, overrides in case.groups
    ]


def param_order(case: Case) -> list[int]:
    """Shape indices in the optimizer's flat (group-major) parameter order."""
    if case.groups is None:
        return list(range(len(case.shapes)))
    return [i for indices, _ in case.groups for i in indices]


def tolerance(case: Case) -> float:
    if case.rtol is not None:
        return case.rtol
    return {"f64": 1e-9, "f32": 1e-4, "bf16": 2 * 2.0**-8, "f16": 2 * 2.0**-11}[case.dtype]


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str
) -> None:
    """|actual - expected| <= rtol * max(1e-3, max|expected|), elementwise."""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    scale = max(1e-3, expected.abs().max().item()) if expected.numel() else 1.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= rtol * scale, f"{what}: max error {error:.3g} > {rtol:.1e} * scale {scale:.3g}"


def block_state(optimizer: DistributedShampoo, param: torch.Tensor) -> dict[str, Any]:
    return {k: v for k, v in optimizer.state[param].items() if k.startswith("block_")}


def compare_states(
    case: Case, optimizer, oracle: O.OracleShampoo, params, rtol: float, when: str
) -> None:
    order = param_order(case)
    for flat_index, param in enumerate(params):
        oracle_blocks = oracle.blocks_of(flat_index)
        product_blocks = block_state(optimizer, param)
        assert sorted(product_blocks) == sorted(b.key for b in oracle_blocks), (
            f"{when}: param {order[flat_index]} block keys {sorted(product_blocks)}"
        )
        for block in oracle_blocks:
            where = f"{when}: param {order[flat_index]} {block.key}"
            state = product_blocks[block.key]
            shampoo = state["shampoo"]
            assert len(shampoo["factor_matrices"]) == len(block.factor_matrices), where
            for k, expected in enumerate(block.factor_matrices):
                assert_close_scaled(
                    O.unpacked(shampoo["factor_matrices"][k]["quantized_values"]),
                    expected,
                    rtol,
                    f"{where} factor {k}",
                )
                inv_rtol = case.inv_rtol or (1e-7 if case.dtype == "f64" else 1e-3)
                assert_close_scaled(
                    O.unpacked(shampoo["inv_factor_matrices"][k]["quantized_values"]),
                    block.inv_factor_matrices[k],
                    inv_rtol,
                    f"{where} inverse factor {k}",
                )
                flag = shampoo["is_factor_matrices_diagonal"][k]
                assert bool(flag) == block.is_diagonal[k], (
                    f"{where} diagonal flag {k}: {bool(flag)}"
                )
            for name in ("adagrad", "momentum", "filtered_grad"):
                expected = getattr(block, name)
                if expected is None:
                    assert name not in state, f"{where}: unexpected state {name}"
                else:
                    assert_close_scaled(
                        state[name]["quantized_values"], expected, rtol, f"{where} {name}"
                    )


def step_counters(case: Case, optimizer, params) -> list[int]:
    """The product's step counter of every group (stored with the group's first parameter)."""
    counters = []
    for group in optimizer.param_groups:
        counters.append(int(optimizer.state[group["params"][0]]["step"]))
    return counters


def run_case(case: Case) -> None:
    dtype = DTYPES[case.dtype]
    init = initial_params(case, dtype)
    grads_per_step = draw_gradients(case, dtype)

    product_tensors = [torch.nn.Parameter(p.clone()) for p in init]
    oracle_tensors = [p.clone() for p in init]
    product_kwargs = dict(case.kwargs, **case.product_only)
    if case.dtype == "f64":
        product_kwargs["precision_config"] = F64_PRECISION
    optimizer = DistributedShampoo(group_specs(case, product_tensors), **product_kwargs)
    oracle = O.OracleShampoo(group_specs(case, oracle_tensors), dtype=torch.float64, **case.kwargs)

    order = param_order(case)
    product_params = [product_tensors[i] for i in order]
    oracle_params = [oracle_tensors[i] for i in order]
    rtol = tolerance(case)
    for t, grads in enumerate(grads_per_step, start=1):
        flat_grads = [grads[i] for i in order]
        for p, g in zip(product_params, flat_grads):
            p.grad = None if g is None else g.clone()
        optimizer.step()
        oracle.step(flat_grads)
        for i, (p, q) in zip(order, zip(product_params, oracle_params)):
            assert p.dtype == _dtypes(case, dtype)[i]
            if case.dtype in ("bf16", "f16"):
                torch.testing.assert_close(
                    p.detach().double(),
                    q.double(),
                    rtol=rtol,
                    atol=rtol * 0.1,
                    msg=f"step {t} param {i}: low-precision parameters differ",
                )
            else:
                assert_close_scaled(p, q, rtol, f"step {t} param {i}")
        assert step_counters(case, optimizer, product_params) == [
            oracle.step_count(g) for g in range(len(oracle.groups))
        ], f"step {t}: step counters"
        compare_states(case, optimizer, oracle, product_params, rtol, f"step {t}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_oracle(case: Case) -> None:
    run_case(case)


def test_preconditioner_dtype_float64_stores_float64_factors() -> None:
    """SPEC A.3.4: the deprecated preconditioner_dtype=float64 accumulates factors in float64."""
    p = torch.nn.Parameter(torch.zeros(3, 4))
    optimizer = DistributedShampoo(
        [p],
        preconditioner_dtype=torch.float64,
        max_preconditioner_dim=4,
        start_preconditioning_step=1,
    )
    p.grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    optimizer.step()
    factor = O.unpacked(optimizer.state[p]["block_0"]["shampoo"]["factor_matrices"][0]["quantized_values"])
    assert factor.dtype == torch.float64
    g = p.grad.double()
    torch.testing.assert_close(factor, g @ g.T, rtol=1e-12, atol=0)  # exact float64 accumulation


def test_step_closure() -> None:
    """SPEC B §1.8: step() returns None without a closure and the closure's value with one;
    the closure runs with gradients enabled."""
    p = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = DistributedShampoo([p], start_preconditioning_step=1)
    p.grad = torch.ones(2, 2)
    assert optimizer.step() is None

    def closure() -> float:
        assert torch.is_grad_enabled()
        p.grad = torch.ones(2, 2)
        return 1.5

    with torch.no_grad():
        assert optimizer.step(closure) == 1.5


def test_no_grafting_before_first_root_gives_zero_direction() -> None:
    """SPEC B §3/§4.8: inverse factors start at zero, so without grafting the Shampoo direction
    is exactly zero before the first inverse root (here steps 1-3 with start 4)."""
    p = torch.nn.Parameter(torch.ones(3, 4, dtype=torch.float64))
    optimizer = DistributedShampoo(
        [p],
        lr=0.5,
        precondition_frequency=2,
        start_preconditioning_step=4,
        precision_config=F64_PRECISION,
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        p.grad = torch.randn(3, 4, generator=generator, dtype=torch.float64)
        optimizer.step()
    assert torch.equal(p.detach(), torch.ones(3, 4, dtype=torch.float64))
    p.grad = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    optimizer.step()
    assert not torch.equal(p.detach(), torch.ones(3, 4, dtype=torch.float64))


def test_first_step_is_polar_factor() -> None:
    """An analytic check independent of the oracle: one Shampoo step on a square block with
    beta1 = 0 and tiny epsilon is  -lr * (G Gᵀ)^(-1/4) G (Gᵀ G)^(-1/4) = -lr * U Vᵀ  (SVD)."""
    generator = torch.Generator().manual_seed(3)
    G = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(5, 5, dtype=torch.float64))
    optimizer = DistributedShampoo(
        [p],
        lr=0.25,
        betas=(0.0, 1.0),
        epsilon=1e-14,
        max_preconditioner_dim=5,
        precision_config=F64_PRECISION,
    )
    p.grad = G.clone()
    optimizer.step()
    U, _, Vh = torch.linalg.svd(G)
    torch.testing.assert_close(p.detach(), -0.25 * (U @ Vh), rtol=0, atol=1e-9)


def test_vector_first_step_is_normalised_gradient() -> None:
    """A 1-D block: (g gᵀ + ε)^(-1/2) g = g / |g| for small ε (the rank-1 factor's null space
    gets ε^(-1/2) = 1e5, which rounding noise of 1e-16 in g's null-space part turns into 1e-11)."""
    g = torch.tensor([3.0, -4.0, 12.0], dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = DistributedShampoo(
        [p], lr=1.0, betas=(0.0, 1.0), epsilon=1e-10, precision_config=F64_PRECISION
    )
    p.grad = g.clone()
    optimizer.step()
    torch.testing.assert_close(p.detach(), -g / 13.0, rtol=0, atol=1e-9)


def test_zero_grad_factor_inverse_root_is_epsilon_power() -> None:
    """SPEC B §11.17: a factor that stays zero is diagonal and its inverse root is eps^(-1/4) I."""
    p = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    optimizer = DistributedShampoo(
        [p], lr=1.0, epsilon=1e-12, max_preconditioner_dim=4, precision_config=F64_PRECISION
    )
    p.grad = torch.zeros(3, 4, dtype=torch.float64)
    optimizer.step()
    shampoo = optimizer.state[p]["block_0"]["shampoo"]
    for k, d in enumerate((3, 4)):
        torch.testing.assert_close(
            O.unpacked(shampoo["inv_factor_matrices"][k]["quantized_values"]),
            1e3 * torch.eye(d, dtype=torch.float64),
            rtol=1e-12,
            atol=0,
        )
        assert bool(shampoo["is_factor_matrices_diagonal"][k])
    assert torch.equal(p.detach(), torch.zeros(3, 4, dtype=torch.float64))


def test_state_layout_shapes_and_dtypes() -> None:
    """SPEC B §2–§3: blocks of a (6,5) weight with max_preconditioner_dim=4 are (4,4),(4,1),(2,4),
    (2,1); each dim gets a d×d factor, stored packed (d(d+1)/2 entries, README "Memory"); storage
    dtypes follow PrecisionConfig."""
    p = torch.nn.Parameter(torch.zeros(6, 5))
    precision = PrecisionConfig(
        factor_matrix_dtype=torch.float64,
        inv_factor_matrix_dtype=torch.float32,
        filtered_grad_dtype=torch.float64,
        momentum_dtype=torch.float64,
        grafting_state_dtype=torch.float64,
    )
    optimizer = DistributedShampoo(
        [p],
        max_preconditioner_dim=4,
        momentum=0.5,
        grafting_config=AdaGradGraftingConfig(),
        precision_config=precision,
    )
    expected_shapes = O.block_shapes((6, 5), 4)
    assert expected_shapes == [(4, 4), (4, 1), (2, 4), (2, 1)]
    state = optimizer.state[p]
    assert sorted(k for k in state if k.startswith("block_")) == [f"block_{k}" for k in range(4)]
    assert (
        state["step"].dtype == torch.int64 and state["step"].dim() == 0 and int(state["step"]) == 0
    )
    for k, shape in enumerate(expected_shapes):
        block = state[f"block_{k}"]
        for d, n in enumerate(shape):
            factor = block["shampoo"]["factor_matrices"][d]["quantized_values"]
            inverse = block["shampoo"]["inv_factor_matrices"][d]["quantized_values"]
            assert factor.shape == (n * (n + 1) // 2,) and factor.dtype == torch.float64
            assert inverse.shape == (n * (n + 1) // 2,) and inverse.dtype == torch.float32
            assert not factor.any() and not inverse.any()  # zero-initialised, incl. inverses
            assert bool(block["shampoo"]["is_factor_matrices_diagonal"][d])
        for name in ("adagrad", "momentum", "filtered_grad"):
            tensor = block[name]["quantized_values"]
            assert tensor.shape == shape and tensor.dtype == torch.float64 and not tensor.any()


def test_merge_small_dims_and_split_match_oracle() -> None:
    """The public helpers agree with SPEC B §2 examples (and with the oracle)."""
    from distributed_shampoo.utils.shampoo_utils import merge_small_dims, multi_dim_split

    examples = [
        ((1, 2, 5, 1), 10),
        ((1, 2, 5, 1), 1),
        ((2,), 5),
        ((1, 1, 1, 1), 3),
        ((), 4),
        ((0,), 3),
        ((0, 1), 3),
        ((0, 1, 5, 10, 20), 10),
        ((64, 3, 3, 3), 1024),
        ((3, 2, 2, 2), 4),
        ((6, 5), 4),
    ]
    for shape, threshold in examples:
        assert tuple(merge_small_dims(shape, threshold)) == O.merge_small_dims(shape, threshold), (
            shape
        )
    x = torch.arange(15).reshape(5, 3)
    got = [b.tolist() for b in multi_dim_split(x, 2)]
    assert got == [x[s].tolist() for s in O.block_slices((5, 3), 2)]
    assert got == [[[0, 1], [3, 4]], [[2], [5]], [[6, 7], [9, 10]], [[8], [11]], [[12, 13]], [[14]]]
