"""The torch side of the CUDA emulator (tools/cuda_emu/README.md): with a CPU-only torch,
makes "cuda" tensors that hold host memory, so that distributed_shampoo._backend and the
CUDA tests run unchanged against the emulated _C_cuda.

* EmuCudaTensor: a wrapper subclass whose .device is cuda:<i> and whose data is a CPU tensor;
  every aten op runs on the CPU tensor. Its __dlpack__ hands the CPU buffer out labelled
  kDLCUDA, so the binding's device/host argument checks run as on a GPU.
* A TorchFunctionMode turns factories and .to/.cuda with a cuda device into EmuCudaTensors
  (per host thread: call enter_thread() in threads you start).
* torch.cuda's device, stream and event API, backed by the emulated runtime's streams
  (torch_emu_cuda.py).
* install() points _backend at the emulated module, wrapping every entry point so that each
  call is checked for launches, copies and library calls off the caller's stream or device
  (EmuViolation).

Process-wide: install only in a process that runs emulator tests (tools/cuda_emu/run.py,
or pytest with SHAMPOO_CUDA_EMU set; tests/conftest.py).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import types
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from torch_emu_cuda import cuda_device, current_device, patch_torch_cuda

_KDL_CUDA = 2


class EmuViolation(AssertionError):
    """A launch, copy or library call that a GPU would reject or that breaks the package's
    stream/device contract (recorded by the emulated runtime or reference libraries)."""


# ------------------------------------------------------------------------------ tensors


class EmuCudaTensor(torch.Tensor):
    """A "cuda" tensor whose data is the CPU tensor `_inner`."""

    _inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor, device: torch.device):
        r = torch.Tensor._make_wrapper_subclass(
            cls, inner.size(), strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, layout=inner.layout, device=device,
            requires_grad=inner.requires_grad,
        )
        r._inner = inner
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def _version(self) -> int:  # type: ignore[override]
        # a real CUDA view shares its base's version counter; the wrappers of a view do not
        # (each is a new subclass instance), their CPU tensors do
        return self._inner._version

    def __repr__(self) -> str:
        return f"EmuCudaTensor({self._inner!r}, device='{self.device}')"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        devices: list[torch.device] = []
        wrappers: dict[int, EmuCudaTensor] = {}

        def unwrap(x):
            if isinstance(x, EmuCudaTensor):
                devices.append(x.device)
                wrappers[id(x._inner)] = x
                return x._inner
            return x

        args = tree_map(unwrap, args)
        kwargs = tree_map(unwrap, kwargs)
        target = devices[0] if devices else None
        if "device" in kwargs and kwargs["device"] is not None:
            want = torch.device(kwargs["device"])
            target = cuda_device(want)
            kwargs["device"] = torch.device("cpu")
        if len({(d.type, d.index) for d in devices}) > 1 and func not in _CROSS_DEVICE_OK:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two "
                f"devices, {devices[0]} and {devices[1]}!"
            )
        out = func(*args, **kwargs)

        def wrap(x):
            if isinstance(x, torch.Tensor) and not isinstance(x, EmuCudaTensor):
                if id(x) in wrappers:
                    return wrappers[id(x)]  # in-place / out=: the caller's tensor
                if target is not None:
                    return EmuCudaTensor(x, target)
            return x

        return tree_map(wrap, out)

    def __dlpack__(self, *, stream: Any = None, max_version: Any = None, dl_device: Any = None,
                   copy: Any = None):
        inner = self._inner
        if max_version is not None:
            try:
                cap = inner.__dlpack__(max_version=max_version)
            except TypeError:
                cap = inner.__dlpack__()
        else:
            cap = inner.__dlpack__()
        _relabel(cap, self.device.index or 0)
        return cap

    def __deepcopy__(self, memo):
        # torch's deepcopy goes through the storage, which a wrapper subclass does not have
        if id(self) in memo:
            return memo[id(self)]
        out = EmuCudaTensor(_aligned_copy(self._inner), self.device)
        if self.requires_grad:
            out.requires_grad_(True)
        memo[id(self)] = out
        return out

    def __dlpack_device__(self):
        return (_KDL_CUDA, self.device.index or 0)

    def numpy(self, *args, **kwargs):
        raise TypeError(
            f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to copy "
            "the tensor to host memory first."
        )


_CROSS_DEVICE_OK = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}

_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype = ctypes.c_char_p
_capsule_name.argtypes = [ctypes.py_object]
_capsule_ptr = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_ptr.restype = ctypes.c_void_p
_capsule_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _relabel(capsule: Any, device_id: int) -> None:
    """Rewrites the DLDevice of a CPU DLPack capsule to (kDLCUDA, device_id)."""
    name = _capsule_name(capsule)
    ptr = _capsule_ptr(capsule, name)
    # DLManagedTensorVersioned: version (2 x u32), manager_ctx, deleter, flags, then DLTensor;
    # DLManagedTensor: DLTensor first. DLTensor: data pointer, then DLDevice (i32, i32).
    dl_tensor = ptr + (32 if name == b"dltensor_versioned" else 0)
    dev = (ctypes.c_int32 * 2).from_address(dl_tensor + 8)
    if dev[0] != 1:
        raise RuntimeError(f"cuda_emu: expected a CPU capsule, got device type {dev[0]}")
    dev[0], dev[1] = _KDL_CUDA, device_id


# torch's CUDA caching allocator hands out 512-byte aligned blocks (cudaMalloc: 256); the
# CPU allocator only 64. Fresh "cuda" tensors get the GPU's alignment, since code may rely on
# it (cublasSetWorkspace requires 256).
_ALIGN = 512


def _aligned_copy(t: torch.Tensor, dtype: Any = None) -> torch.Tensor:
    dtype = dtype or t.dtype
    if t.layout != torch.strided:
        return t.detach().to(device="cpu", dtype=dtype, copy=True)
    nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + _ALIGN, dtype=torch.uint8)
    off = (-raw.data_ptr()) % _ALIGN
    out = raw[off:off + nbytes].view(dtype).view(t.shape)
    out.copy_(t.detach())
    return out


def to_emu(t: torch.Tensor, device: torch.device, dtype: Any = None) -> EmuCudaTensor:
    inner = _aligned_copy(t, dtype)
    out = EmuCudaTensor(inner, device)
    if t.requires_grad:
        out.requires_grad_(True)
    return out


class EmuFunctionMode(TorchFunctionMode):
    """Factories and .to()/.cuda() naming a cuda device produce EmuCudaTensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and not isinstance(args[0], EmuCudaTensor):
            parse = {k: v for k, v in kwargs.items() if k != "copy"}
            device, dtype, _non_blocking, _fmt = torch._C._nn._parse_to(*args[1:], **parse)
            target = cuda_device(device)
            if target is not None:
                return to_emu(args[0], target, dtype)
        elif func is torch.Tensor.cuda:
            dev = args[1] if len(args) > 1 else kwargs.get("device")
            target = cuda_device(dev if dev is not None else "cuda")
            if isinstance(args[0], EmuCudaTensor) and args[0].device == target:
                return args[0]
            return to_emu(args[0], target)
        elif func is torch.Tensor.record_stream:
            return None
        elif func is torch.Tensor.pin_memory and not isinstance(args[0], EmuCudaTensor):
            # host memory is all the emulator has; pinned or not makes no difference here
            return args[0].clone()
        elif func is torch.Tensor.is_pinned and not isinstance(args[0], EmuCudaTensor):
            return True
        elif func is torch.Tensor.tolist and isinstance(args[0], EmuCudaTensor):
            return args[0]._inner.tolist()
        emus = [a for a in (*args, *kwargs.values()) if isinstance(a, EmuCudaTensor)]
        if emus:
            # Plain CPU tensors beside emulated ones (a copy_ source, an index, a 0-dim
            # scalar) are lifted to the same device without a copy: torch's dispatcher would
            # otherwise look for a CUDA device guard this build does not have.
            dev = emus[0].device

            def lift(x):
                if isinstance(x, torch.Tensor) and not isinstance(x, EmuCudaTensor):
                    return EmuCudaTensor(x, dev)
                return x

            if func is torch.where and len(args) == 3:
                # torch.where's Scalar overloads wrap the number in a fresh CUDA tensor below
                # the Python dispatcher, where this CPU-only torch has no CUDA kernels: a
                # 0-dim tensor of the number (same promotion: 0-dim) takes its place
                args = tuple(torch.tensor(a) if isinstance(a, (bool, int, float)) else a
                             for a in args)
            try:
                return func(*tree_map(lift, args), **tree_map(lift, kwargs))
            except RuntimeError as e:
                if "not linked with support for cuda" not in str(e):
                    raise
            # Bindings that take a CUDA device guard before dispatch (copy_, indexing):
            # run them on the CPU tensors and wrap what comes back.
            return _on_inner(func, args, kwargs, dev)
        if "device" in kwargs:
            target = cuda_device(kwargs["device"])
            if target is not None:
                kwargs = dict(kwargs, device="cpu")
                out = func(*args, **kwargs)
                return tree_map(
                    lambda x: EmuCudaTensor(_aligned_copy(x), target)
                    if isinstance(x, torch.Tensor) else x, out
                )
        return func(*args, **kwargs)


def _on_inner(func, args, kwargs, dev: torch.device):
    wrappers: dict[int, EmuCudaTensor] = {}

    def unwrap(x):
        if isinstance(x, EmuCudaTensor):
            wrappers[id(x._inner)] = x
            return x._inner
        return x

    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))

    def wrap(x):
        if isinstance(x, torch.Tensor) and not isinstance(x, EmuCudaTensor):
            return wrappers[id(x)] if id(x) in wrappers else EmuCudaTensor(x, dev)
        return x

    return tree_map(wrap, out)



# ------------------------------------------------------------------------------ the module


class Emulator:
    """A loaded emulator build: the module, and ctypes handles on its runtime and libraries."""

    def __init__(self, build_dir: Path, cusolver: str = "libcusolver.so.12"):
        self.dir = Path(build_dir)
        self.manifest = json.loads((self.dir / "build.json").read_text())
        self.rt = ctypes.CDLL(str(self.dir / "libshampoo_emu_cudart.so"), mode=ctypes.RTLD_GLOBAL)
        # the cuBLAS of cusolver's CUDA release, chosen by _backend's own pairing rule
        from distributed_shampoo import _backend as B

        self.solver_path = str(self.dir / cusolver)
        pairs = B._library_pairs([str(self.dir / "libcublas.so.13"),
                                  str(self.dir / "libcublas.so.12")], [self.solver_path])
        if not pairs:
            raise RuntimeError(f"cuda_emu: no reference cuBLAS pairs with {cusolver}")
        self.blas_path = pairs[0][0]
        self.blas = ctypes.CDLL(self.blas_path, mode=ctypes.RTLD_GLOBAL)
        self.solver = ctypes.CDLL(self.solver_path, mode=ctypes.RTLD_GLOBAL)
        _declare(self.rt, self.blas, self.solver)
        spec = importlib.util.spec_from_file_location(
            "distributed_shampoo._C_cuda", self.dir / self.manifest["module"]
        )
        self.raw = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.raw)
        self.module = _checked_module(self.raw, self.rt)
        self.module.load_libraries([self.blas_path], [self.solver_path])
        if self.manifest["options"]["small_caps"]:
            self.rt.emu_rt_set_grid_limits(self.manifest["grid_y_limit"], 65535)
        self._small_batch()

    def _small_batch(self) -> None:
        """In --small-caps builds, batched cuBLAS calls above the rewritten cap are refused."""
        limit = self.manifest.get("blas_batch_limit")
        if limit:
            self.blas.emu_blas_set_max_batch(limit)

    def reset(self) -> None:
        """Clears injected failures, sticky errors and counters."""
        self.rt.emu_rt_reset()
        self.blas.emu_blas_reset()
        self._small_batch()
        self.solver.emu_solver_reset()
        self.rt.emu_rt_take_violations(None, 0)


def _declare(rt: ctypes.CDLL, blas: ctypes.CDLL, solver: ctypes.CDLL) -> None:
    c = ctypes
    rt.emu_rt_begin_call.argtypes = [c.c_uint64, c.c_int]
    rt.emu_rt_end_call.argtypes = [c.c_char_p, c.c_size_t]
    rt.emu_rt_take_violations.argtypes = [c.c_char_p, c.c_size_t]
    rt.emu_rt_fail.argtypes = [c.c_char_p, c.c_long, c.c_int]
    rt.emu_rt_set_grid_limits.argtypes = [c.c_uint, c.c_uint]
    rt.emu_rt_stream_create.argtypes = [c.c_int]
    rt.emu_rt_stream_create.restype = c.c_uint64
    rt.emu_rt_stream_destroy.argtypes = [c.c_uint64]
    rt.emu_rt_launch_count.restype = c.c_long
    blas.emu_blas_fail.argtypes = [c.c_char_p, c.c_long, c.c_int]
    blas.emu_blas_set_max_batch.argtypes = [c.c_long]
    blas.emu_blas_gemm_calls.restype = c.c_long
    blas.emu_blas_largest_batch.restype = c.c_long
    solver.emu_solver_fail.argtypes = [c.c_char_p, c.c_long, c.c_int]
    solver.emu_solver_fail_matrix.argtypes = [c.c_double, c.c_int]
    solver.emu_solver_calls.argtypes = [c.c_char_p]
    solver.emu_solver_calls.restype = c.c_long


def _call_device(args: tuple) -> int:
    for a in args:
        if isinstance(a, EmuCudaTensor):
            return a.device.index or 0
    return current_device()


def _checked_module(raw: types.ModuleType, rt: ctypes.CDLL) -> types.SimpleNamespace:
    """The module's functions, each run as one checked call (EmuViolation on a violation)."""
    ns = types.SimpleNamespace()
    for name in dir(raw):
        fn = getattr(raw, name)
        if name.startswith("_") or not callable(fn):
            setattr(ns, name, fn)
            continue
        if name in ("load_libraries", "library_info", "soap_workspace_bytes", "io_workspace_bytes"):  # no device work
            setattr(ns, name, fn)
            continue

        def checked(*args, _fn=fn, _name=name):
            if _name == "workspace_bytes":
                stream, device = args[1], args[2]
            else:
                stream, device = args[0], _call_device(args)
            rt.emu_rt_begin_call(int(stream), int(device))
            error = None
            try:
                result = _fn(*args)
            except Exception as e:  # reported with the violations behind it, if any
                error = e
            buf = ctypes.create_string_buffer(16384)
            n = rt.emu_rt_end_call(buf, len(buf))
            if n:
                text = buf.value.decode(errors="replace").strip()
                raise EmuViolation(f"{_name}: {text}") from error
            if error is not None:
                raise error
            return result

        checked.__name__ = name
        setattr(ns, name, checked)
    return ns


_installed: Emulator | None = None
_mode: EmuFunctionMode | None = None


def enter_thread() -> None:
    """Makes cuda factories work in the calling thread (the mode is per thread in torch)."""
    EmuFunctionMode().__enter__()


def install(build_dir: Path | str, cusolver: str = "libcusolver.so.12",
            device_count: int = 1) -> Emulator:
    """Loads the build, patches torch.cuda and distributed_shampoo._backend (process-wide)."""
    global _installed, _mode
    if _installed is not None:
        return _installed
    emu = Emulator(Path(build_dir), cusolver)
    emu.rt.emu_rt_set_device_count(device_count)
    patch_torch_cuda(emu.rt, device_count)
    _mode = EmuFunctionMode()
    _mode.__enter__()
    use_module(emu)
    _installed = emu
    return emu


def use_module(emu: Emulator) -> None:
    """Points _backend's CUDA entries at emu's module."""
    from distributed_shampoo import _backend as B

    B._C_cuda = emu.module
    for op in B._OPS:
        for dtype, sfx in (("float32", "f32"), ("float64", "f64")):
            B._ENTRY[(op, dtype, "cuda")] = getattr(emu.module, f"{op}_{sfx}")
    B._DEVICES = sorted({device for _, _, device in B._ENTRY})
    B._ensure_cuda_libraries = lambda: None
    B._cuda_ready = True
    B._BLAS_WORKSPACES.clear()

