"""Lean optimizer memory (issue 11): what the optimizer holds between steps is exactly the
state the mathematics needs (packed factor matrices and inverse roots, grafting state, filtered
gradient, momentum) plus two block-layout scratch buffers (G / G_hat and the Shampoo
direction; gradients are read and parameters written in place, so weight decay adds none);
and running the factor, root and
preconditioning phases chunk by chunk (bounded scratch) gives the same numbers, bit for bit, as
one chunk holding every block."""

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_atomicity import assert_bitwise_equal  # noqa: E402

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import AdamGraftingConfig, PrecisionConfig
from distributed_shampoo.utils import shampoo_packed_chunks


def held_bytes(root: object, exclude: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from `root` (as bench_memory.py)."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = [root]
    skip = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type, nn.Module)
    while stack:
        value = stack.pop()
        if id(value) in seen or isinstance(value, skip):
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in exclude:
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, np.ndarray):
            base = value if value.base is None else value.base
            if isinstance(base, np.ndarray):
                storages[base.__array_interface__["data"][0]] = base.nbytes
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(value)
        elif hasattr(value, "__dict__"):
            stack.extend(vars(value).values())
    return sum(storages.values())


def make(model: nn.Module, **kwargs: Any) -> DistributedShampoo:
    return DistributedShampoo(
        model.parameters(), lr=0.01, betas=(0.9, 0.999), epsilon=1e-8, momentum=0.5,
        max_preconditioner_dim=48, precondition_frequency=2, start_preconditioning_step=2,
        grafting_config=AdamGraftingConfig(beta2=0.999, epsilon=1e-8), **kwargs,
    )


def train(model: nn.Module, optimizer: DistributedShampoo, steps: range) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        optimizer.step()


@pytest.mark.parametrize(
    "kwargs", [{}, {"weight_decay": 0.01}, {"weight_decay": 0.01, "use_decoupled_weight_decay": False}],
    ids=["no decay", "decoupled decay", "L2 decay"],
)
def test_held_state_is_packed_factors_roots_moments_and_no_scratch(kwargs: dict) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 64), nn.Linear(64, 10))
    optimizer = make(model, **kwargs)
    train(model, optimizer, range(1, 5))  # two root steps
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    exclude = {p.untyped_storage().data_ptr() for p in params}
    exclude |= {p.grad.untyped_storage().data_ptr() for p in params}
    # blocks of max_preconditioner_dim 48; each d x d factor packed to d(d+1)/2
    dims = [(48, 48), (48, 4), (16, 48), (16, 4), (48,), (16,), (10, 48), (10, 16), (10,)]
    packed = sum(d * (d + 1) // 2 for shape in dims for d in shape)
    factors = len([d for shape in dims for d in shape])
    expected = 4 * (
        2 * packed            # factor matrices and inverse roots (float32)
        + 3 * numel           # grafting state, filtered gradient, momentum
    )  # the step's scratch (G / G_hat and the direction per chunk) is freed when it ends
    expected += factors * (1 + 1 + 4 + 1 + 1)  # diagonal flags (and work), status, commit, active
    held = held_bytes(optimizer, exclude)
    # what is left is small bookkeeping (tables, flags, step counters): no model-sized buffer
    assert expected <= held < expected + 64 * 1024, (held, expected)


@pytest.mark.parametrize(
    "precision",
    [PrecisionConfig(), PrecisionConfig(factor_matrix_dtype=torch.bfloat16, inv_factor_matrix_dtype=torch.bfloat16)],
    ids=["float32", "bf16 factors and roots"],
)
@pytest.mark.parametrize(
    "kwargs", [{}, {"weight_decay": 0.01, "use_decoupled_weight_decay": False}, {"weight_decay": 0.01}],
    ids=["no decay", "L2", "decoupled"],
)
def test_chunked_phases_equal_one_chunk_bitwise(
    monkeypatch: pytest.MonkeyPatch, precision: PrecisionConfig, kwargs: dict
) -> None:
    """The whole per-block pipeline (gather, factor update, moments, direction, grafting,
    momentum, parameter write) chunk by chunk gives one chunk's numbers, bit for bit."""
    def run(min_chunk: int) -> dict[str, Any]:
        monkeypatch.setattr(shampoo_packed_chunks, "MIN_CHUNK_ELEMENTS", min_chunk)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(100, 64), nn.Linear(64, 10))
        optimizer = make(model, precision_config=precision, **kwargs)
        chunks = sum(len(e.packing.chunks) for e in optimizer._engines)
        train(model, optimizer, range(1, 6))
        return {"chunks": chunks, "params": [p.detach().clone() for p in model.parameters()],
                "state": {i: dict(optimizer.state[p]) for i, p in enumerate(model.parameters())}}

    one = run(2**40)
    many = run(1)
    assert one["chunks"] == 1 and many["chunks"] >= 3  # the largest block once per thread
    assert_bitwise_equal(many["params"], one["params"], "params")
    assert_bitwise_equal(many["state"], one["state"], "state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradients_read_and_parameters_written_in_place(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 and bfloat16 groups take the pointer-table path (no param-layout buffer is
    allocated in the step); float16 takes transient param-layout copies."""
    from distributed_shampoo.utils import shampoo_param_io

    staged = []
    original = shampoo_param_io.ParamIO._staged_flat

    def spy(self):  # type: ignore[no-untyped-def]
        staged.append(1)
        return original(self)

    monkeypatch.setattr(shampoo_param_io.ParamIO, "_staged_flat", spy)
    model = nn.Sequential(nn.Linear(20, 8), nn.Linear(8, 3)).to(dtype)
    optimizer = make(model, weight_decay=0.01)
    train(model, optimizer, range(1, 4))
    assert bool(staged) == (dtype == torch.float16)


def test_step_scratch_is_bounded_by_a_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """With small chunks the step's block-layout scratch (G / G_hat, the direction) is the
    largest chunk's, not the model's."""
    monkeypatch.setattr(shampoo_packed_chunks, "MIN_CHUNK_ELEMENTS", 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 96), nn.Linear(96, 10))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the chunk budget: the largest block once per thread
    try:
        optimizer = make(model, weight_decay=0.01)
    finally:
        torch.set_num_threads(threads)
    train(model, optimizer, range(1, 5))
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    exclude = {p.untyped_storage().data_ptr() for p in params}
    exclude |= {p.grad.untyped_storage().data_ptr() for p in params}
    (engine,) = optimizer._engines
    chunk = engine.max_chunk_numel
    assert len(engine.pipe) >= 8 and chunk <= numel // 8
    state = 4 * (2 * engine.packing.numel + 3 * numel)  # packed factors + roots, V, F, M
    held = held_bytes(optimizer, exclude)
    assert state + 4 * 2 * chunk <= held < state + 4 * 2 * chunk + 64 * 1024, (held, state, chunk)


def test_in_place_parameter_writes_bump_autograd_versions() -> None:
    """The C kernels write the parameters behind autograd's back; the step bumps their
    version counters as `add_` did, so autograd still sees the in-place change."""
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))
    optimizer = make(model)
    before = [p._version for p in model.parameters()]
    train(model, optimizer, range(1, 2))
    assert all(p._version > v for p, v in zip(model.parameters(), before))


def test_non_contiguous_gradient_gives_the_contiguous_result_bitwise() -> None:
    """A non-contiguous gradient is read through a transient contiguous copy: same bits."""
    def run(transposed: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 3))
        optimizer = make(model, weight_decay=0.01, use_decoupled_weight_decay=False)
        for step in range(1, 4):
            generator = torch.Generator().manual_seed(step)
            for p in model.parameters():
                g = torch.randn(p.shape, generator=generator)
                p.grad = g.t().contiguous().t() if transposed and g.dim() == 2 else g
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    assert_bitwise_equal(run(True), run(False), "params")
