"""CUDA paths no GPU test reaches, run on the CPU emulator (tools/cuda_emu; run with
`pytest --cuda-emu tests/test_cuda_emu.py` or tools/cuda_emu/run.py): the float32 -> float64
retry, the syevd fallback, a non-default stream, two host threads, batches above 65,535,
and failures that must report their real text. Results are compared with the float64 oracle
of tests/test_kernels_matrix_root.py (NumPy eigh), never with the CUDA code itself. Skipped
when the emulator is not installed in this process."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_kernels_matrix_root import DEFAULTS, make_table, oracle_eigen, spd

from distributed_shampoo import _backend as B

EMU_DIR = os.environ.get("SHAMPOO_CUDA_EMU")
pytestmark = pytest.mark.skipif(
    not EMU_DIR or not (Path(EMU_DIR) / "build.json").exists(),
    reason="CUDA emulator not installed (pytest --cuda-emu, or tools/cuda_emu/run.py)",
)
if EMU_DIR:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools" / "cuda_emu"))

DEVICE = torch.device("cuda", 0)
ROOT_ARGS = {k: v for k, v in DEFAULTS.items()}


@pytest.fixture
def emu():
    import torch_emu

    e = torch_emu._installed
    e.reset()
    yield e
    e.reset()


def root_problem(ns, dtype, seed=0, kappa=10.0):
    """One block per n (order 1, root 2): its SPD factor, the KernelTable, device buffers."""
    rng = np.random.default_rng(seed)
    mats = [spd(rng, n, kappa) for n in ns]
    table, offsets = make_table([([n], 2) for n in ns])
    factors = torch.from_numpy(np.concatenate([m.ravel() for m in mats])).to(dtype)
    kt = B.KernelTable(table, DEVICE)
    return mats, offsets, factors, kt


def run_root(kt, factors, nf, **cfg):
    out = torch.full_like(factors, -7.25).to(DEVICE)
    status = torch.full((nf,), -1, dtype=torch.int32)
    diag = torch.zeros(nf, dtype=torch.uint8).to(DEVICE)
    active = torch.ones(kt.nblocks, dtype=torch.uint8).to(DEVICE)
    B.root_inverse(out, factors.to(DEVICE), kt, active, **{**ROOT_ARGS, **cfg},
                   is_diagonal=diag, status_out=status)
    return out.cpu().double().numpy(), status.numpy()


def factor_of(out, offsets, ns, f):
    n = ns[f]
    return out[offsets[f]:offsets[f] + n * n].reshape(n, n)


def assert_matches_oracle(out, mats, offsets, ns, tol):
    for f, a in enumerate(mats):
        want = oracle_eigen(a, 2)
        got = factor_of(out, offsets, ns, f)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= tol, f"factor {f} (n={ns[f]}): relative error {err:.2e} > {tol:.0e}"


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 40])  # syevjBatched (n <= 32) and XsyevBatched
def test_float32_failure_is_retried_in_float64(emu, n):
    ns = [n, n, 3]
    mats, offsets, factors, kt = root_problem(ns, torch.float32)
    marker = float(np.float32(mats[1][0, 0]))
    emu.solver.emu_solver_fail_matrix(marker, 32)  # factor 1's float32 solve fails
    out, status = run_root(kt, factors, len(ns))
    assert status.tolist() == [B.ROOT_OK, B.ROOT_RETRIED_DOUBLE, B.ROOT_OK]
    assert emu.solver.emu_solver_calls(b"syevd") == 1  # the retry: one float64 syevd
    assert_matches_oracle(out, mats, offsets, ns, 1e-3)


def test_float32_failure_without_retry_is_reported(emu):
    ns = [6, 6]
    mats, offsets, factors, kt = root_problem(ns, torch.float32)
    emu.solver.emu_solver_fail_matrix(float(np.float32(mats[0][0, 0])), 32)
    out, status = run_root(kt, factors, 2, retry_double_precision=False)
    assert status.tolist() == [B.ROOT_FAILED, B.ROOT_OK]
    assert_matches_oracle(out[36:], mats[1:], [0], ns[1:], 1e-3)


def test_syevd_fallback_without_xsyev_batched(emu, tmp_path):
    """An older cuSOLVER (no XsyevBatched): factors above 32 go one by one through syevd."""
    import torch_emu

    old = torch_emu.Emulator(emu.dir, cusolver="libcusolver.so.11")
    assert old.module.library_info()["batched_syev"] is False
    assert old.blas_path.endswith("libcublas.so.12")  # CUDA 12's pair, as _backend pairs them
    torch_emu.use_module(old)
    try:
        ns = [33, 33, 40, 7]
        mats, offsets, factors, kt = root_problem(ns, torch.float64)
        out, status = run_root(kt, factors, len(ns))
        assert status.tolist() == [B.ROOT_OK] * 4
        assert old.solver.emu_solver_calls(b"syevd") == 3
        assert old.solver.emu_solver_calls(b"syevj") == 1
        assert_matches_oracle(out, mats, offsets, ns, 1e-10)
    finally:
        torch_emu.use_module(emu)


def test_non_default_stream(emu):
    """Every launch, copy and library call of a root step uses torch's current stream
    (the emulator raises EmuViolation otherwise); results as on the default stream."""
    ns = [4, 20, 40]
    mats, offsets, factors, kt = root_problem(ns, torch.float64)
    s = torch.cuda.Stream(DEVICE)
    assert s.cuda_stream != 0
    with torch.cuda.stream(s):
        kt2 = B.KernelTable(kt.host, DEVICE)
        out, status = run_root(kt2, factors, len(ns))
    assert status.tolist() == [B.ROOT_OK] * 3
    assert_matches_oracle(out, mats, offsets, ns, 1e-10)


def test_the_stream_check_catches_a_wrong_stream(emu):
    """The checker itself: a call handed stream A while the test expects stream B fails."""
    import torch_emu

    ns = [4]
    _, _, factors, kt = root_problem(ns, torch.float64)
    other = torch.cuda.Stream(DEVICE)
    real_stream = B._stream
    B._stream = lambda device: other.cuda_stream  # _backend passes a stream torch is not on
    try:
        raw = emu.raw.root_inverse_f64
        emu.rt.emu_rt_begin_call(0, 0)
        out = torch.zeros_like(factors).to(DEVICE)
        st = torch.zeros(1, dtype=torch.int32)
        cfg = ROOT_ARGS
        B._C_cuda = emu.raw  # unchecked entry points: the test checks by hand
        B._ENTRY[("root_inverse", "float64", "cuda")] = raw
        B.root_inverse(out, factors.to(DEVICE), kt, torch.ones(1, dtype=torch.uint8).to(DEVICE),
                       **cfg, is_diagonal=torch.zeros(1, dtype=torch.uint8).to(DEVICE),
                       status_out=st)
        import ctypes

        buf = ctypes.create_string_buffer(8192)
        n = emu.rt.emu_rt_end_call(buf, len(buf))
    finally:
        B._stream = real_stream
        torch_emu.use_module(emu)
    assert n > 0 and b"not the caller's stream" in buf.value


def test_two_threads_at_once(emu):
    """Two host threads, each on its own stream, running root steps concurrently (the
    binding releases the GIL): no handle may be re-bound under the other's feet."""
    import torch_emu

    ns = [8, 8, 12]
    mats, offsets, factors, kt = root_problem(ns, torch.float64)
    errors: list[BaseException] = []
    results: list[np.ndarray] = []

    def work():
        try:
            torch_emu.enter_thread()
            s = torch.cuda.Stream(DEVICE)
            with torch.cuda.stream(s):
                k = B.KernelTable(kt.host, DEVICE)
                for _ in range(15):
                    out, status = run_root(k, factors, len(ns))
                    assert status.tolist() == [B.ROOT_OK] * 3
                results.append(out)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{errors[0]!r}"
    for out in results:
        assert_matches_oracle(out, mats, offsets, ns, 1e-10)


def _factor_update_problem(nblocks, dims=(2,)):
    table, _ = make_table([(list(dims), 2)] * nblocks)
    kt = B.KernelTable(table, DEVICE)
    numel = int(np.prod(dims))
    nf = sum(d * d for d in dims)
    rng = np.random.default_rng(1)
    g = torch.from_numpy(rng.standard_normal(nblocks * numel))
    f = torch.zeros(nblocks * nf, dtype=torch.float64)
    return kt, g, f


def test_batches_above_65535_are_chunked(emu):
    emu.blas.emu_blas_set_max_batch(65535)
    n = 65536 + 3
    kt, g, f = _factor_update_problem(n)
    out = f.to(DEVICE)
    B.factor_update(out, out, g.to(DEVICE), kt, torch.ones(n, dtype=torch.uint8).to(DEVICE), 1.0)
    gg = g.view(n, 2).numpy()
    want = np.einsum("bi,bj->bij", gg, gg).reshape(-1)
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=1e-14, atol=1e-14)
    assert emu.blas.emu_blas_largest_batch() <= 65535


# ---- failures must say what failed ------------------------------------------------------------

def test_cublas_failure_reports_its_status(emu):
    kt, g, f = _factor_update_problem(4, (3, 5))
    emu.blas.emu_blas_fail(b"cublasDgemmBatched", 1, 13)  # CUBLAS_STATUS_EXECUTION_FAILED
    out = f.to(DEVICE)
    before = out.cpu().clone()
    with pytest.raises(RuntimeError) as info:
        B.factor_update(out, out, g.to(DEVICE), kt, torch.ones(4, dtype=torch.uint8).to(DEVICE),
                        0.5)
    assert torch.equal(out.cpu(), before)  # nothing written
    msg = str(info.value)
    assert "cublasDgemmBatched" in msg and ("13" in msg or "EXECUTION_FAILED" in msg), msg


def test_launch_failure_reports_the_cuda_error(emu):
    table, _ = make_table([([4, 3], 2)])
    kt = B.KernelTable(table, DEVICE)
    emu.rt.emu_rt_fail(b"launch", 1, 701)  # cudaErrorLaunchOutOfResources
    flag = B.new_failure_flag(DEVICE)
    g = torch.randn(12, dtype=torch.float64).to(DEVICE)
    with pytest.raises(RuntimeError) as info:
        B.gather(torch.zeros(12, dtype=torch.float64).to(DEVICE), None, g, None, kt,
                 torch.ones(1, dtype=torch.uint8).to(DEVICE), 0.0, step=1, fail=flag)
    msg = str(info.value)
    assert "too many resources requested for launch" in msg or "LaunchOutOfResources" in msg, msg


def test_no_kernel_image_is_a_clear_error(emu):
    table, _ = make_table([([4], 2)])
    kt = B.KernelTable(table, DEVICE)
    emu.rt.emu_rt_set_no_kernel_image(1)
    flag = B.new_failure_flag(DEVICE)
    g = torch.randn(4, dtype=torch.float64).to(DEVICE)
    with pytest.raises(RuntimeError) as info:
        B.gather(torch.zeros(4, dtype=torch.float64).to(DEVICE), None, g, None, kt,
                 torch.ones(1, dtype=torch.uint8).to(DEVICE), 0.0, step=1, fail=flag)
    msg = str(info.value)
    assert "no kernel image" in msg, msg
    # names the device (index, name, compute capability) and the architectures built
    assert "GPU 0 (" in msg and "sm_" in msg and f"built for SM architectures {emu.manifest['archs']};" in msg, msg


def test_injected_solver_status_is_an_error_and_writes_nothing(emu):
    """A cuSOLVER routine that fails (not a matrix that does not converge) raises."""
    ns = [5, 5]
    _, _, factors, kt = root_problem(ns, torch.float64)
    emu.solver.emu_solver_fail(b"cusolverDnDsyevjBatched", 1, 7)  # INTERNAL_ERROR
    with pytest.raises(RuntimeError, match="root_inverse"):
        run_root(kt, factors, 2)


def test_many_small_factors_in_several_solver_batches(emu):
    """Twelve 4x4 factors of one size. Full caps: one syevjBatched call. --small-caps
    (batch cap 5, solver budget 16 KiB; the reference syevjBatched needs 536 doubles a 4x4
    matrix, 4,288 bytes): 5 matrices need 21,440 bytes, so batches halve to 3 -> four calls.
    Results as the oracle's either way."""
    ns = [4] * 12
    mats, offsets, factors, kt = root_problem(ns, torch.float64)
    out, status = run_root(kt, factors, len(ns))
    assert status.tolist() == [B.ROOT_OK] * len(ns)
    small = emu.manifest["options"]["small_caps"]
    assert emu.solver.emu_solver_calls(b"syevj") == (4 if small else 1)
    assert_matches_oracle(out, mats, offsets, ns, 1e-10)
