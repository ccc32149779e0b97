"""Extension declarations only (metadata lives in pyproject.toml).

distributed_shampoo._C: the C core (csrc/core) and its binding (csrc/python). No libtorch and
no BLAS at link time: tensors arrive through DLPack, BLAS/LAPACK through SciPy's capsules.

distributed_shampoo._C_cuda: the CUDA kernels (csrc/cuda) and their binding, built when a
CUDA toolkit is found (nvcc on PATH, or under CUDA_HOME / CUDA_PATH); without one the package
builds CPU-only. The CUDA runtime is linked statically and cuBLAS/cuSOLVER are resolved at run
time (csrc/cuda/cuda_libs.h), so nvcc alone builds it. Environment:
  SHAMPOO_BUILD_CUDA=0            never build it; =1: fail if no toolkit is found
  SHAMPOO_CUDA_ARCHS="75;80;90"   SM targets (the last also as PTX, for newer GPUs); sm_75
                                  (T4 class) is the oldest CUDA 13 supports
A toolkit that is found but fails to compile the sources fails the build.
"""

import os
import shutil
import subprocess
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

C_FLAGS = [
    "-std=c11",
    "-O2",
    # Round every operation separately, as torch's CPU kernels do, so results match torch.
    "-ffp-contract=off",
    "-Wall",
    "-Wextra",
    # csrc/core/parallel.c runs blocks on POSIX threads.
    "-pthread",
]

NVCC_FLAGS = [
    "-std=c++17",
    "-O2",
    # No fused multiply-adds: each operation rounds as in the CPU kernels.
    "-fmad=false",
    "-Xcompiler",
    "-fPIC,-Wall,-Wextra",
]


def find_cuda_home() -> str | None:
    """The toolkit root (with bin/nvcc and the static CUDA runtime), or None."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc is not None:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
            os.path.join(root, "lib64", "libcudart_static.a")
        ):
            return root
    return None


DEFAULT_CUDA_ARCHS = "75;80;90"


def gencode_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("SHAMPOO_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    # named in the "no kernel image for this device" error (csrc/cuda/device_cuda.cu)
    flags.append(f'-DSHAMPOO_CUDA_ARCHS="{";".join(archs)}"')
    return flags


class BuildExtWithCuda(build_ext):
    """build_ext that compiles an extension's .cu sources with nvcc first."""

    def build_extension(self, ext: Extension) -> None:
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if cu_sources:
            cuda_home = find_cuda_home()
            assert cuda_home is not None  # only declared when found
            nvcc = os.path.join(cuda_home, "bin", "nvcc")
            build_dir = os.path.join(self.build_temp, "cuda")
            os.makedirs(build_dir, exist_ok=True)
            objects = []
            for source in cu_sources:
                obj = os.path.join(build_dir, os.path.basename(source) + ".o")
                deps = [source] + list(ext.depends)
                if self.force or not os.path.exists(obj) or any(
                    os.path.getmtime(d) > os.path.getmtime(obj) for d in deps
                ):
                    cmd = [nvcc, *NVCC_FLAGS, *gencode_flags(), "-c", source, "-o", obj]
                    print(" ".join(cmd))
                    subprocess.run(cmd, check=True)
                objects.append(obj)
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = objects
            ext.library_dirs = [os.path.join(cuda_home, "lib64")]
        super().build_extension(ext)


extensions = [
    Extension(
        "distributed_shampoo._C",
        # csrc/python/cuda_*.c bind the CUDA module below
        sources=sorted(
            glob("csrc/core/*.c")
            + [p for p in glob("csrc/python/*.c") if not os.path.basename(p).startswith("cuda_")]
        ),
        depends=sorted(glob("csrc/core/*.h") + glob("csrc/core/*.inc") + glob("csrc/python/*.h")),
        extra_compile_args=C_FLAGS,
        extra_link_args=["-pthread"],
        # The binding stays within the stable ABI (Py_LIMITED_API in binding.h); an abi3
        # wheel would also need py_limited_api=True here and the bdist_wheel tag.
    ),
]

# The host C sources of _C_cuda besides csrc/cuda (a literal list: the CUDA emulation tier,
# tools/cuda_emu/build.py, reads it from here so that both builds compile the same files).
CUDA_MODULE_HOST_SOURCES = [
    "csrc/core/batch_plan.c",
    "csrc/core/block_table.c",
    "csrc/core/status.c",
    "csrc/core/sym_pack.c",
    "csrc/python/arg_checks.c",
    "csrc/python/dlpack_state.c",
    "csrc/python/tensor_args.c",
    "csrc/python/tensor_list.c",
    "csrc/python/cuda_binding.c",
    "csrc/python/cuda_call.c",
    "csrc/python/cuda_io_ops.c",
    "csrc/python/cuda_ops.c",
    "csrc/python/cuda_packed_ops.c",
    "csrc/python/cuda_soap_ops.c",
]

_want_cuda = os.environ.get("SHAMPOO_BUILD_CUDA", "auto")
if _want_cuda != "0":
    if find_cuda_home() is not None:
        extensions.append(
            Extension(
                "distributed_shampoo._C_cuda",
                sources=sorted(glob("csrc/cuda/*.cu") + glob("csrc/cuda/*.c")) + CUDA_MODULE_HOST_SOURCES,
                depends=sorted(
                    glob("csrc/cuda/*.h") + glob("csrc/cuda/*.cuh") + glob("csrc/core/*.h")
                    + glob("csrc/python/*.h")
                ),
                extra_compile_args=C_FLAGS,
                # Static CUDA runtime: the module needs only the driver (libcuda) at run time.
                libraries=["cudart_static", "dl", "rt", "stdc++"],
                extra_link_args=["-pthread"],
            )
        )
    elif _want_cuda == "1":
        raise RuntimeError("SHAMPOO_BUILD_CUDA=1 but no CUDA toolkit (nvcc) was found")

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExtWithCuda})
