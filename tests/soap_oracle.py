"""Plain-torch reference of eigenvalue-corrected Shampoo (SOAP, arXiv 2409.11321), written from
the paper and issue 14, blocked like Shampoo (tests/oracle.py's blocking helpers).

Per block with gradient G (order d, factors L_0..L_{d-1}, eigenbases Q_0..Q_{d-1}, second
moment D shaped like the block), at step t:
  1. L_k <- beta2 L_k + (1 - beta2) G_(k) G_(k)^T   (beta2 == 1: L_k + G_(k) G_(k)^T)
  2. on an amortized step (Shampoo's root schedule): Q_k <- eigenvectors of L_k, ascending
     eigenvalues (eigh; identity for a diagonal factor, ones for 1 x 1); or, with QR, from the
     previous Q_k: up to max_iterations steps of Q <- qr(L Q).Q until the relative change is
     <= tolerance, columns sorted by ascending Rayleigh quotient (eigh when Q_k is still zero);
  3. R(X) = X x_0 Q_0 ... x_{d-1} Q_{d-1} (the coordinates of X in the eigenbases, Q_k^T per
     mode), the identity while Q_0 is still zero (no eigenbasis yet);
     D <- beta2 D + (1 - beta2) R(G)^2   (beta2 == 1: D + R(G)^2);
  4. with G_hat the filtered gradient (as in Shampoo), the direction is
     R^T( R(G_hat) / (D / bc2 + epsilon)^(1/r) ), r = inv_root_override's root (default 2),
     bc2 = 1 - beta2^t with use_bias_correction and beta2 < 1, else 1;
  5. grafting (if configured; before start_preconditioning_step the grafting method alone),
     decoupled weight decay, momentum and the lr update exactly as for Shampoo.
It never imports distributed_shampoo: configs are recognised by class name (duck typing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tests.oracle import (
    _DEFAULTS,
    _grafting,
    bias_correction1,
    bias_correction2,
    block_slices,
    fl32,
    merge_small_dims,
)

_SOAP_DEFAULTS = {k: v for k, v in _DEFAULTS.items() if k != "root_inv_config"}
_SOAP_DEFAULTS["preconditioner_config"] = None


class OracleNonFinite(ValueError):
    """NaN/Inf in a factor matrix or an eigenbasis."""


def soap_root(inv_root_override: Any, order: int) -> int:
    """The root applied to the corrected eigenvalues: 2 unless overridden (per order for a list;
    0 means the default)."""
    if isinstance(inv_root_override, (list, tuple)):
        root = inv_root_override[order] if order < len(inv_root_override) else 0
    else:
        root = inv_root_override
    return int(root) if root != 0 else 2


def _amortized(config: Any) -> tuple[str, int, float]:
    inner = getattr(config, "amortized_computation_config", None)
    if inner is None or type(inner).__name__ == "EighEigenvectorConfig":
        return ("eigh", 0, 0.0)
    assert type(inner).__name__ == "QRConfig", inner
    return ("qr", int(inner.max_iterations), float(inner.tolerance))


def eigenbasis(F: torch.Tensor, previous: torch.Tensor, is_diagonal: bool, method: tuple[str, int, float]) -> torch.Tensor:
    n = F.shape[0]
    if n == 1:
        return torch.ones_like(F)
    if is_diagonal:
        return torch.eye(n, dtype=F.dtype)
    kind, max_iterations, tolerance = method
    if kind == "eigh" or not previous.any():
        return torch.linalg.eigh(F)[1]
    Q = previous
    iteration, error = 0, float("inf")
    while iteration < max_iterations and error > tolerance:
        last, Q = Q, torch.linalg.qr(F @ Q).Q
        iteration += 1
        error = float(torch.linalg.norm(last - Q) / torch.linalg.norm(last))
    rayleigh = torch.einsum("ij,ik,kj->j", Q, F, Q)
    return Q[:, torch.argsort(rayleigh, stable=True)]


def rotate(X: torch.Tensor, bases: Sequence[torch.Tensor], back: bool = False) -> torch.Tensor:
    """X's coordinates in the eigenbases (contract each mode with Q's first index), or back."""
    for Q in bases:
        X = torch.tensordot(X, Q.T if back else Q, dims=([0], [0]))
    return X


@dataclass
class SOAPBlock:
    param: torch.Tensor
    merged_shape: tuple[int, ...]
    slices: tuple[slice, ...]
    factors: list[torch.Tensor]
    bases: list[torch.Tensor]
    is_diagonal: list[bool]
    corrected: torch.Tensor
    adagrad: torch.Tensor | None
    momentum: torch.Tensor | None
    filtered_grad: torch.Tensor | None

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(self.merged_shape)[self.slices]


class OracleSOAP:
    """One param group of eigenvalue-corrected Shampoo, in `dtype` (float64 by default).
    `step(grads)` updates the parameters in place (in their own dtype)."""

    def __init__(self, params: Sequence[torch.Tensor], dtype: torch.dtype = torch.float64, **hyper: Any) -> None:
        # the staggered schedule (issue 13): {"param.block_b.k": phase}; None: all at once
        self.root_phases = hyper.pop("root_phases", None)
        unknown = set(hyper) - set(_SOAP_DEFAULTS)
        assert not unknown, f"oracle does not know {unknown}"
        self.dtype = dtype
        g = dict(_SOAP_DEFAULTS)
        g.update(hyper)
        if g["beta3"] == -1.0:
            g["beta3"] = g["betas"][0]
        if g["start_preconditioning_step"] == -1:
            g["start_preconditioning_step"] = g["precondition_frequency"]
        self.group = g
        self.grafting = _grafting(g["grafting_config"])
        self.method = _amortized(g["preconditioner_config"])
        self.params = list(params)
        self.blocks = [self._blocks(p) for p in self.params]
        self.labels = {id(b): f"{i}.block_{j}" for i, blocks in enumerate(self.blocks) for j, b in enumerate(blocks)}
        self.t = 0

    def _blocks(self, p: torch.Tensor) -> list[SOAPBlock]:
        g = self.group
        shape = tuple(p.shape)
        if g["use_merge_dims"]:
            shape = merge_small_dims(shape, g["max_preconditioner_dim"])
        out = []
        for slices in block_slices(shape, g["max_preconditioner_dim"]):
            dims = tuple(s.stop - s.start for s in slices)

            def z(*size: int) -> torch.Tensor:
                return torch.zeros(size, dtype=self.dtype)

            out.append(
                SOAPBlock(
                    p, shape, slices, [z(d, d) for d in dims], [z(d, d) for d in dims],
                    [True] * len(dims), z(*dims),
                    z(*dims) if self.grafting is not None and self.grafting.kind == "adagrad" else None,
                    z(*dims) if g["momentum"] != 0.0 else None,
                    z(*dims) if g["betas"][0] != 0.0 else None,
                )
            )
        return out

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor | None] | None = None) -> None:
        g = self.group
        grads = [p.grad for p in self.params] if grads is None else list(grads)
        active = [
            (b, b.view(grad).to(self.dtype).clone())
            for blocks, grad in zip(self.blocks, grads)
            if grad is not None
            for b in blocks
        ]
        if not active:
            return
        self.t += 1
        t = self.t
        lr = fl32(g["lr"])
        frequency, start = g["precondition_frequency"], g["start_preconditioning_step"]
        amortized = (t % frequency == 0 and t > start) or t == start
        phases = self.root_phases
        if phases is not None:
            amortized = t >= start
        grafting = self.grafting
        use_grafting_method = t < start and grafting is not None
        beta1, beta2 = g["betas"]
        beta3, wd = g["beta3"], g["weight_decay"]
        decoupled = g["use_decoupled_weight_decay"]

        def pblock(b: SOAPBlock) -> torch.Tensor:
            return b.view(b.param).to(self.dtype)

        if wd != 0.0 and not decoupled:
            active = [(b, G + wd * pblock(b)) for b, G in active]

        def ema(old: torch.Tensor, new: torch.Tensor, beta: float) -> torch.Tensor:
            return old + new if beta == 1.0 else beta * old + (1.0 - beta) * new

        for b, G in active:  # 1. factors
            for k in range(G.dim()):
                others = [d for d in range(G.dim()) if d != k]
                b.factors[k] = ema(b.factors[k], torch.tensordot(G, G, dims=(others, others)), beta2)
        bcg = 1.0
        if grafting is not None and grafting.kind == "adagrad":
            for b, G in active:
                b.adagrad = ema(b.adagrad, G * G, grafting.beta2)
            if grafting.bias_correction and grafting.beta2 < 1.0:
                bcg = bias_correction2(grafting.beta2, t)
        bc2 = bias_correction2(beta2, t) if g["use_bias_correction"] and beta2 < 1.0 else 1.0

        if amortized:  # 2. eigenbases
            for b, _ in active:
                for k, F in enumerate(b.factors):
                    if phases is not None and t != start and t % frequency != phases[f"{self.labels[id(b)]}.{k}"]:
                        continue  # not due at this step
                    if b.is_diagonal[k] and torch.any(F - torch.diag(torch.diagonal(F)) != 0):
                        b.is_diagonal[k] = False
                    if not torch.isfinite(F).all():
                        raise OracleNonFinite(f"non-finite factor matrix {k}")
                    Q = eigenbasis(F, b.bases[k], b.is_diagonal[k], self.method)
                    if not torch.isfinite(Q).all():
                        raise OracleNonFinite(f"non-finite eigenvectors of factor matrix {k}")
                    b.bases[k] = Q

        def bases(b: SOAPBlock) -> list[torch.Tensor]:
            return b.bases if b.bases and b.bases[0].any() else []

        for b, G in active:  # 3. second moment in the eigenbasis
            b.corrected = ema(b.corrected, rotate(G, bases(b)) ** 2, beta2)

        directions = []
        for b, G in active:  # 4.
            if beta1 == 0.0:
                G_hat = G
            else:
                G_hat = torch.lerp(b.filtered_grad, G, 1.0 - beta3)
                b.filtered_grad = torch.lerp(b.filtered_grad, G, 1.0 - beta1)
                if g["use_bias_correction"]:
                    G_hat = G_hat / bias_correction1(beta1, beta3, t)

            def graft(b: SOAPBlock = b, G_hat: torch.Tensor = G_hat) -> torch.Tensor:
                if grafting.kind == "sgd":
                    return G_hat
                return G_hat / (torch.sqrt(b.adagrad / bcg) + grafting.epsilon)

            if use_grafting_method:
                P = graft()
            else:
                root = soap_root(g["inv_root_override"], G.dim())
                scale = (b.corrected / bc2 + g["epsilon"]) ** (1.0 / root)
                P = rotate(rotate(G_hat, bases(b)) / scale, bases(b), back=True)
                if grafting is not None:
                    P = P * (torch.linalg.vector_norm(graft()) / (torch.linalg.vector_norm(P) + 1e-16))
            directions.append(P)

        if wd != 0.0 and decoupled:  # 5.
            directions = [P + wd * pblock(b) for (b, _), P in zip(active, directions)]
        momentum, dampening = g["momentum"], g["dampening"]
        if momentum != 0.0:
            out = []
            for (b, _), P in zip(active, directions):
                b.momentum = momentum * b.momentum + (1.0 - dampening) * P
                out.append((1.0 - dampening) * P + momentum * b.momentum if g["use_nesterov"] else b.momentum.clone())
            directions = out
        for (b, _), P in zip(active, directions):
            W = b.view(b.param)
            W.copy_((W.to(self.dtype) + (-lr) * P).to(W.dtype))
