"""Runs the CUDA tests on the CPU emulator (tools/cuda_emu/README.md), in a process of their
own (the emulator patches torch.cuda process-wide). Usage:

  python tools/cuda_emu/run.py            the default CI subset (about 1.5 minutes on 2 cores)
  python tools/cuda_emu/run.py --all      every emulated test, large root groups included
  python tools/cuda_emu/run.py --small-caps   small grid-y, batch, staging and solver-budget
                                          caps (build.py SMALL_CAPS): every strided loop and
                                          multi-batch path runs on small inputs
  python tools/cuda_emu/run.py --asan     the same small caps, built with AddressSanitizer +
                                          UBSan (in CI; about 2 minutes)
Extra arguments go to pytest. Exits with pytest's status (or 1 after a sanitizer report)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import build  # noqa: E402

TESTS = ["tests/test_cuda_kernels.py", "tests/test_cuda_emu.py", "tests/test_cuda_optimizer.py",
         "tests/test_cuda_root_schedule.py", "tests/test_cuda_soap.py",
         "tests/test_cuda_param_io.py", "tests/test_cuda_direct_io.py"]
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
        def gcc_lib(name: str) -> str:
            path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True,
                                  text=True, check=True).stdout.strip()
            if not os.path.isabs(path) or not os.path.exists(path):
                sys.exit(f"cuda_emu --asan: gcc has no {name} (install gcc's sanitizer "
                         "runtime, e.g. Debian's libasan8 and libubsan1)")
            return path

        # libstdc++ preloaded too: the interpreter does not link it, so ASan would find no
        # __cxa_throw to intercept and die at torch's first C++ exception (a CHECK failure
        # that reads as a silent abort)
        env["LD_PRELOAD"] = f"{gcc_lib('libasan.so')} {gcc_lib('libstdc++.so.6')}"
        # Python and torch leak by design at exit; the interpreter is not instrumented.
        # Reports go to files: pytest captures fd 2, and a sanitizer that aborts the process
        # takes the captured report with it (printed below).
        logs = out / "sanitizer-logs"
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir()
        env["ASAN_OPTIONS"] = ("detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:"
                               f"log_path={logs}/asan")
        env["UBSAN_OPTIONS"] = f"print_stacktrace=1:halt_on_error=1:log_path={logs}/ubsan"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
    cmd += ["-k", " and ".join(f"not {name}" for name in NOT_EMULATED + ([] if every else SLOW))]
    cmd += rest
    print(" ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if asan:
        reports = sorted((out / "sanitizer-logs").glob("*"))
        for report in reports:
            print(f"---- {report}", file=sys.stderr)
            print(report.read_text(errors="replace"), file=sys.stderr)
        if reports and rc == 0:
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
