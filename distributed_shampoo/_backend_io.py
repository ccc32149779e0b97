"""The door to the pointer-table kernels (csrc/core/param_io.h, csrc/cuda/param_io_cuda.h):
gradients read and parameters written where they are, so a step needs no model-sized
param-layout copy of either (issue 11), on the CPU and on CUDA alike. CUDA tensors go to the
CUDA kernels (_C_cuda, on torch's current stream of their device), which need the table as a
KernelTable, the mask `active` in HOST memory (the binding builds the per-block pointer
tables from it without waiting for the GPU) and, for gather_io's non-finite check, the
failure flag (`fail`, `step`) instead of a returned block.

A tensor list holds one entry per parameter of the group (a contiguous torch.Tensor that
does not require grad, in the kernels' float dtype or, for float32 kernels, bfloat16; None
for a parameter without a gradient); an IOLocator says where each block's tensor sits in the
group's param layout, so that the block table's PARAM_OFFSET and strides address it. The
binding proves every active block inside its tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from distributed_shampoo import _backend
from distributed_shampoo._backend import _C

_KERNEL_BITS = {torch.float32: 32, torch.bfloat16: 32, torch.float64: 64}


def io_dtype_ok(storage: torch.dtype, working: torch.dtype) -> bool:
    """Whether kernels computing in `working` read and write `storage` in place."""
    return storage == working or (storage == torch.bfloat16 and working == torch.float32)


class IOLocator:
    """Which tensor of a list each block lies in, and where that tensor starts in the
    param layout the table's PARAM_OFFSET counts in (built once per table)."""

    def __init__(self, tensor_offsets: Sequence[int], block_tensor: np.ndarray) -> None:
        self.tensor_offsets = torch.tensor(list(tensor_offsets), dtype=torch.int64)
        self.block_tensor = torch.from_numpy(np.ascontiguousarray(block_tensor, dtype=np.int64))


def cuda_io_available() -> bool:
    """Whether the CUDA pointer-table kernels are built (else CUDA steps stage)."""
    return _backend._C_cuda is not None and hasattr(_backend._C_cuda, "gather_io_f32")


def _kernel(op: str, bits: int) -> Any:
    return getattr(_C, f"{op}_f{bits}")


def _like(float_buffer: Any, tensors: Sequence[Any]) -> Any:
    """What a call is dispatched by: its float buffer, else its first tensor."""
    return float_buffer if float_buffer is not None else next((t for t in tensors if t is not None), None)


def _on_cuda(float_buffer: Any, tensors: Sequence[Any]) -> torch.device | None:
    """The CUDA device of the call, or None."""
    like = _like(float_buffer, tensors)
    return like.device if isinstance(like, torch.Tensor) and like.is_cuda else None


def _cuda_call(op: str, device: torch.device, table: Any, active: Any) -> tuple[Any, Any, Any, Any]:
    """The CUDA kernel's module, stream, KernelTable and workspace for one call of `op`."""
    if not cuda_io_available():
        raise TypeError(f"{op}: the CUDA pointer-table kernels are not built (distributed_shampoo._C_cuda)")
    if isinstance(active, torch.Tensor) and not active.is_cpu:
        raise ValueError(f"{op}: argument 'active' must be the host copy of the mask for CUDA tensors")
    module = _backend._C_cuda
    kt = _backend._cuda_table(op, table, SimpleNamespace(device=device))  # checks the table's device
    nbytes = module.io_workspace_bytes(op, kt.nblocks)
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=kt.device)
    return module, _backend._stream(kt.device), kt, workspace


def _bits(op: str, float_buffer: Any, tensors: Sequence[Any]) -> int:
    bits = _KERNEL_BITS.get(getattr(_like(float_buffer, tensors), "dtype", None))
    if bits is None:
        raise TypeError(f"{op}: no float32, bfloat16 or float64 buffer to choose the kernels by")
    return bits


def gather_io(
    grad_blocks: Any | None, param_blocks: Any | None, grads: Sequence[Any],
    params: Sequence[Any] | None, locator: IOLocator, table: Any, active: Any,
    l2_weight_decay: float, sq_norms: Any = None, *, step: int = 0, fail: Any = None,
) -> int:
    """_backend.gather reading the gradients (and parameters) in place; grad_blocks=None
    only checks: returns the first active block whose G + wd * W holds NaN/Inf, or -1, and
    fills `sq_norms` (float64 per block) with ||G + wd * W||_F^2. On CUDA the host does not
    wait for that answer: `fail` records it for step `step` (as _backend.gather; None: no
    check, for gradients checked already) and -1 is returned."""
    _backend._checked("gather_io", ("grad_blocks", "param_blocks", "sq_norms"),
                      (grad_blocks, param_blocks, sq_norms))
    bits = _bits("gather_io", grad_blocks, grads)
    device = _on_cuda(grad_blocks, grads)
    if device is not None:
        module, stream, kt, workspace = _cuda_call("gather_io", device, table, active)
        getattr(module, f"gather_io_f{bits}")(
            stream, workspace, grad_blocks, param_blocks, grads, params, locator.tensor_offsets,
            locator.block_tensor, kt.device_table, kt.host, active, float(l2_weight_decay),
            int(step), fail, sq_norms,
        )
        return -1
    return _kernel("gather_io", bits)(
        grad_blocks, param_blocks, grads, params, locator.tensor_offsets, locator.block_tensor,
        _backend._host_table(table), active, float(l2_weight_decay), sq_norms,
    )


def finish_io(
    params: Sequence[Any], locator: IOLocator, grads: Any, shampoo_dir: Any | None,
    grafting_state: Any | None, momentum_state: Any | None, table: Any, active: Any, *,
    graft: str, grafting_phase: bool, grafting_bias_correction: float, grafting_epsilon: float,
    decoupled_weight_decay: float, momentum: float, dampening: float, nesterov: bool,
    lr: float, fail: Any = None,
) -> None:
    """_backend.finish fused with the parameter update: every active block's parameters
    W <- W + update in place (decoupled weight decay reads W before it is written). CUDA:
    while `fail` records a failure nothing is written (parameters and momentum)."""
    code = _backend._GRAFTS.get(graft)
    if code is None:
        raise ValueError(f"finish_io: argument 'graft' must be one of {sorted(_backend._GRAFTS)}, got {graft!r}")
    _backend._checked("finish_io", ("grads", "shampoo_dir", "grafting_state", "momentum_state"),
                      (grads, shampoo_dir, grafting_state, momentum_state))
    bits = _bits("finish_io", grads, params)
    scalars = (code, bool(grafting_phase), float(grafting_bias_correction), float(grafting_epsilon),
               float(decoupled_weight_decay), float(momentum), float(dampening), bool(nesterov), float(lr))
    device = _on_cuda(grads, params)
    if device is not None:
        module, stream, kt, workspace = _cuda_call("finish_io", device, table, active)
        getattr(module, f"finish_io_f{bits}")(
            stream, workspace, params, locator.tensor_offsets, locator.block_tensor, grads, shampoo_dir,
            grafting_state, momentum_state, kt.device_table, kt.host, active, fail, *scalars,
        )
        return
    _kernel("finish_io", bits)(
        params, locator.tensor_offsets, locator.block_tensor, grads, shampoo_dir, grafting_state,
        momentum_state, _backend._host_table(table), active, code, bool(grafting_phase),
        float(grafting_bias_correction), float(grafting_epsilon), float(decoupled_weight_decay),
        float(momentum), float(dampening), bool(nesterov), float(lr),
    )


def scatter_io(
    params: Sequence[Any], locator: IOLocator, blocks: Any, table: Any, active: Any,
    accumulate: bool,
) -> None:
    """Every active block of `blocks` (block layout) into the parameters in place:
    W <- W + x when `accumulate`, else W <- x."""
    _backend._checked("scatter_io", ("blocks",), (blocks,))
    bits = _bits("scatter_io", blocks, params)
    device = _on_cuda(blocks, params)
    if device is not None:
        module, stream, kt, workspace = _cuda_call("scatter_io", device, table, active)
        getattr(module, f"scatter_io_f{bits}")(
            stream, workspace, params, locator.tensor_offsets, locator.block_tensor, blocks,
            kt.device_table, kt.host, active, bool(accumulate),
        )
        return
    _kernel("scatter_io", bits)(
        params, locator.tensor_offsets, locator.block_tensor, blocks,
        _backend._host_table(table), active, bool(accumulate),
    )
