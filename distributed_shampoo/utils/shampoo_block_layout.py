"""The block table of one parameter group: the only place flat-buffer offsets are computed.

Each parameter is merged (SPEC B §2.1) and blocked (§2.2) by the C planner; this module
concatenates the per-parameter plans into one table whose offsets address the group's flat
buffers (block_table.h), and records which parameter and block key each row belongs to.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distributed_shampoo import _backend


def root_for_order(order: int, inv_root_override: int | Sequence[int]) -> int:
    """SPEC B §4.6.1 with A.3.2: a list is indexed by tensor order and 0 means 2 * order."""
    if isinstance(inv_root_override, Sequence):
        override = inv_root_override[order] if order < len(inv_root_override) else 0
    else:
        override = inv_root_override
    return int(override) if override > 0 else 2 * order


@dataclass
class BlockLayout:
    """A block table and which parameter and key each row belongs to; sizes and the
    factor-to-block maps are derived from the table, which is the one source of truth."""

    table: torch.Tensor                  # int64 [num_blocks, BF_COUNT]
    block_param: np.ndarray              # int64 [num_blocks]: index of the block's parameter
    block_keys: list[str]                # "block_{k}", k restarting at 0 for each parameter
    param_offsets: list[int]             # element offset of each parameter, param layout
    param_numel: int                     # elements of all parameters (param-layout size)

    def __post_init__(self) -> None:
        rows = self.table.numpy()
        orders = rows[:, _backend.BF_ORDER].astype(np.int64)
        dims = rows[:, _backend.BF_DIMS : _backend.BF_DIMS + _backend.MAX_ORDER].astype(np.int64)
        self.block_shapes = [tuple(int(d) for d in row[:order]) for row, order in zip(dims, orders)]
        self.numel = int(rows[:, _backend.BF_NUMEL].sum())   # elements of these blocks
        self.factor_numel = int((dims**2).sum())             # elements of their factors
        self.factor_count = int(orders.sum())
        self.factor_block = np.repeat(np.arange(len(rows), dtype=np.int64), orders)
        self.factor_dim = np.arange(self.factor_count, dtype=np.int64) - np.repeat(
            rows[:, _backend.BF_FACTOR_INDEX], orders
        )

    @property
    def num_blocks(self) -> int:
        return len(self.block_keys)

    def factor_label(self, factor: int) -> str:
        """'{param_index}.{block_key}.{dim}' (SPEC B §2.3) for a flat factor index."""
        block = int(self.factor_block[factor])
        return f"{self.block_param[block]}.{self.block_keys[block]}.{int(self.factor_dim[factor])}"


def _compact_offsets(table: np.ndarray) -> torch.Tensor:
    """Block-layout, factor-layout and factor-index offsets packed in row order."""
    numel = table[:, _backend.BF_NUMEL]
    orders = table[:, _backend.BF_ORDER]
    dims = table[:, _backend.BF_DIMS : _backend.BF_DIMS + _backend.MAX_ORDER].astype(np.int64)
    factor_sizes = (dims**2).sum(axis=1)
    table[:, _backend.BF_BLOCK_OFFSET] = np.cumsum(numel) - numel
    table[:, _backend.BF_FACTOR_OFFSET] = np.cumsum(factor_sizes) - factor_sizes
    table[:, _backend.BF_FACTOR_INDEX] = np.cumsum(orders) - orders
    return torch.from_numpy(np.ascontiguousarray(table, dtype=np.int64))


@dataclass(frozen=True)
class TensorPiece:
    """A sub-tensor that is merged and blocked on its own: a whole parameter, or (FSDP) one
    of the valid sub-tensors its flattened shard is cut into (SPEC B §7.3.2)."""

    param_index: int
    shape: tuple[int, ...]
    offset: int  # element offset of the piece inside its parameter's local data


def whole_tensors(shapes: Sequence[tuple[int, ...]]) -> list[TensorPiece]:
    return [TensorPiece(i, tuple(shape), 0) for i, shape in enumerate(shapes)]


def build_block_layout(
    param_numels: Sequence[int],
    pieces: Sequence[TensorPiece],
    max_preconditioner_dim: int,
    use_merge_dims: bool,
    inv_root_override: int | Sequence[int],
    key_prefix: str = "block_",
) -> BlockLayout:
    """Blocks of every piece, in piece order; block keys count per parameter."""
    param_offsets = np.concatenate([[0], np.cumsum(param_numels, dtype=np.int64)])
    tables = []
    block_param: list[int] = []
    block_keys: list[str] = []
    blocks_per_param = [0] * len(param_numels)
    for piece in pieces:
        shape = piece.shape
        merged = (
            _backend.merge_small_dims(shape, max_preconditioner_dim) if use_merge_dims else shape
        )
        if len(merged) > _backend.MAX_ORDER:
            raise ValueError(
                f"Parameter {piece.param_index} has shape {tuple(shape)}, which blocks into order "
                f"{len(merged)} tensors; at most {_backend.MAX_ORDER} dimensions are supported "
                "(use use_merge_dims=True to merge small dimensions)."
            )
        plan = _backend.block_plan(merged, max_preconditioner_dim)
        orders = plan[:, _backend.BF_ORDER]
        plan[:, _backend.BF_ROOT] = [max(root_for_order(int(o), inv_root_override), 1) for o in orders]
        plan[:, _backend.BF_PARAM_OFFSET] += int(param_offsets[piece.param_index]) + piece.offset
        tables.append(plan)
        first = blocks_per_param[piece.param_index]
        blocks_per_param[piece.param_index] += len(plan)
        block_param.extend([piece.param_index] * len(plan))
        block_keys.extend(f"{key_prefix}{k}" for k in range(first, first + len(plan)))
    table = np.concatenate(tables) if tables else np.zeros((0, _backend.BF_COUNT), np.int64)
    return BlockLayout(
        table=_compact_offsets(table),
        block_param=np.asarray(block_param, dtype=np.int64),
        block_keys=block_keys,
        param_offsets=[int(o) for o in param_offsets[:-1]],
        param_numel=int(param_offsets[-1]),
    )


def select_blocks(layout: BlockLayout, keep: np.ndarray) -> BlockLayout:
    """The rows of `layout` where `keep` is True, with block/factor offsets recompacted.

    Parameter offsets and strides are kept: a subset still reads gradients from the whole
    group's param-layout buffer (e.g. the blocks one DDP rank owns).
    """
    indices = np.flatnonzero(keep)
    return BlockLayout(
        table=_compact_offsets(layout.table.numpy()[indices].copy()),
        block_param=layout.block_param[indices],
        block_keys=[layout.block_keys[i] for i in indices],
        param_offsets=layout.param_offsets,
        param_numel=layout.param_numel,
    )


def contiguous_destination(layout: BlockLayout) -> torch.Tensor:
    """A copy of the table whose param-layout address of each block is its block-layout
    address, with row-major strides: finish() then writes updates packed block after block
    (the DDP all-gather payload) instead of into the parameters' layout."""
    table = layout.table.numpy().copy()
    table[:, _backend.BF_PARAM_OFFSET] = table[:, _backend.BF_BLOCK_OFFSET]
    strides = table[:, _backend.BF_STRIDES : _backend.BF_STRIDES + _backend.MAX_ORDER]
    strides[:] = 0
    for row, stride in zip(table, strides):
        order = int(row[_backend.BF_ORDER])
        dims = row[_backend.BF_DIMS : _backend.BF_DIMS + order]
        stride[:order] = np.cumprod(np.concatenate([dims[1:], [1]])[::-1])[::-1]
    return torch.from_numpy(table)
