"""Shampoo preconditioning (SPEC B §4.8) in C against NumPy float64 contractions: orders 0-4,
odd and zero sizes, non-symmetric Q (pins the index convention), inactive blocks untouched."""

import numpy as np
import pytest

from block_tables import eps, make_layout
from distributed_shampoo import _backend as B

SHAPES = [(), (7,), (5, 3), (3, 4, 5), (2, 3, 1, 3), (0,), (3, 0), (6, 9)]


def contract(G, Qs):
    """P[j..] = sum_i G[i..] Q_0[i_0, j_0] ... : dim 0 with Q_k's first index, moved last."""
    P = G
    for Q in Qs:
        P = np.tensordot(P, Q, axes=([0], [0]))
    return P


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_precondition_matches_oracle(dtype):
    rng = np.random.default_rng(1)
    lay = make_layout(SHAPES, max_dim=4)
    active = (rng.random(len(lay.blocks)) < 0.7).astype(np.uint8)
    active[:5] = 1
    grads = rng.standard_normal(lay.block_numel).astype(dtype)
    inv_roots = rng.standard_normal(lay.factor_numel).astype(dtype)
    sentinel = np.float32(-7.25)
    out = np.full(lay.block_numel, sentinel, dtype=dtype)
    B.precondition(out, grads, inv_roots, lay.table, active)
    for b, blk in enumerate(lay.blocks):
        got = lay.block_view(out, b)
        if not active[b]:
            assert np.all(got == sentinel)  # inactive: not written
            continue
        G = lay.block_view(grads, b).astype(np.float64)
        Qs = [Q.astype(np.float64) for Q in lay.factor_views(inv_roots, b)]
        want = contract(G, Qs)
        # Each contraction of length n_k adds at most (n_k + 1) eps relative to the chain of
        # absolute values (GEMM rounding, error bound of a dot product).
        bound = (sum(blk.shape) + 2 * len(blk.shape)) * eps(dtype) * contract(
            np.abs(G), [np.abs(Q) for Q in Qs])
        assert got.shape == want.shape
        assert np.all(np.abs(got - want) <= bound), (blk.shape, np.abs(got - want).max())


def test_precondition_order0_is_identity_and_matrix_is_QtGQ():
    lay = make_layout([(), (3, 2)], max_dim=8)
    rng = np.random.default_rng(2)
    grads = rng.standard_normal(lay.block_numel)
    inv = rng.standard_normal(lay.factor_numel)
    out = np.zeros_like(grads)
    B.precondition(out, grads, inv, lay.table, np.ones(2, np.uint8))
    assert out[0] == grads[0]
    L, R = lay.factor_views(inv, 1)
    np.testing.assert_allclose(lay.block_view(out, 1), L.T @ lay.block_view(grads, 1) @ R,
                               rtol=1e-13, atol=1e-13)


# Many blocks of mixed sizes and orders (cut at 128), zero-size and 0-d ones among them; their
# estimated work is over 3 x PARALLEL_MIN_COST, so 3 threads really are used.
THREAD_SHAPES = [(400, 250), (33,), (9, 40, 70), (), (5, 0), (130, 3), (2, 3, 4, 5), (64, 64),
                 (1, 17), (31, 2, 33)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_precondition_threads_bitwise_identical(dtype):
    """num_threads 1, 2, 3: the same bits; inactive blocks unwritten; a NaN root spreads alike."""
    rng = np.random.default_rng(12)
    lay = make_layout(THREAD_SHAPES, max_dim=128)
    active = (rng.random(len(lay.blocks)) < 0.75).astype(np.uint8)
    active[:3] = [1, 0, 1]
    # a lower bound of the kernel's estimate (GEMM term of precondition_cost), in ns
    assert sum(0.04 * np.prod(blk.shape) * sum(blk.shape)
               for blk, a in zip(lay.blocks, active) if a) > 3 * B.PARALLEL_MIN_COST
    grads = rng.standard_normal(lay.block_numel).astype(dtype)
    inv_roots = rng.standard_normal(lay.factor_numel).astype(dtype)
    lay.factor_views(inv_roots, 2)[0][3, 1] = np.nan
    sentinel = np.float32(-7.25)
    results = []
    with B.single_threaded_blas():
        for threads in (1, 2, 3):
            out = np.full(lay.block_numel, sentinel, dtype=dtype)
            B.precondition(out, grads, inv_roots, lay.table, active, num_threads=threads)
            results.append(out)
    for out in results[1:]:
        np.testing.assert_array_equal(out.view(np.uint8), results[0].view(np.uint8))
    for b in range(len(lay.blocks)):
        got = lay.block_view(results[0], b)
        assert np.all(got == sentinel) if not active[b] else not np.any(got == sentinel)
    assert np.isnan(lay.block_view(results[0], 2)).any()
    b = 3  # one finite block against the oracle
    assert active[b] and lay.blocks[b].shape == (128, 122)
    G = lay.block_view(grads, b).astype(np.float64)
    want = contract(G, [Q.astype(np.float64) for Q in lay.factor_views(inv_roots, b)])
    np.testing.assert_allclose(lay.block_view(results[0], b), want, rtol=0,
                               atol=200 * eps(dtype) * np.abs(want).max())
