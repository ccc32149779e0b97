"""SPEC A.4 / DESIGN.md: factor accumulation, inverse roots, preconditioning, grafting norms and
the elementwise update run in csrc/, not in torch (or NumPy/SciPy) Python-level arithmetic.

During step() every torch linear-algebra / matmul entry point (and NumPy's and SciPy's) is
replaced by a function that raises; the step must still succeed and give exactly (bitwise) the
same parameters and states as an unpatched run of an identically built optimizer.
"""

from typing import Any

import numpy
import pytest
import scipy.linalg
import torch

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
)

# (module/class, attribute) pairs that must not be called during step().
LINALG_ENTRY_POINTS: list[tuple[Any, str]] = (
    [
        (torch.linalg, name)
        for name in (
            "eigh",
            "eigvalsh",
            "eig",
            "eigvals",
            "inv",
            "inv_ex",
            "pinv",
            "matrix_power",
            "solve",
            "solve_ex",
            "lstsq",
            "cholesky",
            "cholesky_ex",
            "svd",
            "svdvals",
            "qr",
            "lu",
            "lu_factor",
            "matmul",
            "multi_dot",
            "norm",
            "vector_norm",
            "matrix_norm",
            "vecdot",
            "matrix_exp",
            "det",
            "slogdet",
        )
    ]
    + [
        (torch, name)
        for name in (
            "matmul",
            "mm",
            "bmm",
            "mv",
            "dot",
            "vdot",
            "inner",
            "outer",
            "ger",
            "kron",
            "einsum",
            "tensordot",
            "addmm",
            "addbmm",
            "baddbmm",
            "addmv",
            "addr",
            "chain_matmul",
            "matrix_power",
            "inverse",
            "pinverse",
            "svd",
            "cholesky",
            "norm",
            "frobenius_norm",
            "nuclear_norm",
            "_foreach_norm",
            "symeig",
            "linalg_eigh",
        )
    ]
    + [
        (torch.Tensor, name)
        for name in (
            "__matmul__",
            "__rmatmul__",
            "__imatmul__",
            "matmul",
            "mm",
            "bmm",
            "mv",
            "dot",
            "inner",
            "outer",
            "norm",
            "matrix_power",
            "inverse",
            "addmm",
            "addmm_",
            "baddbmm",
            "baddbmm_",
        )
    ]
    + [
        (numpy.linalg, name)
        for name in ("eigh", "eig", "inv", "solve", "norm", "matrix_power", "svd", "pinv")
    ]
    + [(numpy, name) for name in ("dot", "matmul", "einsum", "tensordot", "inner", "outer", "vdot")]
    + [
        (scipy.linalg, name)
        for name in ("eigh", "eig", "inv", "solve", "norm", "fractional_matrix_power", "sqrtm")
    ]
)


def _forbidden(name: str):
    def raiser(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{name} was called during DistributedShampoo.step()")

    return raiser


def _patch_all(monkeypatch: pytest.MonkeyPatch) -> int:
    count = 0
    for owner, name in LINALG_ENTRY_POINTS:
        if hasattr(owner, name):
            monkeypatch.setattr(
                owner, name, _forbidden(f"{getattr(owner, '__name__', owner)}.{name}")
            )
            count += 1
    return count


def _self_check_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The patches really bite (else the test below would prove nothing)."""
    a = torch.eye(2)
    with monkeypatch.context() as m:
        _patch_all(m)
        for call in (
            lambda: a @ a,
            lambda: torch.linalg.eigh(a),
            lambda: torch.matmul(a, a),
            lambda: torch.linalg.vector_norm(a),
            lambda: torch.tensordot(a, a, 1),
        ):
            with pytest.raises(AssertionError, match="during DistributedShampoo.step"):
                call()
    assert torch.equal(a @ a, a)  # restored


F64 = PrecisionConfig(
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

CONFIGS: dict[str, dict[str, Any]] = {
    "eigen_adam_momentum_f32": dict(
        root_inv_config=EigenConfig(),
        grafting_config=AdamGraftingConfig(),
        momentum=0.5,
        use_nesterov=True,
        weight_decay=0.01,
    ),
    "newton_adagrad_l2_f32": dict(
        root_inv_config=CoupledNewtonConfig(),
        grafting_config=AdaGradGraftingConfig(),
        momentum=0.3,
        dampening=0.1,
        weight_decay=0.02,
        use_decoupled_weight_decay=False,
    ),
    "higher_order_rmsprop_f64": dict(
        root_inv_config=CoupledHigherOrderConfig(),
        precision_config=F64,
        grafting_config=RMSpropGraftingConfig(),
        betas=(0.9, 0.95),
        beta3=0.5,
        exponent_multiplier=1.0,
        momentum=0.5,
    ),
    "eigen_multiplier_override_f64": dict(
        precision_config=F64,
        exponent_multiplier=0.7,
        inv_root_override=[0, 3, 5],
        grafting_config=AdamGraftingConfig(),
        precondition_frequency=2,
        start_preconditioning_step=2,
    ),
}


def _build(kwargs: dict[str, Any]):
    dtype = kwargs.get("precision_config", PrecisionConfig()).computation_dtype
    generator = torch.Generator().manual_seed(11)
    shapes = [(6, 5), (7,), (), (3, 2, 2, 2)]
    params = [
        torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64).to(dtype))
        for s in shapes
    ]
    optimizer = DistributedShampoo(params, lr=0.1, max_preconditioner_dim=4, epsilon=1e-4, **kwargs)
    return params, optimizer


def _state_tensors(optimizer, params) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            out.append(x.detach().clone())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                visit(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    for p in params:
        visit(optimizer.state[p])
    return out


@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=CONFIGS.keys())
def test_step_does_not_use_torch_or_numpy_linear_algebra(
    kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _self_check_patches(monkeypatch)
    params_ref, optimizer_ref = _build(kwargs)
    params, optimizer = _build(kwargs)
    for step in range(1, 5):
        generator = torch.Generator().manual_seed(100 + step)
        grads = [
            torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
            for p in params
        ]
        for p, q, g in zip(params, params_ref, grads):
            p.grad = g.clone()
            q.grad = g.clone()
        optimizer_ref.step()
        with monkeypatch.context() as m:
            assert _patch_all(m) > 60
            optimizer.step()
        for i, (p, q) in enumerate(zip(params, params_ref)):
            assert torch.equal(p, q), f"step {step} param {i} differs from the unpatched run"
        for i, (a, b) in enumerate(
            zip(_state_tensors(optimizer, params), _state_tensors(optimizer_ref, params_ref))
        ):
            assert torch.equal(a, b), f"step {step} state tensor {i} differs from the unpatched run"
    # The run did precondition (the inverse factors are no longer zero).
    inverse = optimizer.state[params[0]]["block_0"]["shampoo"]["inv_factor_matrices"][0][
        "quantized_values"
    ]
    assert inverse.abs().sum() > 0


ELEMENTWISE = [
    (torch, name)
    for name in (
        "_foreach_add",
        "_foreach_mul",
        "_foreach_mul_",
        "_foreach_div",
        "_foreach_div_",
        "_foreach_lerp",
        "_foreach_lerp_",
        "_foreach_sqrt",
        "_foreach_sqrt_",
        "_foreach_addcmul_",
        "_foreach_addcdiv_",
        "_foreach_sub_",
        "lerp",
        "addcmul",
        "addcdiv",
    )
] + [
    (torch.Tensor, name) for name in ("lerp_", "addcmul_", "addcdiv_", "lerp", "addcmul", "addcdiv")
]


def test_elementwise_update_is_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC A.4: the fused elementwise update (filtering, grafting, decay, momentum, the
    parameter update) runs in csrc/: torch's foreach / lerp / addc* arithmetic kernels are not
    used.  Allowed: plain copies (_foreach_copy_, data movement) and the distributor's final
    W <- W + (-lr P) (_foreach_add_ of the finished direction into the parameters, SPEC B §4.11,
    which casts to each parameter's dtype)."""
    kwargs = CONFIGS["eigen_adam_momentum_f32"]
    params_ref, optimizer_ref = _build(kwargs)
    params, optimizer = _build(kwargs)
    for step in range(1, 4):
        generator = torch.Generator().manual_seed(200 + step)
        for p, q in zip(params, params_ref):
            g = torch.randn(p.shape, generator=generator)
            p.grad, q.grad = g.clone(), g.clone()
        optimizer_ref.step()
        with monkeypatch.context() as m:
            for owner, name in ELEMENTWISE:
                if hasattr(owner, name):
                    m.setattr(owner, name, _forbidden(f"{name}"))
            optimizer.step()
        for p, q in zip(params, params_ref):
            assert torch.equal(p, q)
