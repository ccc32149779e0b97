"""Checkpoints written before issue 11 (full d x d factor matrices and inverse roots) still
load, in both the standard and the DCP form, with exactly the saved values, and resume: the
files under tests/data/legacy_checkpoint/ were made by that code
(tests/data/make_legacy_checkpoint.py), with the values it computed four steps after the
checkpoint."""

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import AdamGraftingConfig
from distributed_shampoo.utils.shampoo_dcp import ShampooLoadPlanner

DATA = Path(__file__).resolve().parent / "data" / "legacy_checkpoint"
# several block shapes (max_preconditioner_dim 4 cuts 6- and 8-wide tensors), momentum,
# Adam grafting, weight decay; roots every second step
KWARGS: dict[str, Any] = dict(
    lr=0.05, betas=(0.9, 0.99), epsilon=1e-4, momentum=0.5, weight_decay=0.01,
    max_preconditioner_dim=4, precondition_frequency=2, start_preconditioning_step=2,
    grafting_config=AdamGraftingConfig(beta2=0.99),
)


def make(**overrides: Any) -> tuple[nn.Module, DistributedShampoo]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(3, 6), nn.Linear(6, 5))
    return model, DistributedShampoo(model.parameters(), **{**KWARGS, **overrides})


def train(model: nn.Module, optimizer: DistributedShampoo, steps: range) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


def symmetric_key(key: Any) -> bool:
    return isinstance(key, str) and ('"factor_matrices"' in key or '"inv_factor_matrices"' in key)


def full(value: Any, symmetric: bool = False) -> Any:
    """Factor matrices and inverse roots in one canonical form, the full symmetric d x d
    matrix: this version stores them packed (upper triangle by rows, n(n+1)/2 entries), the code
    of before stored full matrices (an inverse root's rounding left it not bitwise symmetric;
    loading keeps its symmetric part 0.5 (X + X^T)). Everything else as it is."""
    if isinstance(value, dict):
        return {k: full(v, symmetric or symmetric_key(k)) for k, v in value.items()}
    if symmetric and isinstance(value, torch.Tensor):
        if value.dim() == 1:
            n = round(((8 * value.numel() + 1) ** 0.5 - 1) / 2)
            assert n * (n + 1) // 2 == value.numel()
            upper = value
        else:
            n = value.shape[0]
            upper = (0.5 * value + 0.5 * value.T)[tuple(torch.triu_indices(n, n))]
        out = torch.empty(n, n, dtype=value.dtype)
        rows, cols = torch.triu_indices(n, n)
        out[rows, cols] = upper
        out[cols, rows] = upper
        return out
    return value


def close(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return a == b


def snapshot(model: nn.Module, optimizer: DistributedShampoo) -> dict[str, Any]:
    state = optimizer.distributed_state_dict(key_to_param=model.named_parameters(), save_param_groups=False)
    return copy.deepcopy({"state": state["state"], "params": [p.detach() for p in model.parameters()]})


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    return torch.load(DATA / "expected.pt", weights_only=True)


def check_resume(model: nn.Module, optimizer: DistributedShampoo, expected: dict[str, Any]) -> None:
    # the saved factors were bitwise symmetric, so packing them loses nothing
    for key, value in expected["at_save"]["state"].items():
        if '"factor_matrices"' in key:
            assert torch.equal(value, value.T), key
    # exact values after loading (roots: their symmetric parts)
    assert same(full(snapshot(model, optimizer)), full(expected["at_save"]))
    train(model, optimizer, range(6, 10))
    # the code of before preconditioned with roots that were not bitwise symmetric: the same
    # run up to rounding from there on
    assert close([p.detach() for p in model.parameters()], expected["params"])
    assert close(full(snapshot(model, optimizer)), full(expected["after"]))


def test_standard_state_dict_of_before_issue_11_loads_exactly_and_resumes(expected: dict[str, Any]) -> None:
    saved = torch.load(DATA / "standard.pt", weights_only=True)
    model, optimizer = make(lr=0.5)  # the checkpoint's lr must win
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optim"])
    assert optimizer.param_groups[0]["lr"] == KWARGS["lr"]
    check_resume(model, optimizer, expected)


def test_dcp_checkpoint_of_before_issue_11_loads_exactly_and_resumes(expected: dict[str, Any]) -> None:
    model, optimizer = make()
    state = {"model": model.state_dict(),
             "optim": optimizer.distributed_state_dict(key_to_param=model.named_parameters())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(DATA / "dcp"), planner=ShampooLoadPlanner())
    optimizer.load_distributed_state_dict(state["optim"], key_to_param=model.named_parameters())
    model.load_state_dict(state["model"])
    check_resume(model, optimizer, expected)
