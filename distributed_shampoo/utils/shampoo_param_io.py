"""How one parameter group's step reads its gradients and writes its parameters (issue 11).

Direct (CPU and CUDA, every live parameter and gradient in the kernels' dtype or bfloat16 with
float32 kernels): the kernels read the gradients and write the parameters where they are,
through a per-block pointer table (_backend_io; on CUDA built on the host from the host copy
of the active mask and copied to the device on the step's stream), so the step holds no
param-layout copy of either and makes no separate `params += update` pass. On CUDA the
non-finite check records into the device failure flag, as the staged gather does, and a
failed step writes nothing. A non-contiguous gradient takes a transient contiguous copy (the
block table's strides assume a row-major tensor).

Staged (odd dtypes such as float16 parameters or a group mixing dtypes, and CUDA builds
without the pointer-table kernels): the gradients (and parameters) are copied into
param-layout buffers allocated for that step only, and updates are added by torch. These are
transient: nothing param-sized is kept between steps. Both paths give the same bits. A mixin
of ShampooGroupEngine.
"""

from dataclasses import dataclass
from typing import Any

import torch

from distributed_shampoo._backend_io import IOLocator, cuda_io_available, io_dtype_ok


@dataclass
class StepIO:
    """What one step reads and writes, decided in prepare() and used by apply()."""

    l2: float = 0.0
    # direct: the gradients, the parameters read for L2 decay (or DDP's payload), and the
    # parameters written in place; one entry per parameter, None where there is no gradient
    grads: list[torch.Tensor | None] | None = None
    params: list[torch.Tensor | None] | None = None
    params_all: list[torch.Tensor | None] | None = None
    param_blocks_wanted: bool = False  # DDP: the chunk's parameters in block layout too
    chunk_params: torch.Tensor | None = None  # ... the current chunk's (chunk scratch)
    # staged: this step's G (and W) in block layout, and the updates in param layout
    grad_blocks: torch.Tensor | None = None
    param_blocks: torch.Tensor | None = None
    update_flat: torch.Tensor | None = None


class ParamIO:
    """The direct/staged choice and the tensor lists of the pointer-table kernels."""

    # set by ShampooGroupEngine.__init__
    layout: Any
    full_layout: Any
    locals: list[torch.Tensor]
    working_dtype: torch.dtype
    device: torch.device
    on_cuda: bool
    _live: list[int]
    _active_params: tuple[bool, ...] | None

    def _init_param_io(self) -> None:
        self.locator = IOLocator(self.layout.param_offsets, self.layout.block_param)
        self.full_locator = IOLocator(self.full_layout.param_offsets, self.full_layout.block_param)

    def _direct_io(self, grads: list[torch.Tensor | None]) -> bool:
        """Whether this step's live parameters and gradients are read and written in place."""
        if self.on_cuda and not cuda_io_available():
            return False
        dtype = None
        for i in self._live:
            p, g = self.locals[i], grads[i]
            assert g is not None
            if dtype is None:
                dtype = p.dtype
            if p.dtype != dtype or g.dtype != dtype or not p.is_contiguous():
                return False
        return dtype is not None and io_dtype_ok(dtype, self.working_dtype)

    @staticmethod
    def _io_list(tensors: list[torch.Tensor | None], live: list[bool]) -> list[torch.Tensor | None]:
        """Detached (plain torch.Tensor) views for the live entries, None elsewhere; a
        non-contiguous gradient is copied (transient, this call only)."""
        out: list[torch.Tensor | None] = []
        for t, on in zip(tensors, live):
            if t is None or not on:
                out.append(None)
            else:
                t = t.detach()
                out.append(t if t.is_contiguous() else t.contiguous())
        return out

    def _live_mask(self) -> list[bool]:
        """Per parameter: has a gradient (the pattern set by _set_active)."""
        return list(self._active_params or ())

    def _live_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a param-layout buffer shaped as the live parameters."""
        offsets = self.layout.param_offsets
        return [flat[offsets[i] : offsets[i] + self.locals[i].numel()].view(self.locals[i].shape) for i in self._live]

    def _staged_flat(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A param-layout buffer for this step only and its views of the live parameters."""
        flat = torch.empty(self.layout.param_numel, dtype=self.working_dtype, device=self.device)
        return flat, self._live_views(flat)

    def _block_scratch(self) -> torch.Tensor:
        """A block-layout buffer for this step only (parameters in block layout)."""
        return torch.empty(self.layout.numel, dtype=self.working_dtype, device=self.device)

