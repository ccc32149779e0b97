"""gather / moments / finish (SPEC B §4.3, §4.5, §4.7-§4.11) in C against NumPy float64
formulas written from the SPEC: strided edge blocks of several parameters, orders 0-3, a
zero-element block, inactive blocks (never read nor written), float32 and float64."""

import numpy as np
import pytest
import torch

from block_tables import eps, make_layout
from distributed_shampoo import _backend as B

SHAPES = [(5, 3), (7,), (), (3, 4, 5), (0, 4), (1, 1)]
SENTINEL = -7.25  # exactly representable: "not written" is checked bit for bit


def _layout_and_mask(seed):
    lay = make_layout(SHAPES, max_dim=2)
    rng = np.random.default_rng(seed)
    active = (rng.random(len(lay.blocks)) < 0.7).astype(np.uint8)
    active[:3] = 1
    return lay, active, rng


def _param_index(lay, b):
    """Flat param-layout positions of block b, in the block's row-major order."""
    blk = lay.blocks[b]
    pos = np.arange(lay.param_numel).astype(np.int64)
    return lay.param_views(pos)[blk.param][blk.index]


# Elementwise chains of a handful of roundings: a few eps of the operands' magnitude.
def _close(got, want, scale, dtype, ulps=16):
    assert np.all(np.abs(got.astype(np.float64) - want) <= ulps * eps(dtype) * scale + 1e-300)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("l2", [0.0, 0.1])
def test_gather(dtype, l2):
    lay, active, rng = _layout_and_mask(0)
    grad_flat = rng.standard_normal(lay.param_numel).astype(dtype)
    param_flat = rng.standard_normal(lay.param_numel).astype(dtype)
    grad_blocks = np.full(lay.block_numel, SENTINEL, dtype)
    param_blocks = np.full(lay.block_numel, SENTINEL, dtype)
    bad = B.gather(grad_blocks, param_blocks, grad_flat, param_flat, lay.table, active, l2)
    assert bad == -1
    for b in range(len(lay.blocks)):
        g, w = lay.block_view(grad_blocks, b), lay.block_view(param_blocks, b)
        if not active[b]:
            assert np.all(g == SENTINEL) and np.all(w == SENTINEL)
            continue
        idx = _param_index(lay, b)
        G, W = grad_flat[idx].astype(np.float64), param_flat[idx].astype(np.float64)
        _close(g, G + l2 * W, np.abs(G) + l2 * np.abs(W), dtype, ulps=2)
        np.testing.assert_array_equal(w, param_flat[idx])


def test_gather_reports_first_nonfinite_active_block_and_needs_no_params():
    lay, active, rng = _layout_and_mask(0)
    grad_flat = torch.from_numpy(rng.standard_normal(lay.param_numel))
    inactive = [b for b in range(len(lay.blocks)) if not active[b]]
    grad_flat[int(_param_index(lay, inactive[0]).ravel()[0])] = float("inf")  # ignored
    out = torch.zeros(lay.block_numel, dtype=torch.float64)
    assert B.gather(out, None, grad_flat, None, lay.table, active, 0.0) == -1
    grad_flat[int(_param_index(lay, 2).ravel()[0])] = float("nan")
    grad_flat[int(_param_index(lay, 1).ravel()[-1])] = float("-inf")
    assert B.gather(out, None, grad_flat, None, lay.table, active, 0.0) == 1
    with pytest.raises(ValueError, match="param_flat"):
        B.gather(out, None, grad_flat, None, lay.table, active, 0.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("graft_beta2", [None, 1.0, 0.999])
@pytest.mark.parametrize("beta1, beta3", [(0.0, 0.0), (0.9, 0.9), (0.9, 0.95), (0.3, 0.8)])
@pytest.mark.parametrize("bc1", [1.0, 0.19])
def test_moments(dtype, graft_beta2, beta1, beta3, bc1):
    lay, active, rng = _layout_and_mask(1)
    n = lay.block_numel
    G0 = rng.standard_normal(n).astype(dtype)
    V0 = rng.random(n).astype(dtype)
    F0 = rng.standard_normal(n).astype(dtype)
    grads, V, F = G0.copy(), V0.copy(), F0.copy()
    B.moments(grads, V if graft_beta2 is not None else None, F if beta1 else None, lay.table,
              active, update_grafting_state=graft_beta2 is not None,
              grafting_beta2=graft_beta2 or 1.0, beta1=beta1, beta3=beta3,
              bias_correction1=bc1)
    g, v, f = (x.astype(np.float64) for x in (G0, V0, F0))
    for b in range(len(lay.blocks)):
        sl = slice(lay.blocks[b].block_offset, lay.blocks[b].block_offset + lay.table[b, B.BF_NUMEL])
        if not active[b]:
            for new, old in ((grads, G0), (V, V0), (F, F0)):
                np.testing.assert_array_equal(new[sl], old[sl])
            continue
        gs, vs, fs = g[sl], v[sl], f[sl]
        if graft_beta2 is None:
            np.testing.assert_array_equal(V[sl], V0[sl])
        else:
            want_v = vs + gs * gs if graft_beta2 == 1.0 else graft_beta2 * vs + (1 - graft_beta2) * gs * gs
            _close(V[sl], want_v, vs + gs * gs, dtype, ulps=4)
        if beta1:
            _close(F[sl], beta1 * fs + (1 - beta1) * gs, np.abs(fs) + np.abs(gs), dtype, ulps=4)
            g_hat = beta3 * fs + (1 - beta3) * gs
            _close(grads[sl], g_hat / bc1, (np.abs(fs) + np.abs(gs)) / bc1, dtype, ulps=6)
        else:
            _close(grads[sl], gs / bc1, np.abs(gs) / bc1, dtype, ulps=1)


FINISH_CASES = [
    # graft, grafting_phase, wd, momentum, dampening, nesterov
    ("none", False, 0.0, 0.0, 0.0, False),
    ("sgd", True, 0.0, 0.0, 0.0, False),
    ("sgd", False, 0.01, 0.9, 0.0, True),
    ("diagonal", True, 0.0, 0.5, 0.1, False),
    ("diagonal", False, 0.01, 0.9, 0.1, True),
    ("diagonal", False, 0.0, 0.0, 0.0, False),
    ("none", False, 0.05, 0.8, 0.2, False),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", FINISH_CASES)
def test_finish(dtype, case):
    graft, phase, wd, mom, damp, nesterov = case
    lay, active, rng = _layout_and_mask(2)
    n = lay.block_numel
    G, S, W = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    V = (rng.random(n) + 0.01).astype(dtype)
    M0 = rng.standard_normal(n).astype(dtype)
    M = M0.copy()
    update = np.full(lay.param_numel, SENTINEL, dtype)
    bcg, eps_g, lr = float(np.float32(0.271)), 1e-8, float(np.float32(0.1))
    B.finish(update, G, None if phase else S, V if graft == "diagonal" else None,
             W if wd else None, M if mom else None, lay.table, active, graft=graft,
             grafting_phase=phase, grafting_bias_correction=bcg, grafting_epsilon=eps_g,
             decoupled_weight_decay=wd, momentum=mom, dampening=damp, nesterov=nesterov, lr=lr)
    written = np.zeros(lay.param_numel, bool)
    for b in range(len(lay.blocks)):
        o = lay.blocks[b].block_offset
        sl = slice(o, o + int(lay.table[b, B.BF_NUMEL]))
        idx = _param_index(lay, b).ravel()
        if not active[b]:
            np.testing.assert_array_equal(M[sl], M0[sl])
            continue
        written[idx] = True
        g, s, w, v, m = (x[sl].astype(np.float64) for x in (G, S, W, V, M0))
        grafted = g / (np.sqrt(v / bcg) + eps_g) if graft == "diagonal" else g
        if phase:
            P = grafted
        elif graft != "none":
            P = s * (np.linalg.norm(grafted) / (np.linalg.norm(s) + 1e-16))
        else:
            P = s
        P = P + wd * w
        scale = np.abs(P) + wd * np.abs(w)
        if mom:
            m_new = mom * m + (1 - damp) * P
            _close(M[sl], m_new, mom * np.abs(m) + scale, dtype, ulps=24)
            P = (1 - damp) * P + mom * m_new if nesterov else m_new
            scale = scale + mom * (mom * np.abs(m) + scale)
        _close(update[idx], -lr * P, lr * scale, dtype, ulps=24)
    assert np.all(update[~written] == SENTINEL)  # only active blocks' elements written


def test_scatter_writes_blocks_into_param_layout_and_skips_inactive():
    """scatter is gather's inverse: every active block lands at its strided place; inactive
    blocks' places keep their old values. Oracle: NumPy slicing of the (5, 3) parameter."""
    from distributed_shampoo import _backend as backend

    table = backend.block_plan((5, 3), 2)  # blocks (2,2),(2,1),(2,2),(2,1),(1,2),(1,1)
    table[:, backend.BF_ROOT] = 2
    active = np.array([1, 1, 0, 1, 1, 0], dtype=np.uint8)
    for dtype in (np.float32, np.float64):
        blocks = np.arange(15, dtype=dtype) + 100
        flat = np.full(15, -1.0, dtype=dtype)
        backend.scatter(flat, blocks, table, active)
        expected = np.full((5, 3), -1.0, dtype=dtype)
        offset = 0
        for index, (rows, cols) in enumerate([(slice(0, 2), slice(0, 2)), (slice(0, 2), slice(2, 3)),
                                              (slice(2, 4), slice(0, 2)), (slice(2, 4), slice(2, 3)),
                                              (slice(4, 5), slice(0, 2)), (slice(4, 5), slice(2, 3))]):
            shape = expected[rows, cols].shape
            size = shape[0] * shape[1]
            if active[index]:
                expected[rows, cols] = blocks[offset : offset + size].reshape(shape)
            offset += size
        np.testing.assert_array_equal(flat.reshape(5, 3), expected)
