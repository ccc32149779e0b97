"""Eigenvalue-corrected Shampoo kernels (csrc/core/soap.h) against NumPy float64: rotation into
the eigenbases, the second moment, bias correction, epsilon and root, rotation back (orders
0-4, odd and zero sizes, no-basis-yet blocks, inactive blocks untouched), and the eigenbases
by eigh and by warm-started QR (against numpy.linalg.eigh / qr), with their statuses."""

import numpy as np
import pytest

from block_tables import make_layout
from distributed_shampoo import _backend as B
from distributed_shampoo import _soap_backend as S

SHAPES = [(), (7,), (5, 3), (3, 4, 5), (2, 3, 1, 3), (0,), (3, 0), (6, 9)]


def rotate(X, Qs, back=False):
    for Q in Qs:
        X = np.tensordot(X, Q.T if back else Q, axes=([0], [0]))
    return X


def orthogonal(rng, n):
    return np.linalg.qr(rng.standard_normal((n, n)))[0] if n else np.zeros((0, 0))


def _inputs(dtype, seed, root=2):
    rng = np.random.default_rng(seed)
    lay = make_layout(SHAPES, max_dim=4, root=root)
    active = (rng.random(len(lay.blocks)) < 0.8).astype(np.uint8)
    active[:6] = 1
    bases = np.zeros(lay.factor_numel)
    for b, blk in enumerate(lay.blocks):
        if b % 5 == 4:
            continue  # no eigenbasis yet (Q_0 zero): R is the identity
        for view, d in zip(lay.factor_views(bases, b), blk.shape):
            view[...] = orthogonal(rng, d)
    return (rng, lay, active, bases.astype(dtype), rng.standard_normal(lay.block_numel).astype(dtype),
            rng.random(lay.block_numel).astype(dtype))


def _want_bases(lay, bases, b):
    Qs = [Q.astype(np.float64) for Q in lay.factor_views(bases, b)]
    return Qs if Qs and np.any(Qs[0]) else []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta2", [0.95, 1.0])
@pytest.mark.parametrize("root", [1, 2, 3])
def test_direction_and_moment_match_numpy(dtype, beta2, root):
    rng, lay, active, bases, grads, D0 = _inputs(dtype, 3, root)
    moment_grads = rng.standard_normal(lay.block_numel).astype(dtype)
    D = D0.copy()
    sentinel = dtype(-7.25)
    out = np.full(lay.block_numel, sentinel, dtype=dtype)
    bc, epsilon = 0.3, 1e-3
    S.soap_direction(out, grads, moment_grads, bases, D, lay.table, active,
                     beta2=beta2, bias_correction=bc, epsilon=epsilon)
    tol = 1e-4 if dtype == np.float32 else 1e-11
    for b, blk in enumerate(lay.blocks):
        got, got_D = lay.block_view(out, b), lay.block_view(D, b)
        if not active[b]:
            assert np.all(got == sentinel) and np.array_equal(got_D, lay.block_view(D0, b))
            continue
        Qs = _want_bases(lay, bases, b)
        Rm = rotate(lay.block_view(moment_grads, b).astype(np.float64), Qs)
        d0 = lay.block_view(D0, b).astype(np.float64)
        want_D = d0 + Rm**2 if beta2 == 1.0 else beta2 * d0 + (1 - beta2) * Rm**2
        np.testing.assert_allclose(got_D, want_D, rtol=tol, atol=tol)
        R = rotate(lay.block_view(grads, b).astype(np.float64), Qs)
        want = rotate(R / (want_D / bc + epsilon) ** (1.0 / root), Qs, back=True)
        np.testing.assert_allclose(got, want, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moment_only_and_shared_gradient(dtype):
    """out=None updates D alone; moment_grads is grads: one rotation, same result as two."""
    _, lay, active, bases, grads, D0 = _inputs(dtype, 4)
    D1, D2 = D0.copy(), D0.copy()
    S.soap_direction(None, None, grads, bases, D1, lay.table, active, beta2=0.9,
                     bias_correction=1.0, epsilon=0.0)
    out_shared = np.zeros_like(grads)
    S.soap_direction(out_shared, grads, grads, bases, D2, lay.table, active, beta2=0.9,
                     bias_correction=1.0, epsilon=1e-6)
    np.testing.assert_array_equal(D1, D2)
    D3 = D1.copy()
    out_after = np.zeros_like(grads)
    S.soap_direction(out_after, grads, None, bases, D3, lay.table, active, beta2=0.9,
                     bias_correction=1.0, epsilon=1e-6)
    np.testing.assert_array_equal(D3, D1)  # no moment_grads: D only read
    np.testing.assert_array_equal(out_after, out_shared)


def test_direction_bitwise_same_for_every_thread_count():
    _, lay, active, bases, grads, D0 = _inputs(np.float64, 5)
    outs = []
    for threads in (1, 2, 3):
        D, out = D0.copy(), np.zeros_like(grads)
        S.soap_direction(out, grads, grads, bases, D, lay.table, active, beta2=0.99,
                         bias_correction=0.5, epsilon=1e-8, num_threads=threads)
        outs.append((out, D))
    for out, D in outs[1:]:
        assert np.array_equal(out, outs[0][0]) and np.array_equal(D, outs[0][1])


def test_direction_refuses_bad_arguments():
    _, lay, active, bases, grads, D = _inputs(np.float64, 6)
    out = np.zeros_like(grads)
    with pytest.raises(ValueError, match="bias_correction"):
        S.soap_direction(out, grads, None, bases, D, lay.table, active, beta2=0.9,
                         bias_correction=0.0, epsilon=0.0)
    with pytest.raises(ValueError, match="beta2"):
        S.soap_direction(out, grads, None, bases, D, lay.table, active, beta2=1.5,
                         bias_correction=1.0, epsilon=0.0)
    with pytest.raises(ValueError, match="grads"):
        S.soap_direction(out, None, grads, bases, D, lay.table, active, beta2=0.9,
                         bias_correction=1.0, epsilon=0.0)
    with pytest.raises(ValueError, match="moment_grads"):
        S.soap_direction(None, grads, None, bases, D, lay.table, active, beta2=0.9,
                         bias_correction=1.0, epsilon=0.0)
    with pytest.raises(ValueError):  # a basis buffer too short for the table
        S.soap_direction(out, grads, None, bases[:-1].copy(), D, lay.table, active, beta2=0.9,
                         bias_correction=1.0, epsilon=0.0)
    with pytest.raises(TypeError):
        S.soap_direction(out, grads, None, bases.astype(np.float32), D, lay.table, active,
                         beta2=0.9, bias_correction=1.0, epsilon=0.0)


def _spd_factors(lay, rng, dtype):
    F = np.zeros(lay.factor_numel)
    for b, blk in enumerate(lay.blocks):
        for view, d in zip(lay.factor_views(F, b), blk.shape):
            # distinct eigenvalues 1..d, a random basis: eigenvectors defined up to sign
            Q = orthogonal(rng, d)
            view[...] = (Q * np.arange(1, d + 1)) @ Q.T
    return F.astype(dtype)


def _same_up_to_sign(got, want, tol):
    signs = np.sign(np.sum(got * want, axis=0))
    np.testing.assert_allclose(got * signs, want, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eigh_eigenbasis_matches_numpy(dtype):
    rng = np.random.default_rng(7)
    lay = make_layout(SHAPES, max_dim=4)
    F = _spd_factors(lay, rng, dtype)
    active = np.ones(len(lay.blocks), np.uint8)
    active[-1] = 0
    out = np.full(lay.factor_numel, -3.0, dtype=dtype)
    diag = np.zeros(lay.factor_count, np.uint8)
    status = np.full(lay.factor_count, -1, np.int32)
    S.eigenbasis(out, F, None, lay.table, active, method="eigh", retry_double_precision=True,
                 max_iterations=0, tolerance=0.0, is_diagonal=diag, status_out=status)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for b, blk in enumerate(lay.blocks):
        for k, (got, f) in enumerate(zip(lay.factor_views(out, b), lay.factor_views(F, b))):
            fi = blk.factor_index + k
            if not active[b]:
                assert status[fi] == B.ROOT_INACTIVE and np.all(got == -3.0)
                continue
            assert status[fi] == B.ROOT_OK
            if blk.shape[k] == 1:
                assert got[0, 0] == 1.0
                continue
            _same_up_to_sign(got.astype(np.float64), np.linalg.eigh(f.astype(np.float64))[1], tol)


def _np_qr_step(F, Q, iters, tol):
    error = np.inf
    for _ in range(iters):
        if error <= tol:
            break
        last, Q = Q, np.linalg.qr(F @ Q)[0]
        error = np.linalg.norm(last - Q) / np.linalg.norm(last)
    rq = np.einsum("ij,ik,kj->j", Q, F, Q)
    return Q[:, np.argsort(rq, kind="stable")]


@pytest.mark.parametrize("iters", [0, 1, 3])
def test_qr_eigenbasis_matches_numpy(iters):
    rng = np.random.default_rng(8)
    lay = make_layout([(5, 3), (6,), (4, 4)], max_dim=8)
    F = _spd_factors(lay, rng, np.float64)
    previous = np.zeros(lay.factor_numel)
    for b, blk in enumerate(lay.blocks):
        if b == 1:
            continue  # zero previous basis: eigendecomposition
        for view, f in zip(lay.factor_views(previous, b), lay.factor_views(F, b)):
            exact = np.linalg.eigh(f)[1]
            view[...] = np.linalg.qr(exact + 0.05 * rng.standard_normal(f.shape))[0][:, ::-1]
    out = np.zeros_like(previous)
    status = np.zeros(lay.factor_count, np.int32)
    S.eigenbasis(out, F, previous, lay.table, np.ones(3, np.uint8), method="qr",
                 retry_double_precision=True, max_iterations=iters, tolerance=1e-5,
                 is_diagonal=np.zeros(lay.factor_count, np.uint8), status_out=status)
    assert np.all(status == B.ROOT_OK)
    for b in range(3):
        for got, f, prev in zip(lay.factor_views(out, b), lay.factor_views(F, b), lay.factor_views(previous, b)):
            if b == 1:
                _same_up_to_sign(got, np.linalg.eigh(f)[1], 1e-10)
            else:
                _same_up_to_sign(got, _np_qr_step(f, prev, iters, 1e-5), 1e-10)


def test_eigenbasis_diagonal_nonfinite_and_flags():
    lay = make_layout([(3,), (2, 2)], max_dim=8)
    F = np.zeros(lay.factor_numel)
    f0, = lay.factor_views(F, 0)
    f0[...] = np.diag([3.0, 1.0, 2.0])  # diagonal: identity, the flag stays set
    a, c = lay.factor_views(F, 1)
    a[...] = [[1.0, np.nan], [np.nan, 1.0]]
    c[...] = [[2.0, 1.0], [1.0, np.inf]]
    out = np.full(lay.factor_numel, 5.0)
    diag = np.ones(lay.factor_count, np.uint8)
    status = np.zeros(lay.factor_count, np.int32)
    S.eigenbasis(out, F, None, lay.table, np.ones(2, np.uint8), method="eigh",
                 retry_double_precision=False, max_iterations=0, tolerance=0.0,
                 is_diagonal=diag, status_out=status)
    np.testing.assert_array_equal(lay.factor_views(out, 0)[0], np.eye(3))
    assert list(status) == [B.ROOT_OK, B.ROOT_FACTOR_NAN, B.ROOT_FACTOR_INF]
    assert list(diag) == [1, 0, 0]
    assert np.all(lay.factor_views(out, 1)[0] == 5.0)  # not written


def test_eigenbasis_refuses_bad_arguments():
    lay = make_layout([(3,)], max_dim=8)
    F = np.eye(3).ravel()
    kw = dict(retry_double_precision=True, max_iterations=1, tolerance=0.0,
              is_diagonal=np.zeros(1, np.uint8), status_out=np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="previous"):
        S.eigenbasis(np.zeros(9), F, None, lay.table, np.ones(1, np.uint8), method="qr", **kw)
    with pytest.raises(ValueError, match="method"):
        S.eigenbasis(np.zeros(9), F, None, lay.table, np.ones(1, np.uint8), method="svd", **kw)
    with pytest.raises(ValueError, match="max_iterations"):
        S.eigenbasis(np.zeros(9), F, np.zeros(9), lay.table, np.ones(1, np.uint8), method="qr",
                     **{**kw, "max_iterations": 5000})
