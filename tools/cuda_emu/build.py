"""Builds the CUDA emulation tier (tools/cuda_emu/README.md) into a build directory:

  libshampoo_emu_cudart.so   the emulated CUDA runtime (runtime_*.cpp)
  libcublas.so.13, .so.12    reference cuBLAS (ref_blas.cpp) of CUDA 13 and CUDA 12
  libcusolver.so.12          reference cuSOLVER with XsyevBatched (ref_solver.cpp,
                             ref_eigh.cpp, ref_qr.cpp, ref_xsyev.cpp)
  libcusolver.so.11          the same without XsyevBatched (CUDA 12's cuSOLVER)
  _C_cuda<EXT_SUFFIX>        distributed_shampoo._C_cuda from the UNMODIFIED csrc sources:
                             csrc/cuda/*.cu compiled as host C++ after one mechanical rewrite
                             (every `k<<<cfg>>>(args)` -> `::emu::cfg(__FILE__, __LINE__,
                             cfg).run("k", barriers, k, args)`), the binding's C as it is
                             but for dlpack_state.c's known-exporter test, which also
                             accepts torch_emu.EmuCudaTensor (accept_emu_tensors).

Options: --asan (AddressSanitizer + UBSan, for a process started with libasan preloaded),
--small-caps (the launch-planning constants rewritten small, so every grid-stride loop and
multi-batch path runs on small inputs; the emulator's grid limit then matches). Rebuilds only
when a source or an option changed. Prints the build directory.
"""

from __future__ import annotations

import ast

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"

# The constants --small-caps rewrites, and the values it gives them. A name no source defines
# any more is reported (build.json "missing_overrides") rather than failing the build.
SMALL_CAPS = {
    "SHAMPOO_CUDA_MAX_GRID_Y": "3",  # grid-y loops (cuda_common.cuh)
    "SHAMPOO_CUDA_MAX_BATCH": "5",  # chunked cuBLAS/cuSOLVER batches (cuda_common.cuh)
    "STAGING_CAP": "600",  # several eigensolver batches per size (eigensolver_cuda.cuh)
    "SOLVER_BUDGET": "16384",  # batches halved until the workspace fits (eigensolver_cuda.cuh)
}
# The emulator's own limits in --small-caps builds (what launches and batched cuBLAS calls are
# checked against), matching the rewritten constants.
SMALL_GRID_Y = 3
SMALL_MAX_BATCH = 5

def _module_host_sources() -> list[str]:
    """setup.py's CUDA_MODULE_HOST_SOURCES (relative to csrc/): the same files as the real build."""
    tree = ast.parse((CSRC.parent / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "CUDA_MODULE_HOST_SOURCES" for t in node.targets
        ):
            return [p.removeprefix("csrc/") for p in ast.literal_eval(node.value)]
    raise RuntimeError("setup.py defines no CUDA_MODULE_HOST_SOURCES")


BINDING_C = _module_host_sources()


# ------------------------------------------------------------------------------ rewriting


def _match_forward(text: str, i: int, open_c: str, close_c: str) -> int:
    """Index just past the bracket closing the one at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_c:
            depth += 1
        elif text[j] == close_c:
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError(f"unbalanced {open_c}{close_c} from offset {i}")


def _functions(text: str, qualifier: str) -> dict[str, str]:
    """name -> body of every function definition marked `qualifier` (__global__/__device__)."""
    found: dict[str, str] = {}
    for m in re.finditer(rf"\b{qualifier}\b", text):
        head = re.compile(r"\b([A-Za-z_]\w*)\s*\(").search(text, m.end())
        if head is None:
            continue
        params_end = _match_forward(text, head.end() - 1, "(", ")")
        rest = text[params_end:]
        brace = re.match(r"\s*(const\s*)?\{", rest)
        if brace is None:
            continue  # a declaration
        start = params_end + brace.end() - 1
        found[head.group(1)] = text[start:_match_forward(text, start, "{", "}")]
    return found


def barrier_kernels(text: str, helpers_text: str = "") -> set[str]:
    """Kernels that reach __syncthreads* (directly or through a __device__ helper, called
    as `helper(` or `helper<T>(`): they run on fibers; the others run thread after thread on
    one stack."""
    helpers = {**_functions(helpers_text, "__device__"), **_functions(text, "__device__")}
    barrier = {name for name, body in helpers.items() if "__syncthreads" in body}
    changed = True
    while changed:
        changed = False
        for name, body in helpers.items():
            if name not in barrier and any(re.search(rf"\b{b}\s*(<[^<>;]*>)?\s*\(", body) for b in barrier):
                barrier.add(name)
                changed = True
    return {
        name
        for name, body in _functions(text, "__global__").items()
        if "__syncthreads" in body or any(re.search(rf"\b{b}\s*(<[^<>;]*>)?\s*\(", body) for b in barrier)
    }


def rewrite_launches(text: str, barriers: set[str]) -> tuple[str, int]:
    """Every `kernel<T...><<<cfg>>>(args)` as a call on the emulated runtime."""
    out, pos, count = [], 0, 0
    while True:
        at = text.find("<<<", pos)
        if at < 0:
            break
        # the kernel expression before <<<: identifier, optional template arguments
        j = at
        while j > 0 and text[j - 1].isspace():
            j -= 1
        name_end = j
        if text[j - 1] == ">":
            depth = 0
            k = j - 1
            while k >= 0:
                if text[k] == ">":
                    depth += 1
                elif text[k] == "<":
                    depth -= 1
                    if depth == 0:
                        break
                k -= 1
            j = k
        ident = re.search(r"([A-Za-z_]\w*)\s*$", text[:j])
        if ident is None:
            raise ValueError(f"no kernel name before <<< at offset {at}")
        start = ident.start()
        kernel_expr = text[start:name_end]
        cfg_end = text.find(">>>", at)
        cfg = text[at + 3 : cfg_end]
        paren = cfg_end + 3
        while text[paren].isspace():
            paren += 1
        if text[paren] != "(":
            raise ValueError(f"no argument list after >>> at offset {cfg_end}")
        args_end = _match_forward(text, paren, "(", ")")
        args = text[paren + 1 : args_end - 1].strip()
        name = ident.group(1)
        call = (
            f'::emu::cfg(__FILE__, __LINE__, {cfg}).run("{name}", '
            f'{"true" if name in barriers else "false"}, {kernel_expr}'
            + (f", {args})" if args else ")")
        )
        out.append(text[pos:start])
        out.append(call)
        pos = args_end
        count += 1
    out.append(text[pos:])
    return "".join(out), count


def apply_overrides(text: str, overrides: dict[str, str], hit: set[str]) -> str:
    for name, value in overrides.items():
        new, n = re.subn(rf"(#define\s+{name}\s+)\S.*", rf"\g<1>{value}", text)
        new, m = re.subn(rf"(constexpr\s+[\w:]+\s+{name}\s*=\s*)[^;]+;", rf"\g<1>{value};", new)
        if n + m:
            hit.add(name)
        text = new
    return text


# ------------------------------------------------------------------------------ building


def _sources(pattern: str) -> list[str]:
    """The emulator's own source files matching pattern, in a fixed order."""
    return [str(p) for p in sorted(HERE.glob(pattern))]


def _run(cmd: list[str]) -> None:
    print(" ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


def _sources_digest(options: dict) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for p in sorted(list(CSRC.rglob("*")) + list(HERE.glob("*.cpp")) + list(HERE.glob("*.h"))
                    + list((HERE / "include").glob("*")) + [Path(__file__)]):
        if p.is_file():
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


# The tensor lists of the pointer-table ops (csrc/python/tensor_list.c) take exact
# torch.Tensor entries only; the emulator's "cuda" tensors are a subclass (torch_emu.py), so
# its build also counts torch_emu.EmuCudaTensor (once that module is loaded) as torch's own.
EMU_EXPORTER = """
/* cuda_emu (tools/cuda_emu/build.py): torch_emu.EmuCudaTensor counts as a torch.Tensor */
static int emu_cuda_tensor_type(PyObject *type)
{
    static PyObject *emu_type = NULL;
    if (emu_type == NULL) {
        PyObject *mod = PyDict_GetItemString(PyImport_GetModuleDict(), "torch_emu");
        PyObject *t = mod != NULL ? PyObject_GetAttrString(mod, "EmuCudaTensor") : NULL;
        if (t == NULL) {
            PyErr_Clear();
            return 0;
        }
        emu_type = t; /* kept for the life of the process */
    }
    return type == emu_type;
}

int shampoo_known_exporter("""
KNOWN_RETURN = "return type == st->known_types[0] || type == st->known_types[1];"


def accept_emu_tensors(path: Path) -> None:
    """Rewrites the copied dlpack_state.c so that shampoo_known_exporter accepts the
    emulator's tensors too (the one change to the binding)."""
    text = path.read_text()
    if KNOWN_RETURN not in text or "\nint shampoo_known_exporter(" not in text:
        raise RuntimeError(f"cuda_emu: {path.name} no longer has the known-exporter test to extend")
    text = text.replace("\nint shampoo_known_exporter(", EMU_EXPORTER, 1)
    text = text.replace(KNOWN_RETURN, KNOWN_RETURN[:-1] + " || emu_cuda_tensor_type(type);", 1)
    path.write_text(text)


def build(asan: bool = False, small_caps: bool = False, out_root: Path | None = None) -> Path:
    """Builds (if needed) and returns the build directory."""
    options = {"asan": asan, "small_caps": small_caps}
    digest = _sources_digest(options)
    mode = ("asan-" if asan else "") + ("small-" if small_caps else "") + "emu"
    out_root = out_root or ROOT / "build" / "cuda_emu"
    out = out_root / f"{mode}-{digest}"
    if (out / "build.json").exists():
        return out
    tmp = out_root / f"{mode}-{digest}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    src = tmp / "src" / "csrc"
    shutil.copytree(CSRC, src)

    # The architectures a real build names in "no kernel image" (setup.py's default).
    archs = re.search(r'DEFAULT_CUDA_ARCHS = "([^"]*)"', (ROOT / "setup.py").read_text())
    archs = archs.group(1) if archs else "unknown"
    overrides = SMALL_CAPS if small_caps else {}
    hit: set[str] = set()
    cuda_dir = src / "cuda"
    helpers = "".join(p.read_text() for p in sorted(cuda_dir.glob("*.cuh")))
    launches = 0
    for p in sorted(cuda_dir.glob("*.cu")) + sorted(cuda_dir.glob("*.cuh")):
        text = apply_overrides(p.read_text(), overrides, hit)
        if p.suffix == ".cu":
            text, n = rewrite_launches(text, barrier_kernels(text, helpers))
            launches += n
        p.write_text(text)

    accept_emu_tensors(src / "python" / "dlpack_state.c")

    flags = ["-O1" if asan else "-O2", "-g", "-fPIC", "-pthread", "-fno-strict-aliasing"]
    if asan:
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer"]
    cxx = os.environ.get("CXX", "g++")
    cc = os.environ.get("CC", "gcc")
    inc = ["-I", str(HERE / "include")]
    rpath = ["-Wl,-rpath,$ORIGIN"]

    _run([cxx, "-std=c++17", *flags, *inc, "-shared", *_sources("runtime_*.cpp"),
          "-o", str(tmp / "libshampoo_emu_cudart.so")])
    rt = ["-L", str(tmp), "-lshampoo_emu_cudart", *rpath]
    # cuBLAS of CUDA 13 and of CUDA 12, so that each reference cuSOLVER has its release's
    # cuBLAS (_backend loads them as matched pairs only)
    for soname in ("libcublas.so.13", "libcublas.so.12"):
        _run([cxx, "-std=c++17", *flags, *inc, "-I", str(HERE), "-shared",
              str(HERE / "ref_blas.cpp"), f"-Wl,-soname,{soname}", "-o", str(tmp / soname),
              *rt])
    solver = [str(HERE / "ref_solver.cpp"), str(HERE / "ref_eigh.cpp"), str(HERE / "ref_qr.cpp")]
    for soname, extra in (("libcusolver.so.12", [str(HERE / "ref_xsyev.cpp")]),
                          ("libcusolver.so.11", [])):
        _run([cxx, "-std=c++17", *flags, *inc, "-I", str(HERE), "-shared", *solver, *extra,
              f"-Wl,-soname,{soname}", "-o", str(tmp / soname), *rt])

    objs = []
    for p in sorted(cuda_dir.glob("*.cu")):
        obj = tmp / (p.name + ".o")
        # -ffp-contract=off: no fused multiply-adds, as nvcc's -fmad=false
        _run([cxx, "-std=c++17", *flags, "-ffp-contract=off", "-x", "c++", *inc, "-include",
              "cuda_runtime.h", f'-DSHAMPOO_CUDA_ARCHS="{archs}"', "-Wall", "-Wno-unused-function", "-c", str(p), "-o", str(obj)])
        objs.append(str(obj))
    py_inc = sysconfig.get_paths()["include"]
    for rel in ["cuda/cuda_libs.c", *BINDING_C]:
        obj = tmp / (rel.replace("/", "_") + ".o")
        _run([cc, "-std=c11", *flags, "-ffp-contract=off", "-I", py_inc, "-c", str(src / rel),
              "-o", str(obj)])
        objs.append(str(obj))
    ext = sysconfig.get_config_var("EXT_SUFFIX")
    _run([cxx, *flags, "-shared", *objs, "-o", str(tmp / f"_C_cuda{ext}"), *rt, "-ldl"])

    manifest = {
        "options": options,
        "launches_rewritten": launches,
        "overrides": overrides,
        "missing_overrides": sorted(set(overrides) - hit),
        "archs": archs,
        "grid_y_limit": SMALL_GRID_Y if small_caps else 65535,
        "blas_batch_limit": SMALL_MAX_BATCH if small_caps else None,
        "module": f"_C_cuda{ext}",
    }
    (tmp / "build.json").write_text(json.dumps(manifest, indent=1))
    if manifest["missing_overrides"]:
        print(f"cuda_emu: no source defines {manifest['missing_overrides']} any more; "
              "update SMALL_CAPS in tools/cuda_emu/build.py", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--asan", action="store_true")
    ap.add_argument("--small-caps", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    print(build(a.asan, a.small_caps, a.out))


if __name__ == "__main__":
    main()
