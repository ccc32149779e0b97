"""The CUDA emulation tier's source rewriting (tools/cuda_emu/build.py) still fits csrc/cuda.
Fast and compiler-free, so it runs in the main suite: a renamed launch-planning constant would
otherwise leave --small-caps builds silently on the real caps, and a kernel launched from a file
other than its own would run its __syncthreads without barriers."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# loaded under its own name: "build" is also PyPA's package, which a venv may hold
_spec = importlib.util.spec_from_file_location("cuda_emu_build", ROOT / "tools" / "cuda_emu" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

CUDA = ROOT / "csrc" / "cuda"


def _sources(suffix: str) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(CUDA.glob(f"*{suffix}"))}


def test_every_small_cap_names_a_constant_the_sources_define() -> None:
    hit: set[str] = set()
    for text in {**_sources(".cu"), **_sources(".cuh"), **_sources(".h")}.values():
        build.apply_overrides(text, build.SMALL_CAPS, hit)
    assert hit == set(build.SMALL_CAPS), f"not defined any more: {set(build.SMALL_CAPS) - hit}"


def test_small_caps_replace_the_value() -> None:
    hit: set[str] = set()
    text = ("#define SHAMPOO_CUDA_MAX_BATCH 65535\n"
            "constexpr int64_t STAGING_CAP = (int64_t)1 << 25;\n")
    out = build.apply_overrides(text, {"SHAMPOO_CUDA_MAX_BATCH": "5", "STAGING_CAP": "600"}, hit)
    assert out == "#define SHAMPOO_CUDA_MAX_BATCH 5\nconstexpr int64_t STAGING_CAP = 600;\n"


def test_every_launch_is_rewritten_and_its_kernel_is_defined_in_the_launching_file() -> None:
    helpers = "".join(_sources(".cuh").values())
    total = 0
    for name, text in _sources(".cu").items():
        out, count = build.rewrite_launches(text, build.barrier_kernels(text, helpers))
        assert count == text.count("<<<") and "<<<" not in out, name
        launched = set(re.findall(r'\.run\("(\w+)", (?:true|false)', out))
        defined = set(build._functions(text, "__global__"))
        assert launched <= defined, f"{name} launches kernels defined elsewhere: {launched - defined}"
        total += count
    assert total > 0


def test_kernels_that_reach_a_barrier_run_on_fibers() -> None:
    """Each kernel whose body calls __syncthreads* is classified as a barrier kernel; one that
    reaches it only through a __device__ helper is too."""
    helpers = "".join(_sources(".cuh").values())
    found = 0
    for name, text in _sources(".cu").items():
        barriers = build.barrier_kernels(text, helpers)
        for kernel, body in build._functions(text, "__global__").items():
            if "__syncthreads" in body:
                assert kernel in barriers, f"{name}: {kernel}"
                found += 1
    assert found >= 3  # gather's __syncthreads_or, the finish norms, eigen_scales
    helper = ("__device__ inline void wait_all() { __syncthreads(); }\n"
              "__global__ void k(int *x) { wait_all(); x[0] = 1; }\n"
              "__global__ void plain(int *x) { x[0] = 1; }\n"
              "template <typename T> __device__ inline void wait_t(T *x) { __syncthreads(); }\n"
              "__global__ void kt(float *x) { wait_t<float>(x); }\n")
    assert build.barrier_kernels(helper) == {"k", "kt"}
