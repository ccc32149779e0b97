"""The inverse-root kernels (csrc/core/matrix_root.*) driven with NumPy arrays through
`_backend.root_inverse`, against a float64 NumPy oracle written here from SPEC B §4.6 and §5
(it never calls the extension)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pytest

from distributed_shampoo import _backend

DTYPES = [np.float32, np.float64]

# Per-factor statuses (csrc/core/status.h, shampoo_root_status).
OK, INACTIVE, FACTOR_NAN, FACTOR_INF, FAILED, NONFINITE, MAX_ITERS = range(7)

# Block-table layout (csrc/core/block_table.h).
MAX_ORDER = 8
BF_ORDER, BF_NUMEL, BF_BLOCK_OFFSET, BF_FACTOR_OFFSET, BF_FACTOR_INDEX = 0, 1, 2, 3, 4
BF_PARAM_OFFSET, BF_ROOT, BF_DIMS = 5, 6, 7
BF_STRIDES = BF_DIMS + MAX_ORDER
BF_COUNT = BF_STRIDES + MAX_ORDER

SENTINEL = -7.0  # pre-filled into outputs to detect writes that must not happen


# ------------------------------------------------------------------------------------------
# Float64 oracle (SPEC §5), NumPy only.
# ------------------------------------------------------------------------------------------


def oracle_eigen(
    a: np.ndarray, root: int, epsilon: float = 0.0, multiplier: float = 1.0, psd: bool = True
) -> np.ndarray:
    """SPEC §5.3 in float64."""
    lam, q = np.linalg.eigh(np.asarray(a, np.float64))
    if psd:
        lam = lam - min(lam.min(), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = (lam + epsilon) ** (-multiplier / root)
    return (q * s) @ q.T


def oracle_diagonal(a: np.ndarray, root: int, epsilon: float = 0.0, multiplier: float = 1.0):
    """SPEC §5.2 in float64."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag((np.diag(np.asarray(a, np.float64)) + epsilon) ** (-multiplier / root))


def fl32(x: float) -> float:
    return float(np.float32(x))


def _max_dev(m: np.ndarray) -> float:
    return float(np.max(np.abs(m - np.eye(len(m)))))


def oracle_newton(a: np.ndarray, root: int, epsilon: float, max_iterations: int, tol: float):
    """SPEC §5.4 in float64; returns (X, converged)."""
    n = len(a)
    eye = np.eye(n)
    alpha = -1.0 / root
    a_r = np.asarray(a, np.float64) + epsilon * eye
    z = (root + 1) / (2 * np.linalg.norm(a_r))
    x = z ** (1 / root) * eye
    m = z * a_r
    err, it = _max_dev(m), 0
    while err > tol and it < max_iterations:
        it += 1
        mp = alpha * m + (1 - alpha) * eye
        x = x @ mp
        m = np.linalg.matrix_power(mp, root) @ m
        err = _max_dev(m)
    return x, err <= tol


def oracle_higher_order(
    a: np.ndarray,
    p: int,
    order: int,
    epsilon: float,
    rel_epsilon: float,
    max_iterations: int,
    tol: float,
) -> tuple[np.ndarray, str, float]:
    """SPEC §5.5 in float64 for an integer root; returns (X, flag, true_err)."""
    n = len(a)
    eye = np.eye(n)
    a = np.asarray(a, np.float64)
    b = [1.0]
    for i in range(1, order):
        b.append(b[-1] * (1 + (i - 1) * p) / (i * p))
    s = -1.0 / p
    lam = np.abs(a).sum(axis=1).max()
    a_r = a + max(rel_epsilon * lam, epsilon) * eye
    z = 1.0 / np.trace(a_r)
    x = z ** (1 / p) * eye
    m = z * a_r
    mp = s * m + (1 - s) * eye
    x = x @ mp
    m = np.linalg.matrix_power(mp, p) @ m
    err, it, flag = _max_dev(m), 1, None
    while err > tol and it < max_iterations:
        it += 1
        bb = eye - m
        mp = b[order - 1] * bb + b[order - 2] * eye
        for i in range(order - 3, -1, -1):
            mp = b[i] * eye + mp @ bb
        x = x @ mp
        m = np.linalg.matrix_power(mp, p) @ m
        new = _max_dev(m)
        if new > 1.2 * err or (new == err and err < 1e-3):
            flag = "early_stop"
            break
        err = new
    if flag is None:
        flag = "max_iters" if err > tol else "converged"
    true_err = _max_dev(a_r @ np.linalg.matrix_power(x, p))
    return x, flag, true_err


def spd(rng: np.random.Generator, n: int, kappa: float, scale: float = 1.0) -> np.ndarray:
    """Symmetric positive definite n x n with eigenvalues geometric in [scale, scale*kappa]."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = scale * np.geomspace(1.0, kappa, n) if n > 1 else np.array([scale])
    a = (q * lam) @ q.T
    return (a + a.T) / 2


def rel_tol(dtype: Any, n: int, kappa: float, alpha: float = 1.0, c: float = 20.0) -> float:
    """Bound on max|X - X_ref| / max|X_ref| for X = A^alpha of an SPD A computed in `dtype`.

    A backward-stable eigensolver gives the exact root of A + E with ||E|| <~ n u ||A|| (u the
    unit roundoff), and the root's relative sensitivity to E is |alpha| kappa(A); `c` absorbs
    the constants of the gemm and of the eigensolver (and of the iterative methods, which stop
    once their residual reaches roundoff level)."""
    u = float(np.finfo(dtype).eps)
    return max(c * n * u * kappa * max(abs(alpha), 1.0), 10 * u)


# Stopping tolerance of the iterative methods, per dtype: reachable (above roundoff), so
# they report OK; their result then carries an extra error of about that size (see iter_tol).
ITER_TOL = {np.float32: 1e-5, np.float64: 1e-11}


def iter_tol(dtype: Any, n: int, kappa: float, alpha: float, c: float = 50.0) -> float:
    """rel_tol plus the iteration's own stopping error: max|M - I| <= tolerance bounds the
    relative error of X by about kappa * tolerance / root (M = X^r A_r, X and A_r nearly
    commute)."""
    return rel_tol(dtype, n, kappa, alpha, c) + kappa * ITER_TOL[dtype]


def assert_root_close(x: np.ndarray, ref: np.ndarray, tol: float) -> None:
    err = float(np.max(np.abs(np.asarray(x, np.float64) - ref)))
    scale = float(np.max(np.abs(ref)))
    assert err <= tol * scale, f"max error {err:.3g} > {tol:.3g} * {scale:.3g}"


# ------------------------------------------------------------------------------------------
# Driving the kernel.
# ------------------------------------------------------------------------------------------


def make_table(blocks: Sequence[tuple[Sequence[int], int]]) -> tuple[np.ndarray, list[int]]:
    """Block table for blocks given as (dims, root), consecutive in block, param and factor
    layout. Returns the table and each factor's element offset."""
    table = np.zeros((len(blocks), BF_COUNT), np.int64)
    block_off = factor_off = factor_idx = 0
    offsets = []
    for b, (dims, root) in enumerate(blocks):
        numel = int(np.prod(dims)) if dims else 1
        table[b, BF_ORDER] = len(dims)
        table[b, BF_NUMEL] = numel
        table[b, BF_BLOCK_OFFSET] = block_off
        table[b, BF_PARAM_OFFSET] = block_off
        table[b, BF_FACTOR_OFFSET] = factor_off
        table[b, BF_FACTOR_INDEX] = factor_idx
        table[b, BF_ROOT] = root
        stride = 1
        for k in reversed(range(len(dims))):
            table[b, BF_DIMS + k] = dims[k]
            table[b, BF_STRIDES + k] = stride
            stride *= dims[k]
        for d in dims:
            offsets.append(factor_off)
            factor_off += d * d
        factor_idx += len(dims)
        block_off += numel
    return table, offsets


DEFAULTS: dict[str, Any] = dict(
    method="eigen",
    epsilon=0.0,
    exponent_multiplier=1.0,
    bias_correction=1.0,
    make_positive_semidefinite=True,
    retry_double_precision=True,
    max_iterations=1000,
    tolerance=1e-6,
    rel_epsilon=0.0,
    order=3,
)


class Result:
    """Outputs of one root_inverse call, with per-factor views of `out`."""

    def __init__(
        self,
        out: np.ndarray,
        status: np.ndarray,
        is_diagonal: np.ndarray,
        offsets: list[int],
        dims: list[int],
    ) -> None:
        self.out, self.status, self.is_diagonal = out, status, is_diagonal
        self._offsets, self._dims = offsets, dims

    def factor(self, f: int) -> np.ndarray:
        n = self._dims[f]
        return self.out[self._offsets[f] : self._offsets[f] + n * n].reshape(n, n)


def run(
    mats: Sequence[Sequence[np.ndarray]],
    roots: Sequence[int],
    dtype: Any,
    *,
    active: Sequence[bool] | None = None,
    is_diagonal: Sequence[int] | None = None,
    **cfg: Any,
) -> Result:
    """One root_inverse call over blocks whose factors are `mats[b]` (order = len(mats[b]))."""
    blocks = [([len(m) for m in ms], r) for ms, r in zip(mats, roots)]
    table, offsets = make_table(blocks)
    dims = [len(m) for ms in mats for m in ms]
    flat = [np.asarray(m, dtype).ravel() for ms in mats for m in ms]
    factors = np.concatenate(flat) if flat else np.zeros(0, dtype)
    out = np.full_like(factors, SENTINEL)
    nf = len(dims)
    act = np.array([1] * len(mats) if active is None else active, np.uint8)
    diag = np.array([0] * nf if is_diagonal is None else is_diagonal, np.uint8)
    status = np.full(nf, -1, np.int32)
    kw = {**DEFAULTS, **cfg}
    _backend.root_inverse(out, factors, table, act, **kw, is_diagonal=diag, status_out=status)
    return Result(out, status, diag, offsets, dims)


def run_one(a: np.ndarray, root: int, dtype: Any, **cfg: Any) -> tuple[np.ndarray, int]:
    res = run([[a]], [root], dtype, **cfg)
    return res.factor(0), int(res.status[0])


# ------------------------------------------------------------------------------------------
# Eigen method (the default).
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 33])
@pytest.mark.parametrize("root,multiplier", [(2, 1.0), (4, 1.0), (6, 1.0), (4, 0.5), (2, 1.82)])
def test_eigen_random_spd(dtype, n, root, multiplier):
    rng = np.random.default_rng(1000 * n + root)
    kappa = 50.0
    a = spd(rng, n, kappa, scale=0.3).astype(dtype)
    x, st = run_one(a, root, dtype, exponent_multiplier=multiplier, epsilon=1e-12)
    assert st == OK
    assert x.dtype == dtype
    if n == 1:
        ref = (float(a[0, 0]) + np.float64(dtype(1e-12))) ** fl32(-multiplier / root)
        np.testing.assert_allclose(x[0, 0], ref, rtol=4 * np.finfo(dtype).eps)
    else:
        ref = oracle_eigen(a, root, 1e-12, multiplier)
        assert_root_close(x, ref, rel_tol(dtype, n, kappa, multiplier / root))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["eigen", "newton", "higher_order"])
def test_many_blocks_mixed_orders(dtype, method):
    """Blocks of orders 0-3 with different roots in one table; the inactive one untouched."""
    rng = np.random.default_rng(7)
    kappa = 20.0
    shapes = [(5,), (3, 7), (2, 1, 4), (), (4, 6), (0, 3)]
    roots = [2, 4, 6, 2, 4, 2]
    active = [True, True, True, True, False, True]
    mats = [[spd(rng, d, kappa) for d in dims] for dims in shapes]
    res = run(mats, roots, dtype, active=active, method=method, tolerance=ITER_TOL[dtype])
    f = 0
    for ms, r, act in zip(mats, roots, active):
        for m in ms:
            n = len(m)
            if not act:
                assert res.status[f] == INACTIVE
                assert np.all(res.factor(f) == SENTINEL)
            elif n == 0:
                assert res.status[f] == OK
            else:
                assert res.status[f] == OK, (f, res.status)
                ref = oracle_eigen(m.astype(dtype), r)
                assert_root_close(res.factor(f), ref, iter_tol(dtype, n, kappa, 1 / r))
            f += 1
    assert f == len(res.status)


# ------------------------------------------------------------------------------------------
# SPEC §12 reference scenarios.
# ------------------------------------------------------------------------------------------

SPEC_METHODS = [
    dict(method="eigen"),
    dict(method="newton"),
    *[dict(method="higher_order", order=o, tolerance=1e-20) for o in range(2, 7)],
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", SPEC_METHODS, ids=lambda c: f"{c['method']}{c.get('order', '')}")
@pytest.mark.parametrize("flag", [0, 1])
def test_spec_diag_1_4(dtype, cfg, flag):
    res = run([[np.diag([1.0, 4.0])]], [2], dtype, is_diagonal=[flag], **cfg)
    assert res.status[0] == OK
    np.testing.assert_allclose(res.factor(0), np.diag([1.0, 0.5]), atol=10 * np.finfo(dtype).eps)


SPEC_A = np.array([[1195.0, -944.0, -224.0], [-944.0, 746.0, 177.0], [-224.0, 177.0, 42.0]])
SPEC_X = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, -3.0], [1.0, -3.0, 18.0]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", SPEC_METHODS[:3], ids=lambda c: c["method"])
def test_spec_3x3_root_2(dtype, cfg):
    if cfg["method"] == "newton":
        cfg = {**cfg, "tolerance": ITER_TOL[dtype]}
    x, st = run_one(SPEC_A, 2, dtype, **cfg)
    assert st in (OK, MAX_ITERS) if dtype is np.float32 else st == OK
    # kappa(A) = kappa(X)^2 ~ 6.8e5: float32 keeps only a couple of digits of X.
    kappa = float(np.linalg.cond(SPEC_A))
    assert_root_close(x, SPEC_X, iter_tol(dtype, 3, kappa, 0.5, c=10))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["eigen", "newton", "higher_order"])
@pytest.mark.parametrize("n,root", [(10, 1), (10, 2), (10, 8), (60, 4)])
def test_identity(dtype, method, n, root):
    x, st = run_one(np.eye(n), root, dtype, method=method)
    assert st == OK
    np.testing.assert_allclose(x, np.eye(n), atol=20 * n * np.finfo(dtype).eps)


def tridiagonal(n: int, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tridiag(beta, alpha, beta) with its analytic eigenvalues and orthonormal eigenvectors."""
    a = alpha * np.eye(n) + beta * (np.eye(n, k=1) + np.eye(n, k=-1))
    k = np.arange(1, n + 1)
    lam = alpha + 2 * beta * np.cos(k * np.pi / (n + 1))
    v = np.sqrt(2 / (n + 1)) * np.sin(np.outer(k, k) * np.pi / (n + 1))
    return a, lam, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["eigen", "newton", "higher_order"])
@pytest.mark.parametrize("n,alpha,beta", [(9, 2.0, 0.5), (17, 1.0, -0.25), (33, 3.0, 1.0)])
@pytest.mark.parametrize("root", [2, 4])
def test_tridiagonal_analytic(dtype, method, n, alpha, beta, root):
    a, lam, v = tridiagonal(n, alpha, beta)
    ref = (v * lam ** (-1.0 / root)) @ v.T  # analytic root, independent of any eigensolver
    x, st = run_one(a, root, dtype, method=method, tolerance=ITER_TOL[dtype])
    assert st == OK
    kappa = lam.max() / lam.min()
    assert_root_close(x, ref, iter_tol(dtype, n, kappa, 1 / root))
    # Residual as in the reference test: X^(-root) ~ A.
    xr = np.linalg.matrix_power(np.linalg.inv(np.asarray(x, np.float64)), root)
    # Powering by `root` multiplies X's relative error by `root`.
    assert np.max(np.abs(xr - a)) <= root * iter_tol(dtype, n, kappa, 1.0) * np.max(np.abs(a))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["eigen", "newton", "higher_order"])
def test_scalar_multiplier_uses_float32_exponent(dtype, method):
    """[[2.0]], root 2, multiplier 1.82 -> 2^fl32(-0.91), whatever the method (SPEC §4.12)."""
    x, st = run_one(np.array([[2.0]]), 2, dtype, method=method, exponent_multiplier=1.82)
    assert st == OK
    expected = dtype(2.0 ** fl32(-0.91))
    np.testing.assert_allclose(x[0, 0], expected, rtol=2 * np.finfo(dtype).eps)
    if dtype is np.float64:  # the float32 rounding of the exponent is visible in float64
        assert abs(x[0, 0] - 2.0**-0.91) > 1e-10


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigen_reads_lower_triangle(dtype):
    """eigh uses the lower triangle of the row-major factor (torch's UPLO='L'), SPEC §5.3."""
    rng = np.random.default_rng(17)
    a = spd(rng, 6, 10.0)
    garbage = a + np.triu(rng.standard_normal((6, 6)), k=1)
    x, st = run_one(garbage, 2, dtype)
    assert st == OK
    lower = np.tril(a.astype(dtype)).astype(np.float64)
    ref = oracle_eigen(lower + np.tril(lower, -1).T, 2)
    assert_root_close(x, ref, rel_tol(dtype, 6, 10.0, 0.5))


# ------------------------------------------------------------------------------------------
# Bias correction, epsilon, PSD shift.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["eigen", "newton", "higher_order"])
def test_bias_correction_and_epsilon(dtype, method):
    rng = np.random.default_rng(3)
    a = spd(rng, 6, 10.0)
    bc, eps = 0.0975, 1e-2
    f = (a * bc).astype(dtype)
    s = [[f, np.diag(np.diag(f)), f[:1, :1]]]
    res = run(
        s,
        [4],
        dtype,
        method=method,
        bias_correction=bc,
        epsilon=eps,
        is_diagonal=[0, 1, 0],
        tolerance=ITER_TOL[dtype],
    )
    assert list(res.status) == [OK, OK, OK]
    a64 = np.asarray(f, np.float64) / bc
    tol = iter_tol(dtype, 6, 10.0, 0.25)
    assert_root_close(res.factor(0), oracle_eigen(a64, 4, eps), tol)
    assert_root_close(res.factor(1), oracle_diagonal(np.diag(np.diag(a64)), 4, eps), tol)
    np.testing.assert_allclose(
        res.factor(2)[0, 0], (a64[0, 0] + eps) ** fl32(-0.25), rtol=8 * np.finfo(dtype).eps
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_psd_shift_rank_deficient_and_indefinite(dtype):
    rng = np.random.default_rng(11)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    rank_def = (q * np.array([0.0, 0.0, 1.0, 2.0, 4.0])) @ q.T
    indefinite = (q * np.array([-1.0, 0.5, 1.0, 2.0, 3.0])) @ q.T
    eps = 0.1
    res = run([[rank_def, indefinite]], [2], dtype, epsilon=eps)
    assert list(res.status) == [OK, OK]
    # After the shift the spectrum is >= eps = 0.1 and <= ~4: kappa ~ 50.
    for f, m in enumerate([rank_def, indefinite]):
        ref = oracle_eigen(m.astype(dtype), 2, eps)
        assert_root_close(res.factor(f), ref, rel_tol(dtype, 5, 50.0, 0.5, c=100))
    # Shift of the indefinite one is by |lambda_min| = 1: eigenvalues (0, 1.5, 2, 3, 4) + eps.
    np.testing.assert_allclose(
        np.linalg.eigvalsh(np.asarray(res.factor(1), np.float64)),
        np.sort((np.array([0.0, 1.5, 2.0, 3.0, 4.0]) + eps) ** -0.5),
        rtol=rel_tol(dtype, 5, 50.0, 0.5, c=100),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_psd_shift_negative_spectrum_is_nonfinite(dtype):
    rng = np.random.default_rng(12)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    indefinite = (q * np.array([-1.0, 0.5, 1.0, 2.0])) @ q.T
    x, st = run_one(indefinite, 2, dtype, make_positive_semidefinite=False)
    assert st == NONFINITE
    assert np.isnan(x).any() and not np.any(x == SENTINEL)  # written anyway


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_psd_shift_odd_integer_power_keeps_negative_eigenvalues(dtype):
    # root 1, multiplier 1: (lambda + eps)^-1 of a negative eigenvalue is a finite negative
    # number, so the result is A^-1 (the kernel cannot form it as Y Y^T: its gemm path).
    rng = np.random.default_rng(13)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    indefinite = ((q * np.array([-2.0, -0.5, 0.5, 1.0, 2.0, 4.0])) @ q.T).astype(dtype)
    x, st = run_one(indefinite, 1, dtype, make_positive_semidefinite=False, epsilon=0.0)
    assert st == OK
    ref = oracle_eigen(indefinite, 1, 0.0, psd=False)
    np.testing.assert_allclose(x, ref, atol=200 * np.finfo(dtype).eps * np.abs(ref).max())
    np.testing.assert_allclose(ref, np.linalg.inv(np.asarray(indefinite, np.float64)), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 63, 64, 65, 150])
def test_eigen_root_is_exactly_symmetric(dtype, n):
    # the root is formed on one triangle and mirrored (in 64 x 64 tiles): both triangles
    # equal bit for bit, every entry written, and the values those of the oracle
    rng = np.random.default_rng(n)
    kappa = 20.0
    a = spd(rng, n, kappa).astype(dtype)
    x, st = run_one(a, 4, dtype, epsilon=1e-12)
    assert st == OK
    assert not np.any(x == SENTINEL)
    np.testing.assert_array_equal(x, x.T)
    assert_root_close(x, oracle_eigen(a, 4, 1e-12), rel_tol(dtype, n, kappa, 0.25))


# ------------------------------------------------------------------------------------------
# Diagonal flags.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_diagonal_flag_tracking(dtype):
    rng = np.random.default_rng(5)
    dneg = np.diag([2.0, -1.0, 3.0])  # diagonal and indefinite: tells the two methods apart
    full = spd(rng, 3, 5.0)
    mats = [[dneg, full, dneg], [full]]
    eps = 0.5  # keeps -1 + eps negative (NaN on the diagonal path), the shifted spectrum > 0
    res = run(mats, [2, 2], dtype, is_diagonal=[1, 1, 0, 1], active=[True, False], epsilon=eps)
    assert list(res.is_diagonal) == [1, 0, 0, 1]  # inactive block's flag left alone
    assert list(res.status) == [NONFINITE, OK, OK, INACTIVE]
    # Flag set: diagonal method, no PSD shift, so sqrt(-1) gives NaN only on that entry.
    x0 = res.factor(0)
    assert np.isnan(x0[1, 1]) and x0[0, 1] == 0 and x0[1, 0] == 0
    np.testing.assert_allclose(np.diag(x0)[[0, 2]], [2.5**-0.5, 3.5**-0.5], rtol=1e-6)
    # Flag cleared: eigen method.
    ref1 = oracle_eigen(full.astype(dtype), 2, eps)
    assert_root_close(res.factor(1), ref1, rel_tol(dtype, 3, 5.0))
    # Flag never set: eigen method, whose PSD shift makes the spectrum (0, 3, 4) + eps.
    assert_root_close(res.factor(2), oracle_eigen(dneg, 2, eps), rel_tol(dtype, 3, 9.0))
    assert np.all(res.factor(3) == SENTINEL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_diagonal_method_ignores_configured_method(dtype):
    """A diagonal factor with the flag set uses §5.2 even for Newton with a multiplier != 1,
    which the configured method would reject."""
    d = np.diag([1.0, 4.0, 9.0])
    res = run([[d]], [2], dtype, is_diagonal=[1], method="newton", exponent_multiplier=2.0)
    assert res.status[0] == OK
    np.testing.assert_allclose(res.factor(0), np.diag([1.0, 0.25, 1 / 9]), rtol=4 * np.finfo(dtype).eps)


# ------------------------------------------------------------------------------------------
# Non-finite factors, failures, inactive blocks.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["eigen", "newton", "higher_order"])
def test_nan_inf_factors_leave_output_untouched(dtype, method):
    good = np.eye(3) * 4.0
    with_nan = good.copy()
    with_nan[0, 1] = np.nan
    with_inf = good.copy()
    with_inf[2, 2] = np.inf
    both = with_inf.copy()
    both[1, 0] = np.nan
    one_nan = np.array([[np.nan]])
    mats = [[with_nan, good], [with_inf], [both, one_nan]]
    res = run(mats, [2, 2, 2], dtype, method=method)
    assert list(res.status) == [FACTOR_NAN, OK, FACTOR_INF, FACTOR_NAN, FACTOR_NAN]
    for f in (0, 2, 3, 4):
        assert np.all(res.factor(f) == SENTINEL)
    np.testing.assert_allclose(res.factor(1), np.eye(3) * 0.5, rtol=1e-5)


def test_bias_correction_overflow_is_an_inf_factor():
    """The checks apply to F / bias_correction in the working dtype (SPEC §4.6.2)."""
    f = np.eye(2) * 3e38
    x, st = run_one(f, 2, np.float32, bias_correction=0.5)
    assert st == FACTOR_INF and np.all(x == SENTINEL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_inactive_writes_nothing(dtype):
    rng = np.random.default_rng(8)
    mats = [[spd(rng, 4, 3.0), spd(rng, 2, 3.0)], [spd(rng, 3, 3.0)]]
    res = run(mats, [2, 2], dtype, active=[False, False], is_diagonal=[1, 1, 1])
    assert list(res.status) == [INACTIVE] * 3
    assert np.all(res.out == SENTINEL)
    assert list(res.is_diagonal) == [1, 1, 1]


@pytest.mark.parametrize("method", ["newton", "higher_order"])
def test_iterative_methods_reject_exponent_multiplier(method):
    """SPEC §5.1 raises ValueError there; a protected step keeps the previous root (FAILED).
    The 1x1 shortcut has no such check."""
    mats = [[np.eye(3) * 2.0, np.array([[2.0]])]]
    res = run(mats, [2], np.float64, method=method, exponent_multiplier=2.0)
    assert list(res.status) == [FAILED, OK]
    assert np.all(res.factor(0) == SENTINEL)
    np.testing.assert_allclose(res.factor(1)[0, 0], 2.0 ** fl32(-1.0))


# ------------------------------------------------------------------------------------------
# Coupled Newton and higher order: the iterations themselves.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("root", [2, 3, 4])
@pytest.mark.parametrize("iters", [1, 3])
def test_newton_iterates_like_oracle(root, iters):
    """With a capped iteration count the float64 kernel follows §5.4 step by step."""
    rng = np.random.default_rng(root)
    a = spd(rng, 7, 30.0, scale=2.0)
    x, st = run_one(a, root, np.float64, method="newton", max_iterations=iters, epsilon=1e-3)
    ref, converged = oracle_newton(a, root, 1e-3, iters, 1e-6)
    assert not converged and st == MAX_ITERS
    np.testing.assert_allclose(x, ref, rtol=1e-10, atol=1e-12 * np.max(np.abs(ref)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_newton_max_iters_status_and_output(dtype):
    rng = np.random.default_rng(21)
    a = spd(rng, 5, 100.0)
    x, st = run_one(a, 2, dtype, method="newton", max_iterations=1)
    assert st == MAX_ITERS
    ref, _ = oracle_newton(a.astype(dtype), 2, 0.0, 1, 1e-6)
    assert_root_close(x, ref, 100 * float(np.finfo(dtype).eps))


@pytest.mark.parametrize("order", [2, 3, 4, 6])
@pytest.mark.parametrize("root", [2, 4])
def test_higher_order_iterates_like_oracle(order, root):
    rng = np.random.default_rng(order + 10 * root)
    a = spd(rng, 6, 20.0, scale=0.5)
    kw = dict(epsilon=1e-4, rel_epsilon=1e-3, max_iterations=3, tolerance=1e-30)
    x, st = run_one(a, root, np.float64, method="higher_order", order=order, **kw)
    ref, flag, true_err = oracle_higher_order(a, root, order, 1e-4, 1e-3, 3, 1e-30)
    expected = FAILED if true_err > 0.1 else (MAX_ITERS if flag == "max_iters" else OK)
    assert st == expected
    if st != FAILED:
        np.testing.assert_allclose(x, ref, rtol=1e-9, atol=1e-12 * np.max(np.abs(ref)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", [2, 3, 5])
def test_higher_order_converges_with_rel_epsilon(dtype, order):
    rng = np.random.default_rng(order)
    a = spd(rng, 9, 40.0)
    rel = 1e-2
    x, st = run_one(
        a, 4, dtype, method="higher_order", order=order, rel_epsilon=rel, tolerance=ITER_TOL[dtype]
    )
    assert st == OK
    eps = rel * np.abs(a.astype(dtype).astype(np.float64)).sum(axis=1).max()
    ref = oracle_eigen(a.astype(dtype), 4, eps)
    assert_root_close(x, ref, iter_tol(dtype, 9, 40.0, 0.25))


def test_higher_order_true_error_check_fails():
    """One Newton step only (max_iterations=1) on an ill-conditioned factor: the final check
    max|A_r X^p - I| > 0.1 raises in the reference (FAILED), leaving out untouched."""
    rng = np.random.default_rng(4)
    a = spd(rng, 5, 1e4)
    _, flag, true_err = oracle_higher_order(a, 2, 3, 0.0, 0.0, 1, 1e-8)
    assert true_err > 0.1
    x, st = run_one(a, 2, np.float64, method="higher_order", max_iterations=1, tolerance=1e-8)
    assert st == FAILED and np.all(x == SENTINEL)


def test_higher_order_infinite_norm_fails():
    """Finite entries whose row sum overflows float32: ||A||_inf is Inf (SPEC §5.5 step 3)."""
    a = np.array([[3e38, 3e38], [3e38, 3e38]])
    x, st = run_one(a, 2, np.float32, method="higher_order")
    assert st == FAILED and np.all(x == SENTINEL)


def test_higher_order_stall_is_early_stop_not_max_iters():
    """float32 cannot reach tolerance 1e-20; the iteration stalls and stops early (counted OK),
    well before max_iterations."""
    rng = np.random.default_rng(9)
    a = spd(rng, 8, 10.0)
    x, st = run_one(a, 2, np.float32, method="higher_order", tolerance=1e-20, max_iterations=200)
    assert st == OK
    assert_root_close(x, oracle_eigen(a.astype(np.float32), 2), rel_tol(np.float32, 8, 10.0))


def test_root_below_one_fails():
    """A root of 0 raises in the reference on every path (ZeroDivisionError / "Root 0 should be
    positive!"); the kernel reports FAILED and writes nothing."""
    res = run([[np.eye(2), np.array([[3.0]])]], [0], np.float64, is_diagonal=[1, 0])
    assert list(res.status) == [FAILED, FAILED]
    assert np.all(res.out == SENTINEL)


# ------------------------------------------------------------------------------------------
# Argument errors.
# ------------------------------------------------------------------------------------------


def test_invalid_higher_order_order_is_rejected():
    table, _ = make_table([([2], 2)])
    f = np.eye(2).ravel()
    with pytest.raises(ValueError):
        _backend.root_inverse(
            np.zeros(4),
            f,
            table,
            np.ones(1, np.uint8),
            **{**DEFAULTS, "method": "higher_order", "order": 1},
            is_diagonal=np.zeros(1, np.uint8),
            status_out=np.zeros(1, np.int32),
        )


def test_large_root_is_exact_power():
    """Binary powering with an odd, large root: X^(-r) recovers A."""
    a = np.diag([1.0, 2.0]) + 0.1
    x, st = run_one(a, 7, np.float64, method="newton", tolerance=1e-12)
    assert st == OK
    np.testing.assert_allclose(np.linalg.matrix_power(np.linalg.inv(x), 7), a, rtol=1e-9)
    assert math.isfinite(float(x.sum()))


# ------------------------------------------------------------------------------------------
# Threads across blocks (num_threads).
# ------------------------------------------------------------------------------------------

# Mixed orders and sizes; estimated work over 3 x PARALLEL_MIN_COST, so 3 threads are used.
THREAD_BLOCKS = [((64,), 2), ((40, 3), 4), ((17, 1, 5), 6), ((), 2), ((48, 48), 4),
                 ((0, 7), 2), ((33,), 8), ((2, 60), 2), ((9, 9, 9), 4), ((50, 20), 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["eigen", "newton", "higher_order"])
def test_threads_bitwise_identical(dtype, method):
    """num_threads 1, 2, 3: the same roots, statuses and diagonal flags, bit for bit, with
    inactive blocks, a NaN and an Inf factor, and diagonal flags set and cleared."""
    rng = np.random.default_rng(21)
    table, offsets = make_table(THREAD_BLOCKS)
    dims = [d for ds, _ in THREAD_BLOCKS for d in ds]
    mats = [spd(rng, d, 30.0) for d in dims]
    mats[dims.index(40)][3, 5] = np.nan         # NaN factor (active block 1)
    mats[dims.index(60)][0, 0] = np.inf         # Inf factor (active block 7)
    mats[dims.index(5)] = np.diag(rng.random(5) + 0.5)
    factors = np.concatenate([m.astype(dtype).ravel() for m in mats])
    active = np.ones(len(THREAD_BLOCKS), np.uint8)
    active[[4, 6]] = 0
    # a lower bound of the kernel's estimate (n^2 term of root_inverse_cost), in ns
    active_dims = [d for (ds, _), a in zip(THREAD_BLOCKS, active) if a for d in ds]
    assert sum(100 * d * d for d in active_dims) > 3 * _backend.PARALLEL_MIN_COST
    diag0 = np.zeros(len(dims), np.uint8)
    diag0[[dims.index(5), dims.index(64)]] = 1  # one stays diagonal, one is cleared
    kw = {**DEFAULTS, "method": method, "tolerance": ITER_TOL[dtype]}
    results = []
    with _backend.single_threaded_blas():
        for threads in (1, 2, 3):
            out = np.full_like(factors, SENTINEL)
            diag = diag0.copy()
            status = np.full(len(dims), -1, np.int32)
            _backend.root_inverse(out, factors, table, active, **kw, is_diagonal=diag,
                                  status_out=status, num_threads=threads)
            results.append((out, status, diag))
    out1, status1, diag1 = results[0]
    for out, status, diag in results[1:]:
        np.testing.assert_array_equal(out.view(np.uint8), out1.view(np.uint8))
        np.testing.assert_array_equal(status, status1)
        np.testing.assert_array_equal(diag, diag1)
    assert status1[dims.index(40)] == FACTOR_NAN and status1[dims.index(60)] == FACTOR_INF
    assert status1[dims.index(48)] == INACTIVE and status1[dims.index(33)] == INACTIVE
    assert diag1[dims.index(5)] == 1 and diag1[dims.index(64)] == 0
    f = dims.index(64)  # one result against the oracle
    assert status1[f] == OK
    ref = oracle_eigen(mats[f].astype(dtype), 2)
    assert_root_close(out1[offsets[f]:offsets[f] + 64 * 64].reshape(64, 64), ref,
                      iter_tol(dtype, 64, 30.0, 0.5))
