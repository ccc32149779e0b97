"""The CUDA extension is built wherever a CUDA toolkit is (so CI, which has nvcc and no GPU,
compiles every CUDA source), and what can be checked without a GPU is checked here."""

import os
import shutil

import pytest
import torch

from distributed_shampoo import _backend


def _toolkit_present() -> bool:
    """setup.py builds _C_cuda whenever it finds nvcc (PATH or CUDA_HOME), unless told not to."""
    home = os.environ.get("CUDA_HOME")
    nvcc = shutil.which("nvcc") or (home and os.path.isfile(os.path.join(home, "bin", "nvcc")))
    return bool(nvcc) and os.environ.get("SHAMPOO_BUILD_CUDA") != "0"


needs_toolkit = pytest.mark.skipif(
    not _toolkit_present(), reason="no CUDA toolkit here: the CUDA extension is not built"
)


@needs_toolkit
def test_cuda_extension_is_built_and_imports_without_a_gpu() -> None:
    from distributed_shampoo import _C_cuda

    assert _backend._C_cuda is _C_cuda
    info = _C_cuda.library_info()
    assert set(info) == {"loaded", "batched_syev"}
    for op in ("gather", "scatter", "moments", "finish", "packed_commit", "factor_update",
               "precondition", "root_inverse", "sym_pack", "sym_unpack"):
        for dtype in ("float32", "float64"):
            assert (op, dtype, "cuda") in _backend._ENTRY


@needs_toolkit
def test_cuda_entry_points_reject_cpu_tensors_with_a_clear_error() -> None:
    """Argument checking happens in the binding before any CUDA call, so it runs here."""
    from distributed_shampoo import _C_cuda

    table = torch.from_numpy(_backend.block_plan((4, 3), 8))
    grads = torch.zeros(12)
    active = torch.ones(1, dtype=torch.uint8)
    fail = torch.full((2,), _backend.FAIL_NONE, dtype=torch.int64)
    with pytest.raises(TypeError, match="grad_blocks.*must be a CUDA tensor"):
        _C_cuda.gather_f32(0, grads, None, grads.clone(), None, table, table, active, fail, 0.0, 1)


def test_cuda_entry_needs_a_kernel_table() -> None:
    """A CUDA call with a plain table is refused before anything touches the device."""
    table = torch.from_numpy(_backend.block_plan((4, 3), 8))
    with pytest.raises(TypeError, match="KernelTable"):
        _backend._cuda_table("gather", table, torch.zeros(1))


def test_kernel_table_on_cpu_shares_the_host_table() -> None:
    table = _backend.block_plan((5, 7, 3), 4)
    kt = _backend.KernelTable(table, "cpu")
    assert kt.nblocks == 4 and kt.device_table is kt.host
    # (5, 7, 3) cut at 4: blocks 4x4x3, 4x3x3, 1x4x3, 1x3x3, four shapes of one block each
    plan = kt.plan_host.tolist()
    assert plan[:2] == [4, 4] and plan[-4:] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="malformed"):
        bad = table.copy()
        bad[0, _backend.BF_ORDER] = 99
        _backend.KernelTable(bad, "cpu")


def test_library_candidates_end_with_the_sonames() -> None:
    candidates = _backend._library_candidates("libcusolver")
    assert candidates[-4:] == ["libcusolver.so.13", "libcusolver.so.12", "libcusolver.so.11", "libcusolver.so"]
    assert all("libcusolver" in os.path.basename(c) for c in candidates)
