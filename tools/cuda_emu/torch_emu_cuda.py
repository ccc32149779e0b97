"""torch.cuda's device, stream and event API for the CUDA emulator (tools/cuda_emu/README.md),
for a CPU-only torch: the current device and stream per host thread, streams that are the
emulated runtime's (so the binding's stream checks see real handles), events that record host
time, and torch.Generator(device="cuda") as a CPU generator. torch_emu.install() patches
torch.cuda with them (patch_torch_cuda)."""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import torch

_state = threading.local()
_rt: ctypes.CDLL | None = None
_device_count = 1


def cuda_device(device: Any) -> torch.device | None:
    """The indexed cuda device `device` names, or None for any other device."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cuda", device)
    d = torch.device(device)
    if d.type != "cuda":
        return None
    return d if d.index is not None else torch.device("cuda", current_device())



def current_device() -> int:
    return getattr(_state, "device", 0)


class FakeStream:
    """torch.cuda.Stream on the emulated runtime (cuda_stream: the runtime's handle)."""

    def __init__(self, device: Any = None, priority: int = 0, *, _handle: int | None = None):
        d = cuda_device(device if device is not None else "cuda")
        self.device = d
        self.device_index = d.index
        self.priority = priority
        if _handle is None:
            _handle = _rt.emu_rt_stream_create(d.index)
            if _handle == 0:
                raise RuntimeError("cuda_emu: stream creation failed")
        self.cuda_stream = _handle

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> FakeEvent:
        event = event or FakeEvent()
        event.record(self)
        return event

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, FakeStream) and other.cuda_stream == self.cuda_stream and (
            other.device == self.device)

    def __hash__(self) -> int:
        return hash((self.cuda_stream, self.device.index))

    def __repr__(self) -> str:
        return f"<FakeStream device={self.device} cuda_stream={self.cuda_stream:#x}>"


_default_streams: dict[int, FakeStream] = {}


def default_stream(device: Any = None) -> FakeStream:
    d = cuda_device(device if device is not None else "cuda")
    if d.index not in _default_streams:
        _default_streams[d.index] = FakeStream(d, _handle=0)
    return _default_streams[d.index]


def current_stream(device: Any = None) -> FakeStream:
    d = cuda_device(device if device is not None else "cuda")
    streams = getattr(_state, "streams", None) or {}
    return streams.get(d.index) or default_stream(d)


class stream_context:
    """torch.cuda.stream(s): s is the current stream of its device inside the block."""

    def __init__(self, stream: FakeStream | None):
        self.stream = stream

    def __enter__(self):
        if self.stream is None:
            return None
        if not hasattr(_state, "streams"):
            _state.streams = {}
        idx = self.stream.device.index
        self.saved = _state.streams.get(idx)
        _state.streams[idx] = self.stream
        return self.stream

    def __exit__(self, *exc):
        if self.stream is not None:
            _state.streams[self.stream.device.index] = self.saved
        return False


class FakeEvent:
    def __init__(self, enable_timing: bool = False, blocking: bool = False,
                 interprocess: bool = False):
        self.enable_timing = enable_timing
        self.recorded = False
        self.time = 0.0

    def record(self, stream: FakeStream | None = None) -> None:
        import time

        self.recorded = True
        self.time = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def elapsed_time(self, end: FakeEvent) -> float:
        if not (self.enable_timing and end.enable_timing and self.recorded and end.recorded):
            raise RuntimeError("cuda_emu: elapsed_time needs two recorded timing events")
        return (end.time - self.time) * 1e3


def _set_device(device: Any) -> None:
    d = cuda_device(device)
    if d is None or not 0 <= d.index < _device_count:
        raise RuntimeError("CUDA error: invalid device ordinal")
    _state.device = d.index


class _device_ctx:
    def __init__(self, device: Any):
        self.device = device

    def __enter__(self):
        self.saved = current_device()
        if self.device is not None:
            _set_device(self.device)

    def __exit__(self, *exc):
        _state.device = self.saved
        return False


_Generator = torch.Generator


class _EmuGenerator(_Generator):
    """torch.Generator(device="cuda"): a CPU generator (random numbers differ from a GPU's)."""

    def __new__(cls, device: Any = "cpu"):
        return _Generator.__new__(cls, "cpu" if cuda_device(device) is not None else device)

    def __init__(self, device: Any = "cpu"):
        pass


def patch_torch_cuda(rt: ctypes.CDLL, device_count: int) -> None:
    """Points torch.cuda's device, stream and event API here (process-wide); streams are
    rt's (the emulated runtime's), device_count devices."""
    global _rt, _device_count
    _rt = rt
    _device_count = device_count
    torch.Generator = _EmuGenerator
    c = torch.cuda
    c.is_available = lambda: True
    c.is_initialized = lambda: True
    c.init = lambda: None
    c._lazy_init = lambda: None
    c.device_count = lambda: _device_count
    c.current_device = current_device
    c.set_device = _set_device
    c.device = _device_ctx
    c.current_stream = current_stream
    c.default_stream = default_stream
    c.Stream = FakeStream
    c.stream = stream_context
    c.Event = FakeEvent
    c.synchronize = lambda device=None: None
    c.set_sync_debug_mode = lambda mode: None
    c.get_sync_debug_mode = lambda: 0
    c._sleep = lambda cycles: None
    c.empty_cache = lambda: None
    c.manual_seed = lambda seed: None
    c.manual_seed_all = lambda seed: None
    c.get_device_name = lambda device=None: "CUDA emulator (tools/cuda_emu)"
    c.get_device_capability = lambda device=None: (9, 0)
    c.memory_allocated = lambda device=None: 0
