#!/usr/bin/env python3
"""Prove csrc/cuda's hand-written cuBLAS/cuSOLVER declarations identical to NVIDIA's headers.

The shipped build is header-free: csrc/cuda/cuda_libs.h restates the C ABI of every routine,
constant and status it uses and resolves the libraries at run time. This tool compiles
tools/cuda_header_check.cpp (static assertions over every entry of cuda_libs.h's X-lists)
against the real headers of several library versions, then proves that the check can fail by
compiling deliberately drifted copies of cuda_libs.h, each of which must be rejected.

The headers come from NVIDIA's pip wheels (nvidia-cublas, nvidia-cusolver,
nvidia-cuda-runtime; CUDA 13 keeps them under nvidia/cu13/include/, the -cu12 wheels under
nvidia/<lib>/include/). Each wheel is downloaded once with `pip download --no-deps` (so it
also lands in pip's cache) and only its include/ files are kept, under
$SHAMPOO_CUDA_HEADER_CACHE or ~/.cache/distributed-shampoo/cuda-headers/<wheel>-<version>/;
later runs reuse them without touching the network. A wheel that cannot be downloaded is an
error (exit 2), said loudly: CI must not pass without the check.

Usage: python tools/check_cuda_headers.py [--sets a,b] [--no-self-test] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK_SOURCE = ROOT / "tools" / "cuda_header_check.cpp"
DECLARATIONS = ROOT / "csrc" / "cuda" / "cuda_libs.h"

# Library versions checked. torch 2.11's and 2.13's CUDA 13 wheels pin these (their
# Requires-Dist); "newest" entries are resolved with `pip index versions` at run time. Since
# CUDA 13 the runtime headers include crt/host_defines.h (nvidia-cuda-crt) and cuda_fp16.h
# includes <nv/target> (nvidia-cuda-cccl); torch pins neither: the releases beside the pinned
# runtime.
NEWEST = "newest"
VERSION_SETS: dict[str, dict[str, str]] = {
    "torch-2.11-cu130": {
        "nvidia-cuda-runtime": "13.0.96",
        "nvidia-cuda-crt": "13.0.88",
        "nvidia-cuda-cccl": "13.0.85",
        "nvidia-cublas": "13.1.0.3",
        "nvidia-cusolver": "12.0.4.66",
    },
    "torch-2.13-cu130": {
        "nvidia-cuda-runtime": "13.0.96",
        "nvidia-cuda-crt": "13.0.88",
        "nvidia-cuda-cccl": "13.0.85",
        "nvidia-cublas": "13.1.1.3",
        "nvidia-cusolver": "12.0.4.66",
    },
    "newest-cu13": {
        "nvidia-cuda-runtime": NEWEST,
        "nvidia-cuda-crt": NEWEST,
        "nvidia-cuda-cccl": NEWEST,
        "nvidia-cublas": NEWEST,
        "nvidia-cusolver": NEWEST,
    },
}

# Drifts that the check must reject: (what, regex on cuda_libs.h, replacement, text the
# compiler's message must contain). Each is compiled on its own.
DRIFTS: list[tuple[str, str, str, str]] = [
    (
        "a prototype parameter narrowed (strided GEMM stride as int)",
        r"(typedef int \(\*shampoo_cublas_sgemm_strided_fn\)[^;]*?)long long stride_a",
        r"\1int stride_a",
        "sgemm_strided",
    ),
    (
        "a prototype parameter dropped (syevjBatched without its batch count)",
        r"(typedef int \(\*shampoo_dsyevj_batched_fn\)[^;]*?shampoo_syevj_info params),\s*int batch\)",
        r"\1)",
        "dsyevj_batched",
    ),
    (
        "a return type changed (cusolverDnCreate returning a pointer)",
        r"typedef int \(\*shampoo_cusolver_create_fn\)",
        "typedef void *(*shampoo_cusolver_create_fn)",
        "cusolver_create",
    ),
    (
        "an enum value changed (CUBLAS_OP_T)",
        r"X\(SHAMPOO_CUBLAS_OP_T, CUBLAS_OP_T, 1\)",
        "X(SHAMPOO_CUBLAS_OP_T, CUBLAS_OP_T, 2)",
        "SHAMPOO_CUBLAS_OP_T",
    ),
    (
        "a status value changed (CUBLAS_STATUS_EXECUTION_FAILED)",
        r"X\(13, CUBLAS_STATUS_EXECUTION_FAILED\)",
        "X(12, CUBLAS_STATUS_EXECUTION_FAILED)",
        "CUBLAS_STATUS_EXECUTION_FAILED",
    ),
]


class CheckError(Exception):
    """A failure to report (exit code in .code)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def cache_root(override: str | None = None) -> Path:
    if override:
        return Path(override)
    env = os.environ.get("SHAMPOO_CUDA_HEADER_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "distributed-shampoo" / "cuda-headers"


def loud(message: str) -> None:
    bar = "!" * 78
    print(f"{bar}\n{message}\n{bar}", file=sys.stderr, flush=True)


def newest_version(package: str) -> str:
    """The newest release on the index (`pip index versions`)."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", package]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    match = re.search(rf"^{re.escape(package)} \(([^)]+)\)", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or match is None:
        raise CheckError(
            f"cannot ask the package index for the newest {package} "
            f"({' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-400:]}); "
            "the CUDA header check needs the network once per new version",
            code=2,
        )
    return match.group(1)


def extract_includes(wheel: Path, dest: Path) -> int:
    """Copies the files under any include/ folder of the wheel (nvidia/cu13/include/...,
    nvidia/<lib>/include/...) into dest, relative to that include/. Returns the file count."""
    count = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if info.is_dir() or "include" not in parts[:-1]:
                continue
            rel = parts[parts.index("include") + 1 :]
            if not rel or any(p in ("", ".", "..") for p in rel):
                continue
            target = dest.joinpath(*rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            count += 1
    return count


def ensure_headers(package: str, version: str, root: Path) -> Path:
    """The include folder of package==version, downloaded and extracted on first use."""
    dest = root / f"{package}-{version}"
    include = dest / "include"
    if (dest / ".complete").is_file():
        return include
    with tempfile.TemporaryDirectory(prefix="shampoo-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "-d", tmp, f"{package}=={version}"]
        print(f"downloading {package}=={version} (once; kept in pip's cache)", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise CheckError(
                f"could not download {package}=={version} ({' '.join(cmd)} exited "
                f"{proc.returncode}): {proc.stderr.strip()[-600:]}",
                code=2,
            )
        if dest.exists():
            shutil.rmtree(dest)
        if extract_includes(wheels[0], include) == 0:
            raise CheckError(f"{wheels[0].name} holds no include/ files", code=2)
    (dest / ".complete").write_text(f"{package}=={version}\n")
    return include


def resolve_set(name: str) -> dict[str, str]:
    return {p: (newest_version(p) if v == NEWEST else v) for p, v in VERSION_SETS[name].items()}


def compiler() -> str:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    raise CheckError("no C++ compiler (c++, g++ or clang++) found", code=2)


def compile_check(include_dirs: list[Path], declarations_dir: Path) -> subprocess.CompletedProcess:
    """Compiles the check against the given headers, cuda_libs.h taken from declarations_dir
    (the checked TU includes it by name; tools/ holds no copy, so -I decides)."""
    cmd = [compiler(), "-std=c++17", "-fsyntax-only", f"-I{declarations_dir}"]
    cmd += [f"-I{d}" for d in include_dirs]
    cmd.append(str(CHECK_SOURCE))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def apply_drift(text: str, pattern: str, replacement: str) -> str:
    new, n = re.subn(pattern, replacement, text, count=1, flags=re.DOTALL)
    if n != 1 or new == text:
        raise CheckError(f"self-test drift pattern no longer matches cuda_libs.h: {pattern}")
    return new


def self_test(include_dirs: list[Path]) -> list[str]:
    """Compiles each drifted copy of cuda_libs.h; returns the drifts that were NOT caught."""
    original = DECLARATIONS.read_text()
    missed = []
    with tempfile.TemporaryDirectory(prefix="shampoo-drift-") as tmp:
        for what, pattern, replacement, expect in DRIFTS:
            Path(tmp, "cuda_libs.h").write_text(apply_drift(original, pattern, replacement))
            proc = compile_check(include_dirs, Path(tmp))
            caught = proc.returncode != 0 and expect in proc.stderr
            print(f"  drift '{what}': {'rejected' if caught else 'NOT REJECTED'}", flush=True)
            if not caught:
                missed.append(f"{what} (exit {proc.returncode}: {proc.stderr[-300:]})")
    return missed


def run(set_names: list[str], do_self_test: bool, cache: str | None) -> int:
    root = cache_root(cache)
    root.mkdir(parents=True, exist_ok=True)
    failures = []
    last_includes: list[Path] = []
    for name in set_names:
        versions = resolve_set(name)
        includes = [ensure_headers(p, v, root) for p, v in versions.items()]
        label = ", ".join(f"{p} {v}" for p, v in versions.items())
        proc = compile_check(includes, DECLARATIONS.parent)
        if proc.returncode == 0:
            print(f"OK   {name}: {label}", flush=True)
            last_includes = includes
        else:
            print(f"FAIL {name}: {label}\n{proc.stderr}", flush=True)
            failures.append(name)
    if do_self_test and last_includes:
        print("self-test: every drifted declaration must fail the check", flush=True)
        missed = self_test(last_includes)
        if missed:
            failures.append("self-test: " + "; ".join(missed))
    if failures:
        loud("CUDA header check FAILED: csrc/cuda/cuda_libs.h differs from NVIDIA's headers "
             f"({', '.join(failures)})")
        return 1
    print(f"CUDA header check passed for {len(set_names)} version sets", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(VERSION_SETS),
                        help=f"comma-separated version sets (default: all of {list(VERSION_SETS)})")
    parser.add_argument("--no-self-test", action="store_true",
                        help="skip proving that drifted declarations are rejected")
    parser.add_argument("--cache", default=None, help="header cache folder")
    args = parser.parse_args(argv)
    names = [s for s in args.sets.split(",") if s]
    unknown = [s for s in names if s not in VERSION_SETS]
    if unknown:
        parser.error(f"unknown version set(s) {unknown}; known: {list(VERSION_SETS)}")
    try:
        return run(names, not args.no_self_test, args.cache)
    except CheckError as exc:
        loud(f"CUDA header check could not run: {exc}")
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
