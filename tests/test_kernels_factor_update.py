"""Factor update (SPEC B §4.4) in C against a NumPy float64 oracle: every order 0-4, odd and
zero sizes, beta2 = 1 and < 1, in place and out of place, inactive blocks untouched."""

import numpy as np
import pytest
import torch

from block_tables import eps, make_layout
from distributed_shampoo import _backend as B

SHAPES = [(), (7,), (5, 3), (3, 4, 5), (2, 3, 1, 3), (0,), (3, 0), (1,), (6, 9)]


def oracle(lay, factors, grads, active, beta2):
    """Expected factors and a per-entry rounding bound (both float64)."""
    want, bound = factors.astype(np.float64), np.zeros(factors.shape)
    for b, blk in enumerate(lay.blocks):
        if not active[b]:
            continue
        G = lay.block_view(grads, b).astype(np.float64)
        for k, (F, W, E) in enumerate(zip(lay.factor_views(factors, b),
                                          lay.factor_views(want, b),
                                          lay.factor_views(bound, b))):
            n = blk.shape[k]
            U = np.moveaxis(G, k, 0).reshape(n, G.size // n if n else 0)  # mode-k unfolding
            C = U @ U.T
            F64 = F.astype(np.float64)
            W[...] = F64 + C if beta2 == 1.0 else beta2 * F64 + (1.0 - beta2) * C
            # Dot products of length K err by at most (K + 3) eps times the sum of |terms|;
            # the scaling by beta2 / (1 - beta2) adds a few more roundings.
            K = U.shape[1]
            E[...] = (K + 4) * eps(factors.dtype) * (
                np.abs(F64) + np.abs(U) @ np.abs(U).T) + 1e-300
    return want, bound


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta2", [1.0, 0.95])
@pytest.mark.parametrize("in_place", [True, False])
def test_factor_update_matches_oracle(dtype, beta2, in_place):
    rng = np.random.default_rng(0)
    lay = make_layout(SHAPES, max_dim=4)
    active = (rng.random(len(lay.blocks)) < 0.8).astype(np.uint8)
    active[:6] = 1
    grads = rng.standard_normal(lay.block_numel).astype(dtype)
    factors = rng.standard_normal(lay.factor_numel).astype(dtype)
    for b in range(len(lay.blocks)):
        for F in lay.factor_views(factors, b):  # factors are symmetric (sums of U U^T)
            F[...] = F + F.T
    want, bound = oracle(lay, factors, grads, active, beta2)
    out = factors.copy() if in_place else np.full_like(factors, np.nan)
    B.factor_update(out, out if in_place else factors, grads, lay.table, active, beta2)
    assert np.all(np.abs(out - want) <= bound), np.abs(out - want).max()
    for b, blk in enumerate(lay.blocks):
        for F_new, F_old in zip(lay.factor_views(out, b), lay.factor_views(factors, b)):
            if not active[b]:
                np.testing.assert_array_equal(F_new, F_old)  # untouched (copied) exactly
            elif beta2 == 1.0 or F_new.size:
                np.testing.assert_array_equal(F_new, F_new.T)  # both triangles written


def test_factor_update_torch_tensors_and_bool_mask():
    lay = make_layout([(3, 5)], max_dim=8)
    g = torch.randn(lay.block_numel, dtype=torch.float64)
    f = torch.zeros(lay.factor_numel, dtype=torch.float64)
    B.factor_update(f, f, g, torch.from_numpy(lay.table), torch.ones(1, dtype=torch.bool), 1.0)
    G = g.reshape(3, 5)
    torch.testing.assert_close(f[:9].reshape(3, 3), G @ G.T)
    torch.testing.assert_close(f[9:].reshape(5, 5), G.T @ G)


def test_factor_update_zero_numel_blocks_only_decay():
    lay = make_layout([(3, 0), (0,)], max_dim=4)
    factors = np.arange(lay.factor_numel, dtype=np.float64) + 1.0
    out = factors.copy()
    B.factor_update(out, out, np.zeros(0), lay.table, np.ones(len(lay.blocks), np.uint8), 0.5)
    np.testing.assert_array_equal(out, 0.5 * factors)  # C = 0: F <- beta2 F


def test_factor_update_keeps_a_one_sided_nan_like_torch():
    """The update is elementwise on the full matrix (torch's mul_/add_), so a NaN planted in
    one triangle of a factor survives for the root-inverse check to find (SPEC A.3.12)."""
    lay = make_layout([(2, 4)], max_dim=8)
    factors = np.zeros(lay.factor_numel)
    R = lay.factor_views(factors, 0)[1]
    R[1, 2] = np.nan
    grads = np.random.default_rng(3).standard_normal(lay.block_numel)
    for beta2 in (1.0, 0.9):
        out = factors.copy()
        B.factor_update(out, out, grads, lay.table, np.ones(1, np.uint8), beta2)
        R_out = lay.factor_views(out, 0)[1]
        assert np.isnan(R_out[1, 2]) and np.isfinite(np.delete(R_out.ravel(), 6)).all()


# Many blocks of mixed sizes and orders (cut at 128): a zero-size block, a 0-d one, 4-d ones.
# Their estimated work is over 3 x PARALLEL_MIN_COST, so 3 threads really are used.
THREAD_SHAPES = [(400, 250), (33,), (9, 40, 70), (), (5, 0), (130, 3), (2, 3, 4, 5), (64, 64),
                 (1, 17), (31, 2, 33)]


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta2", [1.0, 0.95])
@pytest.mark.parametrize("in_place", [True, False])
def test_factor_update_threads_bitwise_identical(dtype, beta2, in_place):
    """num_threads 1, 2, 3: the same bits, inactive blocks and a NaN factor included."""
    rng = np.random.default_rng(11)
    lay = make_layout(THREAD_SHAPES, max_dim=128)
    active = (rng.random(len(lay.blocks)) < 0.75).astype(np.uint8)
    active[:3] = [1, 0, 1]
    # a lower bound of the kernel's estimate (SYRK term of factor_update_cost), in ns
    assert sum(0.03 * np.prod(blk.shape) * sum(blk.shape)
               for blk, a in zip(lay.blocks, active) if a) > 3 * B.PARALLEL_MIN_COST
    grads = rng.standard_normal(lay.block_numel).astype(dtype)
    factors = rng.standard_normal(lay.factor_numel).astype(dtype)
    lay.factor_views(factors, 0)[1][2, 5] = np.nan  # a NaN factor in an active block
    lay.factor_views(factors, 1)[0][0, 0] = np.nan  # and in an inactive one
    results = []
    with B.single_threaded_blas():
        for threads in (1, 2, 3):
            out = factors.copy() if in_place else np.full_like(factors, -3.5)
            B.factor_update(out, out if in_place else factors, grads, lay.table, active, beta2,
                            num_threads=threads)
            results.append(out)
    assert np.isnan(lay.factor_views(results[0], 0)[1][2, 5])
    for out in results[1:]:
        np.testing.assert_array_equal(_bits(out), _bits(results[0]))
    want, bound = oracle(lay, factors, grads, active, beta2)
    finite = np.isfinite(want)
    assert np.all(np.abs(results[0] - want)[finite] <= bound[finite])


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-2, ValueError), (2.0, TypeError),
                                       (True, TypeError), (None, TypeError)])
def test_num_threads_is_checked(bad, error):
    lay = make_layout([(3, 5)], max_dim=8)
    f, g, act = np.zeros(lay.factor_numel), np.zeros(lay.block_numel), np.ones(1, np.uint8)
    with pytest.raises(error, match="num_threads"):
        B.factor_update(f, f, g, lay.table, act, 1.0, num_threads=bad)
    with pytest.raises(error, match="num_threads"):
        B.precondition(np.zeros_like(g), g, f, lay.table, act, num_threads=bad)
