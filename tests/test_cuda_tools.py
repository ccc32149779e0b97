"""CPU-side checks of the CUDA tooling: the header check (tools/check_cuda_headers.py), the
prepared GPU check (tools/gpu_check.sh), the matched cuBLAS/cuSOLVER pairs and the built
architectures. Nothing here needs a GPU."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from distributed_shampoo import _backend

ROOT = Path(__file__).resolve().parent.parent


def _load_header_tool():
    spec = importlib.util.spec_from_file_location("check_cuda_headers", ROOT / "tools" / "check_cuda_headers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


hc = _load_header_tool()


def test_every_drift_changes_the_current_declarations() -> None:
    """Each self-test drift still applies to cuda_libs.h (else the self-test would be vacuous)."""
    text = hc.DECLARATIONS.read_text()
    for _what, pattern, replacement, _expect in hc.DRIFTS:
        assert hc.apply_drift(text, pattern, replacement) != text


def test_wheel_extraction_keeps_only_include_files(tmp_path: Path) -> None:
    wheel = tmp_path / "nvidia_fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("nvidia/cu13/include/cublas_api.h", "/* api */")
        zf.writestr("nvidia/cu13/include/crt/host_defines.h", "/* crt */")
        zf.writestr("nvidia/cu13/lib/libcublas.so.13", b"\x7fELF")
        zf.writestr("nvidia_fake-1.0.dist-info/METADATA", "Name: fake")
    dest = tmp_path / "out"
    assert hc.extract_includes(wheel, dest) == 2
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["crt/host_defines.h", "cublas_api.h"]


def _cached_set() -> list[Path] | None:
    """The include folders of a pinned version set already in the header cache, or None."""
    root = hc.cache_root()
    for versions in hc.VERSION_SETS.values():
        dirs = [root / f"{p}-{v}" for p, v in versions.items()]
        if all((d / ".complete").is_file() for d in dirs):
            return [d / "include" for d in dirs]
    return None


@pytest.mark.skipif(_cached_set() is None, reason="no cached CUDA headers: run tools/check_cuda_headers.py (CI does, first)")
def test_header_check_accepts_ours_and_rejects_a_drift(tmp_path: Path) -> None:
    includes = _cached_set()
    ok = hc.compile_check(includes, hc.DECLARATIONS.parent)
    assert ok.returncode == 0, ok.stderr
    drifted = hc.apply_drift(hc.DECLARATIONS.read_text(), *hc.DRIFTS[0][1:3])
    (tmp_path / "cuda_libs.h").write_text(drifted)
    bad = hc.compile_check(includes, tmp_path)
    assert bad.returncode != 0 and "sgemm_strided" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: gpu_check.sh would run")
def test_gpu_check_refuses_cleanly_without_a_gpu(tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(report)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 3
    assert "no CUDA GPU visible to torch" in proc.stderr
    assert not report.exists()  # refused before building or writing anything


def test_library_pairs_never_mix_cuda_releases() -> None:
    cublas = ["/w/nvidia/cu13/lib/libcublas.so.13", "/usr/local/cuda/lib64/libcublas.so.12.9.1",
              "libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"]
    cusolver = ["/usr/local/cuda/lib64/libcusolver.so.11", "/w/nvidia/cu13/lib/libcusolver.so.12",
                "libcusolver.so.13", "libcusolver.so.12", "libcusolver.so.11", "libcusolver.so"]
    pairs = _backend._library_pairs(cublas, cusolver)
    match = {"13": "12", "12": "11", "11": "11", "": ""}
    for blas, solver in pairs:
        assert match[_backend._soname_major(blas, "libcublas")] == _backend._soname_major(solver, "libcusolver")
    # the wheel's own cuSOLVER first, not the toolkit's libcusolver.so.11
    assert pairs[0] == ("/w/nvidia/cu13/lib/libcublas.so.13", "/w/nvidia/cu13/lib/libcusolver.so.12")
    assert ("/usr/local/cuda/lib64/libcublas.so.12.9.1", "/usr/local/cuda/lib64/libcusolver.so.11") in pairs
    assert all(s != "libcusolver.so.13" for _, s in pairs)  # no CUDA release ships that pair
    assert ("libcublas.so", "libcusolver.so") in pairs


def test_soname_major() -> None:
    assert _backend._soname_major("/a/libcublas.so.13.1.0.3", "libcublas") == "13"
    assert _backend._soname_major("libcusolver.so.11", "libcusolver") == "11"
    assert _backend._soname_major("libcublas.so", "libcublas") == ""


@pytest.mark.skipif(_backend._C_cuda is None, reason="the CUDA extension is not built here")
def test_default_archs_include_sm75() -> None:
    if os.environ.get("SHAMPOO_CUDA_ARCHS"):
        pytest.skip("SHAMPOO_CUDA_ARCHS overrides the default")
    archs = _backend._C_cuda.build_info()["archs"].split(";")
    assert archs == ["75", "80", "90"]
