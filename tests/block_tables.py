"""Block tables and block views built in NumPy from SPEC B §2.2, independent of the extension:
the kernel tests use them to lay out inputs and to read expected values block by block."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from distributed_shampoo import _backend as B


def split_slices(shape: Sequence[int], max_dim: int) -> List[Tuple[slice, ...]]:
    """SPEC §2.2 as torch.split does it: chunks of max_dim per dim (one empty chunk for a
    zero dim), dim 0 outermost."""
    per_dim = [
        [slice(s, min(s + max_dim, n)) for s in range(0, n, max_dim)] or [slice(0, 0)]
        for n in shape
    ]
    return [tuple(c) for c in itertools.product(*per_dim)]


@dataclass
class Block:
    param: int                    # index of the parameter it belongs to
    index: Tuple[slice, ...]      # where it sits in that parameter
    shape: Tuple[int, ...]
    block_offset: int             # block layout
    factor_offset: int            # factor layout
    factor_index: int             # per-factor arrays


@dataclass
class Layout:
    shapes: List[Tuple[int, ...]]
    blocks: List[Block]
    table: np.ndarray             # int64 (n_blocks, BF_COUNT)
    param_offsets: List[int]
    param_numel: int
    block_numel: int
    factor_numel: int
    factor_count: int

    def param_views(self, flat: np.ndarray) -> List[np.ndarray]:
        return [flat[o:o + int(np.prod(s, dtype=np.int64))].reshape(s)
                for o, s in zip(self.param_offsets, self.shapes)]

    def block_view(self, flat: np.ndarray, b: int) -> np.ndarray:
        blk = self.blocks[b]
        n = int(np.prod(blk.shape, dtype=np.int64))
        return flat[blk.block_offset:blk.block_offset + n].reshape(blk.shape)

    def factor_views(self, flat: np.ndarray, b: int) -> List[np.ndarray]:
        blk, out, off = self.blocks[b], [], self.blocks[b].factor_offset
        for d in blk.shape:
            out.append(flat[off:off + d * d].reshape(d, d))
            off += d * d
        return out


def make_layout(shapes: Sequence[Tuple[int, ...]], max_dim: int, root: int = 2) -> Layout:
    """Blocks of parameters of `shapes` (no merging), concatenated in one table."""
    rows, blocks, param_offsets = [], [], []
    p_off = b_off = f_off = f_idx = 0
    for p, shape in enumerate(shapes):
        shape = tuple(shape)
        strides = [int(np.prod(shape[k + 1:], dtype=np.int64)) for k in range(len(shape))]
        param_offsets.append(p_off)
        for index in split_slices(shape, max_dim):
            bshape = tuple(s.stop - s.start for s in index)
            numel = int(np.prod(bshape, dtype=np.int64))
            row = np.zeros(B.BF_COUNT, dtype=np.int64)
            row[B.BF_ORDER] = len(shape)
            row[B.BF_NUMEL] = numel
            row[B.BF_BLOCK_OFFSET] = b_off
            row[B.BF_FACTOR_OFFSET] = f_off
            row[B.BF_FACTOR_INDEX] = f_idx
            row[B.BF_PARAM_OFFSET] = (
                p_off + sum(s.start * st for s, st in zip(index, strides)) if numel else 0
            )
            row[B.BF_ROOT] = root
            row[B.BF_DIMS:B.BF_DIMS + len(shape)] = bshape
            row[B.BF_STRIDES:B.BF_STRIDES + len(shape)] = strides
            rows.append(row)
            blocks.append(Block(p, index, bshape, b_off, f_off, f_idx))
            b_off += numel
            f_off += sum(d * d for d in bshape)
            f_idx += len(shape)
        p_off += int(np.prod(shape, dtype=np.int64))
    table = np.array(rows, dtype=np.int64).reshape(len(rows), B.BF_COUNT)
    return Layout([tuple(s) for s in shapes], blocks, table, param_offsets, p_off, b_off,
                  f_off, f_idx)


def eps(dtype) -> float:
    return float(np.finfo(dtype).eps)
