"""Plain-torch reference of one Distributed Shampoo step, written from SPEC.md (B §2, §4, §5).

The oracle is deliberately slow and literal: per block, per dimension, in the order the SPEC
describes, with every intermediate a fresh torch tensor in one working dtype (float64 by
default, so it is the "exact" answer the product is compared against).  It never imports
`distributed_shampoo`; configs are recognised by class name and attributes (duck typing),
so the tests can hand the product's config objects to both.  The small config classes
below have the same names and fields, for using the oracle on its own.

Deviations of our product from the reference (SPEC A.3) that the oracle follows:
  * `inv_root_override` as a list is indexed by tensor order; an entry 0 means 2 * order;
  * `p.grad` is only read, never written;
  * gradients are cast to the working dtype per block.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

# --------------------------------------------------------------------------------------------
# Stand-ins for the product's config dataclasses (same names and fields, no validation).
# --------------------------------------------------------------------------------------------


@dataclass
class SGDGraftingConfig:
    pass


@dataclass
class AdaGradGraftingConfig:
    epsilon: float = 1e-10


@dataclass
class RMSpropGraftingConfig:
    beta2: float = 0.99
    epsilon: float = 1e-8


@dataclass
class AdamGraftingConfig:
    beta2: float = 0.999
    epsilon: float = 1e-8


@dataclass
class EigenConfig:
    make_positive_semidefinite: bool = True
    retry_double_precision: bool = True


@dataclass
class CoupledNewtonConfig:
    max_iterations: int = 100
    tolerance: float = 1e-6


@dataclass
class CoupledHigherOrderConfig:
    rel_epsilon: float = 0.0
    max_iterations: int = 100
    tolerance: float = 1e-8
    order: int = 3
    disable_tf32: bool = True


# --------------------------------------------------------------------------------------------
# Float32 scalars (SPEC B §4.12): lr, bc1, bc2, bcg are float32 values even in float64 math.
# They are computed with torch float32 tensors exactly as the reference writes them.
# --------------------------------------------------------------------------------------------


def unpacked(t: torch.Tensor) -> torch.Tensor:
    """A factor matrix or inverse root as the optimizer stores it, packed (README "Memory": the
    upper triangle by rows, d(d+1)/2 entries), as the full symmetric d x d matrix."""
    if t.dim() != 1:
        return t
    d = math.isqrt(8 * t.numel() + 1) // 2
    assert d * (d + 1) // 2 == t.numel(), t.shape
    out = torch.empty(d, d, dtype=t.dtype, device=t.device)
    for i in range(d):
        row = t[i * d - i * (i - 1) // 2 : (i + 1) * d - (i + 1) * i // 2]
        out[i, i:] = row
        out[i:, i] = row
    return out


def packed_index(d: int, i: int, j: int) -> int:
    """Where entry (i, j) (and (j, i)) of a d x d symmetric matrix is in its packed storage."""
    i, j = min(i, j), max(i, j)
    return i * d - i * (i - 1) // 2 + (j - i)


def fl32(x: float) -> float:
    """x rounded to IEEE float32, returned as a Python float."""
    return torch.tensor(x, dtype=torch.float32).item()


def bias_correction2(beta2: float, t: int) -> float:
    """fl32(1 - fl32(fl32(beta2) ** t)) (SPEC B §4.4 / §4.5); 1.0 for beta2 == 1."""
    if beta2 == 1.0:
        return 1.0
    step = torch.tensor(t, dtype=torch.int64)
    return (torch.tensor(1.0) - beta2**step).item()  # float ** int64 tensor -> float32


def bias_correction1(beta1: float, beta3: float, t: int) -> float:
    """fl32(1 - fl32(fl32(beta3) * fl32(fl32(beta1) ** (t - 1)))) (SPEC B §4.7)."""
    step = torch.tensor(t, dtype=torch.int64)
    return (1.0 - beta3 * beta1 ** (step - 1)).item()


# --------------------------------------------------------------------------------------------
# SPEC B §2: merging and blocking.
# --------------------------------------------------------------------------------------------


def merge_small_dims(shape: Sequence[int], threshold: int) -> tuple[int, ...]:
    """SPEC B §2.1: drop 1s (keep [1] if nothing is left), then merge greedily left to right."""
    dims = [d for d in shape if d != 1]
    if not dims:
        return (1,)
    merged = [dims[0]]
    for d in dims[1:]:
        if merged[-1] * d <= threshold:
            merged[-1] *= d
        else:
            merged.append(d)
    return tuple(merged)


def block_slices(shape: Sequence[int], split_size: int) -> list[tuple[slice, ...]]:
    """SPEC B §2.2: the index slices of every block, dim 0 outermost, edge blocks smaller.

    A 0-d shape gives one block, the whole (0-d) tensor.
    """
    per_dim = [
        [slice(start, min(start + split_size, n)) for start in range(0, n, split_size)]
        if n > 0
        else [slice(0, 0)]
        for n in shape
    ]
    return [tuple(s) for s in itertools.product(*per_dim)]


def block_shapes(shape: Sequence[int], split_size: int) -> list[tuple[int, ...]]:
    return [tuple(s.stop - s.start for s in slices) for slices in block_slices(shape, split_size)]


# --------------------------------------------------------------------------------------------
# SPEC B §5: matrix inverse roots.
# --------------------------------------------------------------------------------------------


class NonFiniteError(ValueError):
    """NaN/Inf met in a bias-corrected factor or in an inverse root (never protected)."""


def _config_kind(config: Any) -> str:
    return type(config).__name__ if config is not None else "EigenConfig"


def matrix_inverse_root(
    A: torch.Tensor,
    root: int,
    config: Any,
    epsilon: float,
    exponent_multiplier: float,
    is_diagonal: bool,
) -> torch.Tensor:
    """SPEC B §5.1 dispatch; returns X ≈ (A + epsilon I)^(-exponent_multiplier / root)."""
    if A.numel() == 1:
        # The 1x1 shortcut uses an exponent materialised as a float32 0-d tensor.
        alpha = torch.tensor(-exponent_multiplier / root, dtype=torch.float32)
        return (A + epsilon) ** alpha
    if is_diagonal:
        if root <= 0:
            raise ValueError(f"Root {root} should be positive!")
        alpha = -exponent_multiplier / root
        return torch.diag((torch.diagonal(A) + epsilon) ** alpha)
    kind = _config_kind(config)
    if kind == "EigenConfig":
        return _root_eigen(
            A,
            root,
            epsilon,
            exponent_multiplier,
            getattr(config, "make_positive_semidefinite", True),
        )
    if kind == "CoupledNewtonConfig":
        if exponent_multiplier != 1.0:
            raise ValueError("exponent multiplier must be 1 for coupled Newton")
        return _root_newton(A, root, epsilon, config.max_iterations, config.tolerance)
    if kind == "CoupledHigherOrderConfig":
        if exponent_multiplier != 1.0:
            raise ValueError("exponent multiplier must be 1 for the higher order method")
        return _root_higher_order(
            A,
            Fraction(root),
            abs_epsilon=epsilon,
            rel_epsilon=config.rel_epsilon,
            max_iterations=config.max_iterations,
            tolerance=config.tolerance,
            order=config.order,
        )
    raise NotImplementedError(f"unknown root inverse config {config!r}")


def _root_eigen(
    A: torch.Tensor, root: int, epsilon: float, exponent_multiplier: float, make_psd: bool
) -> torch.Tensor:
    """SPEC B §5.3: X = Q diag((λ - min(λ_min, 0) + ε)^α) Qᵀ."""
    if root <= 0:
        raise ValueError(f"Root {root} should be positive!")
    alpha = -exponent_multiplier / root
    lam, Q = torch.linalg.eigh(A)
    if make_psd:
        lam = lam - torch.clamp(lam.min(), max=0.0)
    lam = lam + epsilon
    return (Q * lam.pow(alpha).unsqueeze(0)) @ Q.T


def _max_abs_diff_from_identity(M: torch.Tensor) -> float:
    identity = torch.eye(M.shape[0], dtype=M.dtype)
    return torch.max(torch.abs(M - identity)).item()


def _root_newton(
    A: torch.Tensor, root: int, epsilon: float, max_iterations: int, tolerance: float
) -> torch.Tensor:
    """SPEC B §5.4, coupled inverse Newton iteration."""
    n = A.shape[0]
    identity = torch.eye(n, dtype=A.dtype)
    alpha = -1.0 / root
    A_ridge = A + epsilon * identity
    z = (root + 1) / (2 * torch.linalg.norm(A_ridge))  # Frobenius norm
    X = z ** (1.0 / root) * identity
    M = z * A_ridge
    error = _max_abs_diff_from_identity(M)
    iteration = 0
    while error > tolerance and iteration < max_iterations:
        iteration += 1
        M_p = alpha * M + (1 - alpha) * identity
        X = X @ M_p
        M = torch.linalg.matrix_power(M_p, root) @ M
        error = _max_abs_diff_from_identity(M)
    return X


def _root_higher_order(
    A: torch.Tensor,
    root: Fraction,
    abs_epsilon: float,
    rel_epsilon: float,
    max_iterations: int,
    tolerance: float,
    order: int,
) -> torch.Tensor:
    """SPEC B §5.5, coupled higher-order iteration for the root p/q."""
    p, q = root.numerator, root.denominator
    n = A.shape[0]
    identity = torch.eye(n, dtype=A.dtype)
    # Taylor coefficients of (1 - x)^(-1/p).
    coefficients = [1.0]
    for i in range(1, order):
        numerator = math.prod(1 + (j - 1) * p for j in range(1, i + 1))
        denominator = math.prod(j * p for j in range(1, i + 1))
        coefficients.append(numerator / denominator)
    b = [torch.tensor(c, dtype=A.dtype) for c in coefficients]
    s = -1.0 / p
    lambda_max = torch.linalg.matrix_norm(A, ord=math.inf)  # max absolute row sum
    if not torch.isfinite(lambda_max):
        raise ArithmeticError("Input matrix has entries close to inf, exiting root inverse")
    eps = max(rel_epsilon * lambda_max.item(), abs_epsilon)
    A_ridge = A + eps * identity
    z = 1.0 / torch.trace(A_ridge).item()
    X = z ** (1.0 / p) * identity
    M = z * A_ridge
    # One plain Newton step.
    M_p = s * M + (1 - s) * identity
    X = X @ M_p
    M = torch.linalg.matrix_power(M_p, p) @ M
    error = _max_abs_diff_from_identity(M)
    iteration = 1
    while error > tolerance and iteration < max_iterations:
        iteration += 1
        B = identity - M
        M_p = b[order - 1] * B + b[order - 2] * identity
        for i in range(order - 3, -1, -1):
            M_p = b[i] * identity + M_p @ B
        X = X @ M_p
        M = torch.linalg.matrix_power(M_p, p) @ M
        new_error = _max_abs_diff_from_identity(M)
        if new_error > 1.2 * error or (new_error == error and error < 1e-3):
            break  # early stop, keeping this last update
        error = new_error
    true_error = _max_abs_diff_from_identity(A_ridge @ torch.linalg.matrix_power(X, p))
    if true_error > 0.1:
        raise ArithmeticError(f"Error in matrix inverse root {true_error} exceeds threshold 1e-1")
    if q > 1:
        X = torch.linalg.matrix_power(X, q)
    if not torch.isfinite(X).all():
        raise ArithmeticError("NaN/Inf in matrix inverse root")
    return X


# --------------------------------------------------------------------------------------------
# The optimizer.
# --------------------------------------------------------------------------------------------

_DEFAULTS: dict[str, Any] = dict(
    lr=1e-2,
    betas=(0.9, 1.0),
    beta3=-1.0,
    epsilon=1e-12,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    max_preconditioner_dim=1024,
    precondition_frequency=1,
    start_preconditioning_step=-1,
    inv_root_override=0,
    exponent_multiplier=1.0,
    use_nesterov=False,
    use_bias_correction=True,
    use_decoupled_weight_decay=True,
    grafting_config=None,
    use_merge_dims=True,
    use_protected_eigh=True,
    root_inv_config=None,
    # Issue 13's staggered schedule: {factor label "param.block_key.k": phase} (None: every
    # root at every root step). A factor's root is computed at t == start and at the steps
    # t > start with t % precondition_frequency == its phase.
    root_phases=None,
)


@dataclass
class _Grafting:
    kind: str  # "sgd" | "adagrad" (AdaGrad, RMSprop and Adam share the accumulator)
    beta2: float = 1.0
    epsilon: float = 0.0
    bias_correction: bool = False


def _grafting(config: Any) -> _Grafting | None:
    if config is None:
        return None
    name = type(config).__name__
    if name == "SGDGraftingConfig":
        return _Grafting("sgd")
    if name == "AdaGradGraftingConfig":
        return _Grafting("adagrad", 1.0, config.epsilon, False)
    if name == "RMSpropGraftingConfig":
        return _Grafting("adagrad", config.beta2, config.epsilon, False)
    if name == "AdamGraftingConfig":
        return _Grafting("adagrad", config.beta2, config.epsilon, True)
    raise NotImplementedError(f"unknown grafting config {config!r}")


def root_for_order(inv_root_override: Any, order: int) -> int:
    """SPEC B §4.6.1 with A.3.2: list indexed by order; 0 (int or entry) means 2 * order."""
    if isinstance(inv_root_override, (list, tuple)):
        root = inv_root_override[order] if order < len(inv_root_override) else 0
    else:
        root = inv_root_override
    return root if root != 0 else 2 * order


@dataclass
class _Block:
    """One block of one parameter, with its state (all in the oracle's working dtype)."""

    param: torch.Tensor
    merged_shape: tuple[int, ...]
    slices: tuple[slice, ...]
    key: str
    factor_matrices: list[torch.Tensor]
    inv_factor_matrices: list[torch.Tensor]
    is_diagonal: list[bool]
    adagrad: torch.Tensor | None
    momentum: torch.Tensor | None
    filtered_grad: torch.Tensor | None

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The block's part of `tensor` (the parameter, or its gradient)."""
        return tensor.reshape(self.merged_shape)[self.slices]


class OracleShampoo:
    """Shampoo as SPEC B §4 describes it, in `dtype` (float64 unless told otherwise).

    `params`: tensors, or param-group dicts ({"params": [...], **overrides}) as for
    torch.optim.  The tensors are updated in place (in their own dtype) by `step()`.
    `step(grads)`: `grads` lists one gradient (or None) per parameter, in group order;
    without it, each parameter's `.grad` is read.
    """

    def __init__(
        self,
        params: Any,
        precision_config: Any = None,
        dtype: torch.dtype = torch.float64,
        **hyperparameters: Any,
    ) -> None:
        unknown = set(hyperparameters) - set(_DEFAULTS)
        assert not unknown, f"oracle does not know {unknown}"
        self.dtype = dtype
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = [{"params": params}]
        self.groups: list[dict[str, Any]] = []
        for group_spec in params:
            group = dict(_DEFAULTS)
            group.update(hyperparameters)
            group.update({k: v for k, v in group_spec.items() if k != "params"})
            group["params"] = list(group_spec["params"])
            self._resolve(group)
            group["blocks"] = [self._make_blocks(p, group) for p in group["params"]]
            group["step"] = 0
            self.groups.append(group)

    # ---------------------------------------------------------------- construction
    @staticmethod
    def _resolve(group: dict[str, Any]) -> None:
        beta1 = group["betas"][0]
        if group["beta3"] == -1.0:
            group["beta3"] = beta1
        if group["start_preconditioning_step"] == -1:
            group["start_preconditioning_step"] = group["precondition_frequency"]
        group["grafting"] = _grafting(group["grafting_config"])

    def _make_blocks(self, param: torch.Tensor, group: dict[str, Any]) -> list[_Block]:
        shape = tuple(param.shape)
        if group["use_merge_dims"]:
            shape = merge_small_dims(shape, group["max_preconditioner_dim"])
        grafting = group["grafting"]
        blocks = []
        for k, slices in enumerate(block_slices(shape, group["max_preconditioner_dim"])):
            block_shape = tuple(s.stop - s.start for s in slices)

            def zeros(*size: int) -> torch.Tensor:
                return torch.zeros(size, dtype=self.dtype)

            blocks.append(
                _Block(
                    param=param,
                    merged_shape=shape,
                    slices=slices,
                    key=f"block_{k}",
                    factor_matrices=[zeros(d, d) for d in block_shape],
                    # Inverse factors start as ZERO matrices (SPEC B §3).
                    inv_factor_matrices=[zeros(d, d) for d in block_shape],
                    is_diagonal=[True for _ in block_shape],
                    adagrad=(
                        zeros(*block_shape)
                        if grafting is not None and grafting.kind == "adagrad"
                        else None
                    ),
                    momentum=zeros(*block_shape) if group["momentum"] != 0.0 else None,
                    filtered_grad=zeros(*block_shape) if group["betas"][0] != 0.0 else None,
                )
            )
        return blocks

    # ---------------------------------------------------------------- accessors
    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.groups for p in g["params"]]

    def blocks_of(self, flat_param_index: int) -> list[_Block]:
        """The blocks (with their state) of the `flat_param_index`-th parameter."""
        return [blocks for g in self.groups for blocks in g["blocks"]][flat_param_index]

    def step_count(self, group_index: int = 0) -> int:
        return self.groups[group_index]["step"]

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor | None] | None = None) -> None:
        if grads is None:
            grads = [p.grad for p in self.params]
        grads = list(grads)
        assert len(grads) == len(self.params)
        offset = 0
        for group in self.groups:
            n = len(group["params"])
            self._group_step(group, grads[offset : offset + n])
            offset += n

    def _group_step(self, group: dict[str, Any], grads: list[torch.Tensor | None]) -> None:
        # §4.1: collect the active blocks and their gradient blocks, cast per block (A.3.5).
        active: list[tuple[int, _Block, torch.Tensor]] = []
        for param_index, (blocks, grad) in enumerate(zip(group["blocks"], grads)):
            if grad is None:
                continue
            for block in blocks:
                active.append((param_index, block, block.view(grad).to(self.dtype).clone()))
        if not active:
            return  # the step counter is not incremented (§4.1 rule 3, A.3.6)

        # §4.2: per-step scalars and flags.
        group["step"] += 1
        t = group["step"]
        lr = fl32(group["lr"])
        frequency = group["precondition_frequency"]
        start = group["start_preconditioning_step"]
        compute_root_inverse = (t % frequency == 0 and t > start) or t == start
        phases = group["root_phases"]
        if phases is not None:
            compute_root_inverse = t >= start
        grafting: _Grafting | None = group["grafting"]
        use_grafting_method = t < start and grafting is not None
        beta1, beta2 = group["betas"]
        beta3 = group["beta3"]
        weight_decay = group["weight_decay"]

        def param_block(block: _Block) -> torch.Tensor:
            return block.view(block.param).to(self.dtype)

        # §4.3: L2 regularisation (no lr factor).
        if weight_decay != 0.0 and not group["use_decoupled_weight_decay"]:
            active = [(i, b, g + weight_decay * param_block(b)) for i, b, g in active]

        # §4.4: factor matrices; one bc2 per group.
        bc2 = bias_correction2(beta2, t) if group["use_bias_correction"] and beta2 < 1.0 else 1.0
        for _, block, G in active:
            for k in range(G.dim()):
                others = [d for d in range(G.dim()) if d != k]
                C = torch.tensordot(G, G, dims=(others, others))
                if beta2 == 1.0:
                    block.factor_matrices[k] = block.factor_matrices[k] + C
                else:
                    block.factor_matrices[k] = beta2 * block.factor_matrices[k] + (1.0 - beta2) * C

        # §4.5: grafting accumulators.
        bcg = 1.0
        if grafting is not None and grafting.kind == "adagrad":
            for _, block, G in active:
                if grafting.beta2 == 1.0:
                    block.adagrad = block.adagrad + G * G
                else:
                    block.adagrad = grafting.beta2 * block.adagrad + (1.0 - grafting.beta2) * G * G
            if grafting.bias_correction and grafting.beta2 < 1.0:
                bcg = bias_correction2(grafting.beta2, t)

        # §4.6: inverse roots.
        if compute_root_inverse:
            for param_index, block, G in active:
                self._compute_inverse_roots(group, param_index, block, bc2, t)

        # §4.7: filtered gradient.
        filtered = []
        for _, block, G in active:
            if beta1 == 0.0:
                G_hat = G
            else:
                F_old = block.filtered_grad
                G_hat = torch.lerp(F_old, G, 1.0 - beta3)
                block.filtered_grad = torch.lerp(F_old, G, 1.0 - beta1)
                if group["use_bias_correction"]:
                    G_hat = G_hat / bias_correction1(beta1, beta3, t)
            filtered.append(G_hat)

        # §4.8: preconditioning and grafting.
        def graft(block: _Block, G_hat: torch.Tensor) -> torch.Tensor:
            if grafting.kind == "sgd":
                return G_hat
            return G_hat / (torch.sqrt(block.adagrad / bcg) + grafting.epsilon)

        directions = []
        for (_, block, _), G_hat in zip(active, filtered):
            if use_grafting_method:
                P = graft(block, G_hat)
            else:
                P = self._shampoo_precondition(block, G_hat)
                if grafting is not None:
                    grafting_norm = torch.linalg.vector_norm(graft(block, G_hat))
                    shampoo_norm = torch.linalg.vector_norm(P) + 1e-16
                    P = P * (grafting_norm / shampoo_norm)
            directions.append(P)

        # §4.9: decoupled weight decay (before momentum).
        if weight_decay != 0.0 and group["use_decoupled_weight_decay"]:
            directions = [
                P + weight_decay * param_block(block)
                for (_, block, _), P in zip(active, directions)
            ]

        # §4.10: momentum / Nesterov with dampening.
        momentum, dampening = group["momentum"], group["dampening"]
        if momentum != 0.0:
            new_directions = []
            for (_, block, _), P in zip(active, directions):
                block.momentum = momentum * block.momentum + (1.0 - dampening) * P
                if group["use_nesterov"]:
                    P = (1.0 - dampening) * P + momentum * block.momentum
                else:
                    P = block.momentum.clone()
                new_directions.append(P)
            directions = new_directions

        # §4.11: W <- W - fl32(lr) * P, rounded to the parameter's dtype.
        for (_, block, _), P in zip(active, directions):
            W = block.view(block.param)
            W.copy_((W.to(self.dtype) + (-lr) * P).to(W.dtype))

    def _compute_inverse_roots(
        self, group: dict[str, Any], param_index: int, block: _Block, bc2: float, t: int = 0
    ) -> None:
        """§4.6 for every dimension of one block (with root_phases: the due ones)."""
        order = len(block.factor_matrices)
        root = root_for_order(group["inv_root_override"], order)
        phases = group["root_phases"]
        for k, F in enumerate(block.factor_matrices):
            label = f"{param_index}.{block.key}.{k}"
            if (
                phases is not None
                and t != group["start_preconditioning_step"]
                and t % group["precondition_frequency"] != phases[label]
            ):
                continue
            # §4.6.2: diagonality is tracked on the uncorrected factor, once False forever.
            if block.is_diagonal[k]:
                off_diagonal = F - torch.diag(torch.diagonal(F))
                if torch.any(off_diagonal != 0):
                    block.is_diagonal[k] = False
            A = F / bc2
            if torch.isnan(A).any():
                raise NonFiniteError(
                    f"Encountered nan values in bias-corrected factor matrix {label}!"
                )
            if torch.isinf(A).any():
                raise NonFiniteError(
                    f"Encountered inf values in bias-corrected factor matrix {label}!"
                )
            try:
                X = matrix_inverse_root(
                    A,
                    root,
                    group["root_inv_config"],
                    group["epsilon"],
                    group["exponent_multiplier"],
                    block.is_diagonal[k],
                )
            except (ArithmeticError, ValueError, NotImplementedError, RuntimeError):
                if not group["use_protected_eigh"]:
                    raise
                continue  # §4.6.5: keep the previous inverse factor
            if not torch.isfinite(X).all():
                raise NonFiniteError(
                    f"Encountered nan or inf values in inverse factor matrix {label}!"
                )
            # stored packed (README "Memory"): its symmetric part
            X = X.to(self.dtype)
            block.inv_factor_matrices[k] = 0.5 * X + 0.5 * X.T

    @staticmethod
    def _shampoo_precondition(block: _Block, G_hat: torch.Tensor) -> torch.Tensor:
        """§4.8: contract dim 0 with the first index of Q_0, result index to the end; repeat."""
        P = G_hat
        for Q in block.inv_factor_matrices:
            P = torch.tensordot(P, Q, dims=([0], [0]))
        return P
