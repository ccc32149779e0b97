"""Where one parameter group's state lives: flat buffers in block layout and the nested
per-block views of them that state_dict() exposes (SPEC B §3, §8.1), plus the scratch helpers
of the step. A mixin of ShampooGroupEngine (shampoo_group_engine.py), which allocates them."""

from typing import Any

import torch

from distributed_shampoo import _backend


class GroupStateLayout:
    """Per-block views and descriptions of an engine's flat state buffers."""

    # set by ShampooGroupEngine.__init__
    layout: Any
    locals: list[torch.Tensor]
    params: list[torch.Tensor]
    group_index: int
    device: torch.device

    def _scratch_like(self, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A scratch buffer allocated on first use and kept (no allocation per step)."""
        key = (name, dtype)
        buffer = self._scratch.get(key)
        if buffer is None:
            buffer = self._scratch[key] = torch.empty(like.numel(), dtype=dtype, device=self.device)
        return buffer

    def _working(self, name: str, state: torch.Tensor | None, dtype: torch.dtype) -> Any:
        """`state` itself when stored in `dtype`, else a working copy in scratch (SPEC B §6.2)."""
        if state is None or state.dtype == dtype:
            return state
        return self._scratch_like(name, state, dtype).copy_(state)

    # ---------------------------------------------------------------------- state access
    def block_states(self) -> dict[int, dict[str, dict[str, Any]]]:
        """Per parameter index: {block_key: nested state dict of live views} (SPEC B §8.1).
        Factor matrices and inverse roots are views of packed storage: 1-D, d(d+1)/2 elements
        (the upper triangle by rows; loading also accepts full d x d tensors)."""
        layout = self.layout
        table = layout.table.numpy()
        packed_at = 0
        states: dict[int, dict[str, dict[str, Any]]] = {}
        for b, key in enumerate(layout.block_keys):
            row = table[b]
            shape = layout.block_shapes[b]
            offset, numel = int(row[_backend.BF_BLOCK_OFFSET]), int(row[_backend.BF_NUMEL])
            first_factor = int(row[_backend.BF_FACTOR_INDEX])
            factors: dict[int, Any] = {}
            inverses: dict[int, Any] = {}
            diagonal: dict[int, Any] = {}
            for k, d in enumerate(shape):
                view = slice(packed_at, packed_at + d * (d + 1) // 2)
                factors[k] = {"quantized_values": self.factors[view]}
                inverses[k] = {"quantized_values": self.inv_factors[view]}
                diagonal[k] = self.diagonal[first_factor + k]
                packed_at += d * (d + 1) // 2
            state: dict[str, Any] = {
                "shampoo": {
                    "factor_matrices": factors,
                    "inv_factor_matrices": inverses,
                    "is_factor_matrices_diagonal": diagonal,
                }
            }
            for name, buffer in (
                ("adagrad", self.grafting_state),
                ("momentum", self.momentum),
                ("filtered_grad", self.filtered_grad),
            ):
                if buffer is not None:
                    state[name] = {"quantized_values": buffer[offset : offset + numel].view(shape)}
            states.setdefault(int(layout.block_param[b]), {})[key] = state
        return states

    def describe_block(self, block: int) -> str:
        p = int(self.layout.block_param[block])
        return (
            f"parameter {p} of param group {self.group_index} "
            f"(shape {tuple(self.params[p].shape)}), block {self.layout.block_keys[block]} "
            f"(shape {self.layout.block_shapes[block]})"
        )

    def _describe_param(self, i: int) -> str:
        return f"parameter {i} of param group {self.group_index} (shape {tuple(self.params[i].shape)})"
