"""The CUDA eigenvalue-corrected Shampoo (SOAP) kernels (csrc/cuda/soap_cuda.h) through
_soap_backend, against the CPU kernels (themselves pinned to NumPy by tests/test_kernels_soap.py)
and against NumPy directly; and DistributedShampoo with SOAP on CUDA parameters against the
same optimizer on CPU parameters. Skips without a GPU or the CUDA emulator
(tools/cuda_emu/README.md), like tests/test_cuda_kernels.py.

Tolerances, CUDA against CPU:
  * soap_direction: blocks without an eigenbasis (Q_0 zero) and order-0 blocks run only the
    elementwise arithmetic, which is the CPU's operation for operation (-fmad=false): bitwise
    equal, out and D. Blocks with a basis go through cuBLAS GEMMs summed in another order:
    rtol 1e-5 (float32) / 1e-12 (float64) of the buffer's scale, and the NumPy oracle at
    tests/test_kernels_soap.py's tolerances. Inactive blocks are left bitwise untouched.
  * eigenbasis: eigenvectors of factors with distinct eigenvalues agree up to each column's
    sign (cuSOLVER's Jacobi/syevd vs LAPACK's syevd), to 1e-4 (float32) / 1e-10 (float64);
    the warm-started QR step (geqrf + orgqr) with NumPy's and the CPU's likewise (2e-4 in
    float32: a few power-iteration steps amplify rounding); statuses and diagonal flags
    exactly.
  * the optimizer (eigh and QR configs): SOAP's direction does not depend on the eigenvectors'
    signs, so CUDA and CPU parameters agree to 1e-9 (float64) after several steps, 4e-4 in
    float32 (twice tests/test_soap.py's bound against its oracle).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from block_tables import make_layout
from test_kernels_soap import (
    SHAPES,
    _inputs,
    _np_qr_step,
    _same_up_to_sign,
    _spd_factors,
    _want_bases,
    rotate,
)

from distributed_shampoo import _backend as B
from distributed_shampoo import _soap_backend as S


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if not B.cuda_available():
        return "the CUDA kernels (distributed_shampoo._C_cuda) are not built"
    return None


pytestmark = pytest.mark.skipif(_cuda_skip_reason() is not None, reason=str(_cuda_skip_reason()))

DEVICE = torch.device("cuda", 0)
SENTINEL = -7.25
RTOL = {np.float32: 1e-5, np.float64: 1e-12}
# one more layout: dimension 33 (GEMMs past a warp), equal blocks of 8 (batched groups)
WIDE_SHAPES = [(33, 8), (16, 8, 3), (8,)]


def _dev(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE)


def _host(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy()


def _no_basis(lay, bases, b) -> bool:
    return not _want_bases(lay, bases, b)


def _direction_both(lay, active, bases, grads, moment_grads, D0, *, shared=False, with_out=True,
                    **scalars):
    """soap_direction on the CPU and on CUDA from the same inputs: (out, D) of each."""
    dtype = bases.dtype.type
    out_cpu = np.full(lay.block_numel, SENTINEL, dtype=dtype) if with_out else None
    D_cpu = D0.copy()
    mg_cpu = grads if shared else moment_grads
    S.soap_direction(out_cpu, grads if with_out else None, mg_cpu, bases, D_cpu, lay.table, active,
                     **scalars)
    kt = B.KernelTable(torch.from_numpy(lay.table), DEVICE)
    g = _dev(grads) if grads is not None else None
    mg = g if shared else (_dev(moment_grads) if moment_grads is not None else None)
    out = torch.full((lay.block_numel,), SENTINEL, dtype=torch.from_numpy(bases).dtype,
                     device=DEVICE) if with_out else None
    D = _dev(D0)
    S.soap_direction(out, g if with_out else None, mg, _dev(bases), D, kt, _dev(active), **scalars)
    return (out_cpu, D_cpu), (_host(out) if with_out else None, _host(D))


def _assert_blocks(lay, active, bases, cpu, cuda, D0, dtype):
    (out_cpu, D_cpu), (out, D) = cpu, cuda
    scale = max(np.abs(D_cpu).max(), 1.0)
    out_scale = max(np.abs(out_cpu).max(), 1.0) if out is not None else 1.0
    for b in range(len(lay.blocks)):
        got_D, want_D = lay.block_view(D, b), lay.block_view(D_cpu, b)
        if not active[b]:
            assert np.array_equal(got_D, lay.block_view(D0, b))
            if out is not None:
                assert np.all(lay.block_view(out, b) == SENTINEL)
            continue
        if _no_basis(lay, bases, b):  # elementwise only: the CPU's arithmetic, bitwise
            assert np.array_equal(got_D, want_D), f"block {b}: D not bitwise the CPU's"
            if out is not None:
                assert np.array_equal(lay.block_view(out, b), lay.block_view(out_cpu, b))
            continue
        np.testing.assert_allclose(got_D, want_D, rtol=0, atol=RTOL[dtype] * scale)
        if out is not None:
            np.testing.assert_allclose(lay.block_view(out, b), lay.block_view(out_cpu, b), rtol=0,
                                       atol=10 * RTOL[dtype] * out_scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta2,root", [(0.95, 2), (1.0, 1), (0.9, 3)])
def test_direction_matches_cpu_and_numpy(dtype, beta2, root):
    rng, lay, active, bases, grads, D0 = _inputs(dtype, 3, root)
    moment_grads = rng.standard_normal(lay.block_numel).astype(dtype)
    scalars = dict(beta2=beta2, bias_correction=0.3, epsilon=1e-3)
    cpu, cuda = _direction_both(lay, active, bases, grads, moment_grads, D0, **scalars)
    _assert_blocks(lay, active, bases, cpu, cuda, D0, dtype)
    tol = 1e-4 if dtype == np.float32 else 1e-11
    out, D = cuda
    for b in range(len(lay.blocks)):  # the NumPy oracle, as tests/test_kernels_soap.py
        if not active[b]:
            continue
        Qs = _want_bases(lay, bases, b)
        Rm = rotate(lay.block_view(moment_grads, b).astype(np.float64), Qs)
        d0 = lay.block_view(D0, b).astype(np.float64)
        want_D = d0 + Rm**2 if beta2 == 1.0 else beta2 * d0 + (1 - beta2) * Rm**2
        np.testing.assert_allclose(lay.block_view(D, b), want_D, rtol=tol, atol=tol)
        R = rotate(lay.block_view(grads, b).astype(np.float64), Qs)
        want = rotate(R / (want_D / 0.3 + 1e-3) ** (1.0 / root), Qs, back=True)
        np.testing.assert_allclose(lay.block_view(out, b), want, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_direction_moment_only_shared_gradient_and_wide_blocks(dtype):
    _, lay, active, bases, grads, D0 = _inputs(dtype, 4)
    scalars = dict(beta2=0.9, bias_correction=0.7, epsilon=1e-6)
    cpu, cuda = _direction_both(lay, active, bases, None, grads, D0, with_out=False, **scalars)
    _assert_blocks(lay, active, bases, cpu, cuda, D0, dtype)
    cpu, cuda = _direction_both(lay, active, bases, grads, None, D0, shared=True, **scalars)
    _assert_blocks(lay, active, bases, cpu, cuda, D0, dtype)
    # wide and batched blocks, every one with a basis
    rng = np.random.default_rng(11)
    lay = make_layout(WIDE_SHAPES, max_dim=33)
    active = np.ones(len(lay.blocks), np.uint8)
    active[-1] = 0
    Q = np.zeros(lay.factor_numel)
    for b, blk in enumerate(lay.blocks):
        for view, d in zip(lay.factor_views(Q, b), blk.shape):
            view[...] = np.linalg.qr(rng.standard_normal((d, d)))[0]
    grads = rng.standard_normal(lay.block_numel).astype(dtype)
    D0 = rng.random(lay.block_numel).astype(dtype)
    cpu, cuda = _direction_both(lay, active, Q.astype(dtype), grads, rng.standard_normal(
        lay.block_numel).astype(dtype), D0, **scalars)
    _assert_blocks(lay, active, Q.astype(dtype), cpu, cuda, D0, dtype)


def test_direction_refuses_bad_arguments_as_the_cpu():
    _, lay, active, bases, grads, D = _inputs(np.float64, 6)
    kt = B.KernelTable(torch.from_numpy(lay.table), DEVICE)
    g, q, d, a = _dev(grads), _dev(bases), _dev(D), _dev(active)
    out = torch.zeros_like(g)
    for kw, match in ((dict(beta2=0.9, bias_correction=0.0), "bias_correction"),
                      (dict(beta2=1.5, bias_correction=1.0), "beta2")):
        with pytest.raises(ValueError, match=match):
            S.soap_direction(out, g, None, q, d, kt, a, epsilon=0.0, **kw)
    with pytest.raises(ValueError, match="'grads' is required"):
        S.soap_direction(out, None, g, q, d, kt, a, beta2=0.9, bias_correction=1.0, epsilon=0.0)
    with pytest.raises(ValueError, match="moment_grads"):
        S.soap_direction(None, g, None, q, d, kt, a, beta2=0.9, bias_correction=1.0, epsilon=0.0)
    with pytest.raises(ValueError):  # a basis buffer too short for the table
        S.soap_direction(out, g, None, q[:-1].clone(), d, kt, a, beta2=0.9, bias_correction=1.0,
                         epsilon=0.0)
    with pytest.raises(TypeError, match="KernelTable"):
        S.soap_direction(out, g, None, q, d, lay.table, a, beta2=0.9, bias_correction=1.0,
                         epsilon=0.0)


def _eigenbasis_cuda(lay, F, active, diag, **kw):
    kt = B.KernelTable(torch.from_numpy(lay.table), DEVICE)
    out = torch.full((lay.factor_numel,), -3.0, dtype=torch.from_numpy(F).dtype, device=DEVICE)
    d = _dev(diag)
    status = torch.full((lay.factor_count,), -1, dtype=torch.int32)
    S.eigenbasis(out, _dev(F), None, kt, _dev(active), method="eigh",
                 **{"retry_double_precision": True, "max_iterations": 0, "tolerance": 0.0, **kw},
                 is_diagonal=d, status_out=status)
    return _host(out), _host(d), status.numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shapes,max_dim", [(SHAPES, 4), ([(40, 5), (6, 6)], 40)], ids=["small", "wide"])
def test_eigh_eigenbasis_matches_numpy_and_cpu_statuses(dtype, shapes, max_dim):
    rng = np.random.default_rng(7)
    lay = make_layout(shapes, max_dim=max_dim)
    F = _spd_factors(lay, rng, dtype)
    active = np.ones(len(lay.blocks), np.uint8)
    active[-1] = 0
    diag = np.zeros(lay.factor_count, np.uint8)
    out, d, status = _eigenbasis_cuda(lay, F, active, diag)
    cpu_status, cpu_diag = np.zeros(lay.factor_count, np.int32), diag.copy()
    S.eigenbasis(np.zeros_like(F), F, None, lay.table, active, method="eigh",
                 retry_double_precision=True, max_iterations=0, tolerance=0.0,
                 is_diagonal=cpu_diag, status_out=cpu_status)
    np.testing.assert_array_equal(status, cpu_status)
    np.testing.assert_array_equal(d, cpu_diag)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for b, blk in enumerate(lay.blocks):
        for k, (got, f) in enumerate(zip(lay.factor_views(out, b), lay.factor_views(F, b))):
            if not active[b]:
                assert np.all(got == -3.0)
            elif blk.shape[k] == 1:
                assert got[0, 0] == 1.0
            else:
                _same_up_to_sign(got.astype(np.float64), np.linalg.eigh(f.astype(np.float64))[1], tol)


def test_eigenbasis_diagonal_nonfinite_flags_and_qr_needs_previous():
    lay = make_layout([(3,), (2, 2)], max_dim=8)
    F = np.zeros(lay.factor_numel)
    f0, = lay.factor_views(F, 0)
    f0[...] = np.diag([3.0, 1.0, 2.0])  # diagonal: identity, the flag stays set
    a, c = lay.factor_views(F, 1)
    a[...] = [[1.0, np.nan], [np.nan, 1.0]]
    c[...] = [[2.0, 1.0], [1.0, np.inf]]
    out, diag, status = _eigenbasis_cuda(lay, F, np.ones(2, np.uint8), np.ones(lay.factor_count, np.uint8))
    np.testing.assert_array_equal(lay.factor_views(out, 0)[0], np.eye(3))
    assert list(status) == [B.ROOT_OK, B.ROOT_FACTOR_NAN, B.ROOT_FACTOR_INF]
    assert list(diag) == [1, 0, 0]
    assert np.all(lay.factor_views(out, 1)[0] == -3.0)  # not written
    kt = B.KernelTable(torch.from_numpy(lay.table), DEVICE)
    with pytest.raises(ValueError, match="'previous' is required"):
        S.eigenbasis(_dev(np.zeros_like(F)), _dev(F), None, kt, _dev(np.ones(2, np.uint8)),
                     method="qr", retry_double_precision=True, max_iterations=1, tolerance=0.0,
                     is_diagonal=_dev(np.ones(3, np.uint8)),
                     status_out=torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("iters", [0, 1, 3])
def test_qr_eigenbasis_matches_numpy_and_cpu(dtype, iters):
    """The warm-started QR step (geqrf + orgqr) against NumPy's, as tests/test_kernels_soap.py;
    a zero previous basis (block 1) takes the eigendecomposition; statuses as the CPU's."""
    rng = np.random.default_rng(8)
    lay = make_layout([(5, 3), (6,), (4, 4), (40,)], max_dim=40)
    F = _spd_factors(lay, rng, np.float64)
    previous = np.zeros(lay.factor_numel)
    for b in range(len(lay.blocks)):
        if b == 1:
            continue
        for view, f in zip(lay.factor_views(previous, b), lay.factor_views(F, b)):
            exact = np.linalg.eigh(f)[1]
            view[...] = np.linalg.qr(exact + 0.05 * rng.standard_normal(f.shape))[0][:, ::-1]
    F, previous = F.astype(dtype), previous.astype(dtype)
    active = np.ones(len(lay.blocks), np.uint8)
    kw = dict(method="qr", retry_double_precision=True, max_iterations=iters, tolerance=1e-5)
    kt = B.KernelTable(torch.from_numpy(lay.table), DEVICE)
    out = torch.zeros(lay.factor_numel, dtype=torch.from_numpy(F).dtype, device=DEVICE)
    status = torch.full((lay.factor_count,), -1, dtype=torch.int32)
    S.eigenbasis(out, _dev(F), _dev(previous), kt, _dev(active), **kw,
                 is_diagonal=_dev(np.zeros(lay.factor_count, np.uint8)), status_out=status)
    cpu, cpu_status = np.zeros_like(F), np.zeros(lay.factor_count, np.int32)
    S.eigenbasis(cpu, F, previous, lay.table, active, **kw,
                 is_diagonal=np.zeros(lay.factor_count, np.uint8), status_out=cpu_status)
    np.testing.assert_array_equal(status.numpy(), cpu_status)
    assert np.all(cpu_status == B.ROOT_OK)
    out = _host(out).astype(np.float64)
    tol = 2e-4 if dtype == np.float32 else 1e-10
    for b in range(len(lay.blocks)):
        views = zip(lay.factor_views(out, b), lay.factor_views(cpu, b), lay.factor_views(F, b),
                    lay.factor_views(previous, b))
        for got, want_cpu, f, prev in views:
            f, prev = f.astype(np.float64), prev.astype(np.float64)
            want = np.linalg.eigh(f)[1] if b == 1 else _np_qr_step(f, prev, iters, 1e-5)
            _same_up_to_sign(got, want, tol)
            _same_up_to_sign(got, want_cpu.astype(np.float64), tol)


def _emulator():
    import sys

    emu = getattr(sys.modules.get("torch_emu"), "_installed", None)
    if emu is None:
        pytest.skip("failure injection needs the CUDA emulator (tools/cuda_emu)")
    emu.reset()
    return emu


@pytest.mark.parametrize("retry", [True, False])
def test_float32_solver_failure_is_retried_or_reported(retry):
    emu = _emulator()
    try:
        rng = np.random.default_rng(9)
        lay = make_layout([(5,), (5,), (3,)], max_dim=8)
        F = _spd_factors(lay, rng, np.float32)
        emu.solver.emu_solver_fail_matrix(float(lay.factor_views(F, 1)[0][0, 0]), 32)
        out, _, status = _eigenbasis_cuda(lay, F, np.ones(3, np.uint8), np.zeros(3, np.uint8),
                                          retry_double_precision=retry)
        middle = B.ROOT_RETRIED_DOUBLE if retry else B.ROOT_FAILED
        assert status.tolist() == [B.ROOT_OK, middle, B.ROOT_OK]
        for b in range(3):
            got, f = lay.factor_views(out, b)[0], lay.factor_views(F, b)[0]
            if b == 1 and not retry:
                assert np.all(got == -3.0)  # a failed factor's basis is not written
            else:
                _same_up_to_sign(got.astype(np.float64), np.linalg.eigh(f.astype(np.float64))[1], 1e-4)
    finally:
        emu.reset()


# ------------------------------------------------------------------ the optimizer on CUDA
def _steps(device, shapes, steps, config, precision, **hp):
    from distributed_shampoo import DistributedShampoo

    g = torch.Generator().manual_seed(0)
    dtype = precision.factor_matrix_dtype
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype).to(device)) for s in shapes]
    opt = DistributedShampoo(params, preconditioner_config=config, precision_config=precision, **hp)
    for t in range(steps):
        gg = torch.Generator().manual_seed(1000 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gg, dtype=dtype).to(device)
        opt.step()
    return [p.detach().cpu() for p in params], opt


# As tests/test_soap.py: at frequency 1 every eigenbasis is computed where D has seen only the
# gradients whose span the factor holds; at frequency 2, 2-d blocks whose factors are full rank
# by then (elsewhere an eigenbasis is defined only up to a rotation of a repeated eigenvalue's
# eigenspace, which two eigensolvers need not pick alike).
# (QR warm-starts from the previous eigenbasis: its first one waits for full-rank factors.)
@pytest.mark.parametrize("qr,shapes,hp", [
    (False, [(5, 3), (7,), (6, 9), (), (4, 3)],
     dict(betas=(0.9, 0.95), precondition_frequency=1, momentum=0.5, weight_decay=0.01)),
    (False, [(4, 3), (8, 6)], dict(betas=(0.0, 0.999), precondition_frequency=2, inv_root_override=[0, 4, 3])),
    (True, [(4, 3), (8, 6)], dict(betas=(0.9, 0.99), precondition_frequency=2)),
], ids=["adam+momentum", "fused-root4", "soap-qr"])
def test_optimizer_steps_match_the_cpu_engine(qr, shapes, hp):
    from distributed_shampoo import DefaultEigenvalueCorrectedShampooConfig, DefaultSOAPConfig, PrecisionConfig

    f64 = PrecisionConfig(*(torch.float64,) * 8)
    config = DefaultSOAPConfig if qr else DefaultEigenvalueCorrectedShampooConfig
    kw = dict(lr=0.01, epsilon=1e-10, max_preconditioner_dim=4, **hp)
    cpu, _ = _steps("cpu", shapes, 6, config, f64, **kw)
    cuda, _ = _steps(DEVICE, shapes, 6, config, f64, **kw)
    start = _steps("cpu", shapes, 0, config, f64, **kw)[0]
    assert max(float((p - q).abs().max()) for p, q in zip(cpu, start)) > 1e-3  # not vacuous
    for p, q in zip(cuda, cpu):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)


def test_float32_optimizer_steps_match_the_cpu_engine():
    from distributed_shampoo import DefaultEigenvalueCorrectedShampooConfig, PrecisionConfig

    kw = dict(lr=0.01, epsilon=1e-8, max_preconditioner_dim=4, betas=(0.9, 0.99),
              precondition_frequency=2)
    shapes = [(4, 3), (8, 6)]
    cpu, _ = _steps("cpu", shapes, 4, DefaultEigenvalueCorrectedShampooConfig, PrecisionConfig(), **kw)
    cuda, _ = _steps(DEVICE, shapes, 4, DefaultEigenvalueCorrectedShampooConfig, PrecisionConfig(), **kw)
    for p, q in zip(cuda, cpu):  # tests/test_soap.py holds float32 to its oracle at 2e-4
        torch.testing.assert_close(p, q, rtol=4e-4, atol=4e-4)
