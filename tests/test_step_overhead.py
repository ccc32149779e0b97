"""DESIGN's performance contract: a step crosses into C a fixed number of times per phase,
whatever the number of blocks (SPEC A.4)."""

from collections import Counter

import pytest
import torch
from torch import nn

from distributed_shampoo import _backend
from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import AdamGraftingConfig
from distributed_shampoo.utils import shampoo_group_engine, shampoo_step_pipeline

PHASES = ("gather_io", "factor_update", "factor_update_packed", "root_inverse", "packed_commit", "precondition",
          "moments", "finish_io")
# the pointer-table kernels (gradients read, parameters written in place), as the engine and
# its chunked pipeline name them (one chunk here)
IO_OPS = {"gather_io": (shampoo_group_engine, shampoo_step_pipeline), "finish_io": (shampoo_step_pipeline,)}
# packed factors and roots (README "Memory"), unpacked chunk by chunk: one chunk here
PACKING = ("sym_unpack", "sym_pack")


def backend_calls_per_step(max_preconditioner_dim: int, monkeypatch: pytest.MonkeyPatch,
                           use_protected_eigh: bool = True) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8))
    optimizer = DistributedShampoo(
        model.parameters(), lr=0.01, betas=(0.9, 0.999), momentum=0.5, weight_decay=0.01,
        max_preconditioner_dim=max_preconditioner_dim, grafting_config=AdamGraftingConfig(),
        use_protected_eigh=use_protected_eigh,
    )
    model(torch.randn(4, 24)).sum().backward()
    calls: Counter = Counter()
    with monkeypatch.context() as patch:
        for name in PHASES + PACKING:
            for module in IO_OPS.get(name, (_backend,)):
                original = getattr(module, name)

                def counted(*args, _name=name, _original=original, **kwargs):
                    calls[_name] += 1
                    return _original(*args, **kwargs)

                patch.setattr(module, name, counted)
        optimizer.step()
    blocks = sum(engine.layout.num_blocks for engine in optimizer._engines)
    return blocks, calls


def test_backend_calls_do_not_grow_with_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    few_blocks, few_calls = backend_calls_per_step(64, monkeypatch)
    many_blocks, many_calls = backend_calls_per_step(2, monkeypatch)
    assert many_blocks > 20 * few_blocks
    assert few_calls == many_calls
    # A root step (frequency 1) that provably cannot raise computes its roots in the
    # pipeline, nothing staged (shampoo_roots_in_apply.py): gather_io reads G twice (the
    # read-only check, then in the pipeline), the factors are updated packed in place, then
    # unpacked once for their roots, the roots packed once and unpacked for preconditioning.
    assert few_calls["gather_io"] == 2, few_calls
    assert few_calls["factor_update"] == 0 and few_calls["packed_commit"] == 0, few_calls
    once = ("factor_update_packed", "root_inverse", "precondition", "moments", "finish_io")
    assert all(few_calls[name] == 1 for name in once), few_calls
    assert few_calls["sym_unpack"] == 2 and few_calls["sym_pack"] == 1, few_calls


def test_staged_root_step_calls_do_not_grow_with_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """use_protected_eigh=False: a failed root must raise, so the root step stages."""
    few_blocks, few_calls = backend_calls_per_step(64, monkeypatch, use_protected_eigh=False)
    many_blocks, many_calls = backend_calls_per_step(2, monkeypatch, use_protected_eigh=False)
    assert many_blocks > 20 * few_blocks
    assert few_calls == many_calls
    # gather_io: the read-only check, the root step's G (staging), G in the pipeline
    assert few_calls["gather_io"] == 3, few_calls
    staged = ("factor_update", "root_inverse", "packed_commit", "precondition", "moments", "finish_io")
    assert all(few_calls[name] == 1 for name in staged) and few_calls["factor_update_packed"] == 0, few_calls
    # the new factors unpacked once, the roots for preconditioning once; packed: factors, roots
    assert few_calls["sym_unpack"] == 2 and few_calls["sym_pack"] == 2, few_calls
