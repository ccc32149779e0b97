"""The CUDA emulation tier (tools/cuda_emu/README.md): `pytest --cuda-emu tests/test_cuda_*.py`
(or SHAMPOO_CUDA_EMU=<build dir>, or =1 / small / asan / asan-small to build that flavour) runs the CUDA tests against
the emulated _C_cuda in this process. Without either, nothing here changes anything."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def pytest_addoption(parser):
    parser.addoption("--cuda-emu", action="store_true", default=False,
                     help="run the CUDA tests on the CPU emulator (tools/cuda_emu)")


def pytest_configure(config):
    build_dir = os.environ.get("SHAMPOO_CUDA_EMU")
    if not build_dir and not config.getoption("--cuda-emu"):
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools" / "cuda_emu"))
    import build as emu_build  # tools/cuda_emu/build.py
    import torch_emu

    if not build_dir or not (Path(build_dir) / "build.json").exists():
        # "1" / "small" / "asan" / "asan-small": build that flavour (cached) first
        flavour = build_dir or ""
        build_dir = str(emu_build.build(asan="asan" in flavour, small_caps="small" in flavour))
        os.environ["SHAMPOO_CUDA_EMU"] = build_dir
    torch_emu.install(build_dir)
