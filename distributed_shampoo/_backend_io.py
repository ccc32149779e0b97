"""The door to the pointer-table kernels (csrc/core/param_io.h): gradients read and
parameters written where they are, so a step needs no model-sized param-layout copy of
either (issue 11). CPU only; the CUDA kernels still go through param-layout buffers
(_backend.gather / finish / scatter).

A tensor list holds one entry per parameter of the group (a contiguous torch.Tensor that
does not require grad, in the kernels' float dtype or, for float32 kernels, bfloat16; None
for a parameter without a gradient); an IOLocator says where each block's tensor sits in the
group's param layout, so that the block table's PARAM_OFFSET and strides address it. The
binding proves every active block inside its tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def _kernel(op: str, bits: int) -> Any:
    return getattr(_C, f"{op}_f{bits}")


def _bits(op: str, float_buffer: Any, tensors: Sequence[Any]) -> int:
    like = float_buffer
    if like is None:
        like = next((t for t in tensors if t is not None), None)
    bits = _KERNEL_BITS.get(getattr(like, "dtype", None))
    if bits is None:
        raise TypeError(f"{op}: no float32, bfloat16 or float64 buffer to choose the kernels by")
    return bits


def gather_io(
    grad_blocks: Any | None, param_blocks: Any | None, grads: Sequence[Any],
    params: Sequence[Any] | None, locator: IOLocator, table: Any, active: Any,
    l2_weight_decay: float, sq_norms: Any = None,
) -> int:
    """_backend.gather reading the gradients (and parameters) in place; grad_blocks=None
    only checks: returns the first active block whose G + wd * W holds NaN/Inf, or -1, and
    fills `sq_norms` (float64 per block) with ||G + wd * W||_F^2."""
    _backend._checked("gather_io", ("grad_blocks", "param_blocks", "sq_norms"),
                      (grad_blocks, param_blocks, sq_norms))
    bits = _bits("gather_io", grad_blocks, grads)
    return _kernel("gather_io", bits)(
        grad_blocks, param_blocks, grads, params, locator.tensor_offsets, locator.block_tensor,
        _backend._host_table(table), active, float(l2_weight_decay), sq_norms,
    )


def finish_io(
    params: Sequence[Any], locator: IOLocator, grads: Any, shampoo_dir: Any | None,
    grafting_state: Any | None, momentum_state: Any | None, table: Any, active: Any, *,
    graft: str, grafting_phase: bool, grafting_bias_correction: float, grafting_epsilon: float,
    decoupled_weight_decay: float, momentum: float, dampening: float, nesterov: bool,
    lr: float,
) -> None:
    """_backend.finish fused with the parameter update: every active block's parameters
    W <- W + update in place (decoupled weight decay reads W before it is written)."""
    code = _backend._GRAFTS.get(graft)
    if code is None:
        raise ValueError(f"finish_io: argument 'graft' must be one of {sorted(_backend._GRAFTS)}, got {graft!r}")
    _backend._checked("finish_io", ("grads", "shampoo_dir", "grafting_state", "momentum_state"),
                      (grads, shampoo_dir, grafting_state, momentum_state))
    _kernel("finish_io", _bits("finish_io", grads, params))(
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
    _kernel("scatter_io", _bits("scatter_io", blocks, params))(
        params, locator.tensor_offsets, locator.block_tensor, blocks,
        _backend._host_table(table), active, bool(accumulate),
    )
