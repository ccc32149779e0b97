"""Runs the CUDA tests on the CPU emulator (tools/cuda_emu/README.md), in a process of their
own (the emulator patches torch.cuda process-wide). Usage:

  python tools/cuda_emu/run.py            the default CI subset (about two minutes on 2 cores)
  python tools/cuda_emu/run.py --all      every CUDA kernel test, large groups included
  python tools/cuda_emu/run.py --small-caps   grid-y cap 3, staging cap 600 (every strided loop)
  python tools/cuda_emu/run.py --asan     AddressSanitizer + UBSan build with small grid caps,
                                          so every grid-stride loop and multi-batch path runs
Extra arguments go to pytest. Exits with pytest's status.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import build  # noqa: E402

TESTS = ["tests/test_cuda_kernels.py", "tests/test_cuda_emu.py", "tests/test_cuda_optimizer.py"]
# Minutes each on the emulator (cuSOLVER by Jacobi on the CPU): in --all only.
SLOW = ["test_root_inverse_large_groups"]
# Never on the emulator: they time host synchronisation with the GPU (torch's sync debug mode,
# torch.cuda._sleep), which the emulator does not have, and train an nn.Module, whose backward
# pass needs torch's CUDA accelerator hooks that a CPU-only torch cannot fake.
NOT_EMULATED = ["test_steps_without_root_inverse_do_not_synchronise",
                "test_step_returns_while_earlier_gpu_work_runs"]


def main() -> int:
    args = sys.argv[1:]
    every = "--all" in args
    asan = "--asan" in args
    small = asan or "--small-caps" in args
    rest = [a for a in args if a not in ("--all", "--asan", "--small-caps")]
    out = build.build(asan=asan, small_caps=small)
    env = dict(os.environ, SHAMPOO_CUDA_EMU=str(out))
    if asan:
        lib = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                             text=True, check=True).stdout.strip()
        env["LD_PRELOAD"] = lib
        # Python and torch leak by design at exit; the interpreter is not instrumented.
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:allocator_may_return_null=1"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
    cmd += ["-k", " and ".join(f"not {name}" for name in NOT_EMULATED + ([] if every else SLOW))]
    cmd += rest
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
