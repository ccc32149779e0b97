"""The pointer-table kernels (issue 11): gather_io / finish_io / scatter_io read gradients
and write parameters where they are. Against NumPy formulas (gather), against the param-
layout kernels followed by torch's own `param.add_(update)` (finish: the step it replaces;
the param-layout kernels have their own SPEC oracle in test_kernels_elementwise.py), and
torch's bfloat16 rounding; refusals leave every buffer bitwise unchanged."""

import numpy as np
import pytest
import torch

from block_tables import make_layout
from distributed_shampoo import _backend as B
from distributed_shampoo._backend_io import IOLocator, finish_io, gather_io, scatter_io

SHAPES = [(5, 3), (7,), (), (3, 4, 5), (0, 4), (1, 1)]
SENTINEL = -7.25


def _setup(seed, dtype):
    lay = make_layout(SHAPES, max_dim=2)
    rng = np.random.default_rng(seed)
    active = (rng.random(len(lay.blocks)) < 0.7).astype(np.uint8)
    active[:3] = 1
    loc = IOLocator(lay.param_offsets, np.array([b.param for b in lay.blocks]))

    def tensors():
        return [torch.from_numpy(rng.standard_normal(s)).to(dtype) for s in lay.shapes]

    return lay, torch.from_numpy(active), loc, tensors


def _kernel_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("l2", [0.0, 0.1])
def test_gather_io_reads_tensors_in_place(dtype, l2):
    lay, active, loc, tensors = _setup(1, dtype)
    grads, params = tensors(), tensors()
    work = _kernel_dtype(dtype)
    out = torch.full((lay.block_numel,), SENTINEL, dtype=work)
    sq = torch.zeros(len(lay.blocks), dtype=torch.float64)
    assert gather_io(out, None, grads, params, loc, torch.from_numpy(lay.table), active, l2, sq) == -1
    wd = np.dtype(str(work).split(".")[1]).type(l2)
    for b, blk in enumerate(lay.blocks):
        got = lay.block_view(out.numpy(), b)
        if not active[b]:
            assert np.all(got == SENTINEL)
            continue
        g = grads[blk.param].to(work).numpy()[blk.index]
        w = params[blk.param].to(work).numpy()[blk.index]
        want = g + wd * w if l2 else g
        np.testing.assert_array_equal(got, want)
        assert sq[b].item() == pytest.approx(float((want.astype(np.float64) ** 2).sum()), rel=1e-12)
    # the read-only check computes the same norms and writes nothing
    sq2 = torch.zeros_like(sq)
    before = [g.clone() for g in grads]
    assert gather_io(None, None, grads, params, loc, torch.from_numpy(lay.table), active, l2, sq2) == -1
    assert torch.equal(sq, sq2) and all(torch.equal(a, b) for a, b in zip(before, grads))


def test_gather_io_finds_nonfinite_blocks_and_ignores_inactive_ones():
    lay, active, loc, tensors = _setup(2, torch.float32)
    grads = tensors()
    table = torch.from_numpy(lay.table)
    inactive = [b for b in range(len(lay.blocks)) if not active[b] and lay.blocks[b].shape and np.prod(lay.blocks[b].shape)]
    if inactive:
        blk = lay.blocks[inactive[0]]
        grads[blk.param][blk.index] = float("inf")
    assert gather_io(None, None, grads, None, loc, table, active, 0.0) == -1
    grads[lay.blocks[1].param][lay.blocks[1].index] = float("nan")
    assert gather_io(None, None, grads, None, loc, table, active, 0.0) == 1


FINISH = [
    dict(graft="diagonal", grafting_phase=False, decoupled_weight_decay=0.01, momentum=0.9, nesterov=True),
    dict(graft="sgd", grafting_phase=False, decoupled_weight_decay=0.0, momentum=0.0, nesterov=False),
    dict(graft="diagonal", grafting_phase=True, decoupled_weight_decay=0.05, momentum=0.5, nesterov=False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("cfg", FINISH, ids=["diag-wd-nesterov", "sgd", "grafting-phase"])
def test_finish_io_is_finish_then_torch_add(dtype, cfg):
    lay, active, loc, tensors = _setup(3, dtype)
    work = _kernel_dtype(dtype)
    params = tensors()
    rng = np.random.default_rng(4)

    def blocks():
        return torch.from_numpy(rng.standard_normal(lay.block_numel)).to(work)

    grads, direction = blocks(), blocks()
    v = blocks().abs()
    mom_a = blocks() if cfg["momentum"] else None
    mom_b = None if mom_a is None else mom_a.clone()
    table = torch.from_numpy(lay.table)
    scalars = dict(grafting_bias_correction=0.75, grafting_epsilon=1e-8, dampening=0.1, lr=0.03, **cfg)
    # the step this replaces: updates into param layout, then torch adds them
    flat = torch.cat([p.to(work).reshape(-1) for p in params])
    update = torch.zeros(lay.param_numel, dtype=work)
    param_blocks = torch.zeros(lay.block_numel, dtype=work)
    B.gather(param_blocks, None, flat, None, table, active, 0.0)
    B.finish(update, grads, direction, v, param_blocks, mom_a, table, active, **scalars)
    want = [p.clone() for p in params]
    views = lay.param_views(update.numpy())
    for b, blk in enumerate(lay.blocks):
        if active[b]:
            want[blk.param][blk.index].add_(torch.from_numpy(np.array(views[blk.param][blk.index])))
    finish_io(params, loc, grads, direction, v, mom_b, table, active, **scalars)
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    for got, exp in zip(params, want):
        assert torch.equal(got.reshape(-1).view(bits), exp.reshape(-1).view(bits))
    if mom_a is not None:
        assert torch.equal(mom_a, mom_b)


def test_finish_io_leaves_inactive_blocks_untouched():
    lay, active, loc, tensors = _setup(5, torch.float32)
    params = tensors()
    before = [p.clone() for p in params]
    grads = torch.randn(lay.block_numel)
    finish_io(params, loc, grads, grads.clone(), None, None, torch.from_numpy(lay.table), active,
              graft="none", grafting_phase=False, grafting_bias_correction=1.0, grafting_epsilon=0.0,
              decoupled_weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, lr=0.1)
    for b, blk in enumerate(lay.blocks):
        changed = not torch.equal(params[blk.param][blk.index], before[blk.param][blk.index])
        assert changed == (bool(active[b]) and np.prod(blk.shape) > 0)


@pytest.mark.parametrize("accumulate", [True, False])
def test_scatter_io(accumulate):
    lay, active, loc, tensors = _setup(6, torch.bfloat16)
    params = tensors()
    before = [p.clone() for p in params]
    blocks = torch.randn(lay.block_numel)
    scatter_io(params, loc, blocks, torch.from_numpy(lay.table), active, accumulate)
    for b, blk in enumerate(lay.blocks):
        x = torch.from_numpy(lay.block_view(blocks.numpy(), b).copy())
        old = before[blk.param][blk.index]
        want = (old.float() + x).to(torch.bfloat16) if accumulate else x.to(torch.bfloat16)
        got = params[blk.param][blk.index]
        assert torch.equal(got, want if active[b] else old)


def test_bfloat16_rounding_is_torchs():
    # ties, NaN, overflow to inf, subnormals: the C rounding against torch's
    p = torch.tensor([1.0, 1.0, -3.0, 3.3895314e38, 1e-40, float("nan"), 0.0], dtype=torch.bfloat16)
    u = torch.tensor([2**-8, 3 * 2**-8, -2**-7 * 3, 3e38, 1e-41, 1.0, float("nan")])
    lay = make_layout([(7,)], max_dim=8)
    loc = IOLocator([0], np.zeros(1, np.int64))
    got = p.clone()
    scatter_io([got], loc, u, torch.from_numpy(lay.table), torch.ones(1, dtype=torch.uint8), True)
    want = p.clone().add_(u)
    # NaN: torch's vectorised and scalar conversions give different NaN bits; NaN either way
    finite = ~want.isnan()
    assert torch.equal(got[finite].view(torch.int16), want[finite].view(torch.int16))
    assert torch.equal(got.isnan(), ~finite)


def test_refusals_change_nothing():
    lay, active, loc, tensors = _setup(7, torch.float32)
    params = tensors()
    table = torch.from_numpy(lay.table)
    blocks = torch.randn(lay.block_numel)
    snapshot = [p.clone() for p in params]

    def refused(exc, match, ps, locator=loc, buf=blocks):
        with pytest.raises(exc, match=match):
            scatter_io(ps, locator, buf, table, active, True)
        assert all(torch.equal(a, b) for a, b in zip(snapshot, params))

    short = list(params)
    short[0] = params[0].reshape(-1)[:10]  # a block past its end
    refused(ValueError, "does not fit inside entry 0", short)
    refused(TypeError, "not a subclass", [torch.nn.Parameter(p, requires_grad=False) for p in params])
    mixed = list(params)
    mixed[1] = params[1].to(torch.bfloat16)
    refused(TypeError, "share one dtype", mixed)
    missing = list(params)
    missing[0] = None
    refused(ValueError, "missing or None", missing)
    refused(ValueError, "entries", params[:-1])
    refused(TypeError, "float32 or bfloat16", [p.to(torch.float16) for p in params])
    # a parameter that is the block buffer itself
    alias = list(params)
    alias[1] = blocks[:7]
    with pytest.raises(ValueError, match="overlap"):
        scatter_io(alias, loc, blocks, table, active, True)
