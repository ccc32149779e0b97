"""Packed symmetric storage of an engine's factor matrices and inverse roots (issue 11), and
the bounded scratch in which kernels that need full matrices see them.

Each d x d factor (and its inverse root) is stored as its upper triangle by rows, d(d+1)/2
elements (csrc/core/sym_pack.h): about half the memory of the full matrices. The factor
update, the inverse roots and the preconditioning work on full matrices, so the blocks are cut
into chunks of consecutive blocks whose full factors and elements fit a budget (at least the
largest block's); a phase runs chunk by chunk: unpack into scratch, run the kernel on the chunk's table,
pack the results back. Scratch is then bounded by the budget, never by the model. Packing is
exact for the factors (the update keeps them bitwise symmetric); an inverse root is stored as
its symmetric part 0.5 (X + X^T), the nearest symmetric matrix (a computed root's rounding is
not symmetric: by ~1e-7 relative in float32 for the eigen method, by the iteration's error for
the coupled ones).
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distributed_shampoo import _backend

# Full-matrix elements per chunk at least (more blocks per kernel call for small blocks);
# otherwise the largest block's full factors once per thread (threads share a call's blocks).
MIN_CHUNK_ELEMENTS = 2**18
# CUDA: launches (and a root step's host waits) are per chunk, so chunks are larger there: a
# byte budget of 64 MiB of float32 scratch per buffer.
MIN_CHUNK_ELEMENTS_CUDA = 2**24


@dataclass
class Chunk:
    """Consecutive blocks [block_start, block_stop), their factors [factor_start, factor_stop)
    and packed elements [packed_start, packed_stop); `table` addresses a full-matrix scratch of
    full_numel elements and per-factor arrays sliced at factor_start."""

    block_start: int
    block_stop: int
    factor_start: int
    factor_stop: int
    packed_start: int
    packed_stop: int
    full_numel: int
    table: Any  # _backend.KernelTable


def packed_sizes(layout: Any) -> np.ndarray:
    """Packed elements of each block's factors."""
    rows = layout.table.numpy()
    dims = rows[:, _backend.BF_DIMS : _backend.BF_DIMS + _backend.MAX_ORDER]
    return (dims * (dims + 1) // 2).sum(axis=1) if len(rows) else np.zeros(0, np.int64)


def packed_offsets(layout: Any) -> np.ndarray:
    """Packed offset of every factor of the layout (factor order)."""
    offsets = []
    at = 0
    for shape in layout.block_shapes:
        for d in shape:
            offsets.append(at)
            at += d * (d + 1) // 2
    return np.asarray(offsets, dtype=np.int64)


def plan_chunks(layout: Any, device: torch.device, threads: int) -> list[Chunk]:
    rows = layout.table.numpy()
    full = (rows[:, _backend.BF_DIMS : _backend.BF_DIMS + _backend.MAX_ORDER] ** 2).sum(axis=1)
    # the step's block-layout chunk scratch (shampoo_step_pipeline.py) is in the budget too:
    # a high-order block holds far more elements than its factors
    cost = full + rows[:, _backend.BF_NUMEL]
    packed = packed_sizes(layout)
    least = MIN_CHUNK_ELEMENTS_CUDA if device.type == "cuda" else MIN_CHUNK_ELEMENTS
    budget = max(int(cost.max(initial=0)) * max(threads, 1), least)
    chunks: list[Chunk] = []
    start = 0
    factor_start = packed_start = 0
    while start < len(rows):
        stop, spent, total = start, 0, 0
        while stop < len(rows) and (stop == start or spent + cost[stop] <= budget):
            spent += int(cost[stop])
            total += int(full[stop])
            stop += 1
        sub = rows[start:stop].copy()
        factor_count = int(sub[:, _backend.BF_ORDER].sum())
        sub[:, _backend.BF_FACTOR_OFFSET] -= sub[0, _backend.BF_FACTOR_OFFSET]
        sub[:, _backend.BF_FACTOR_INDEX] -= sub[0, _backend.BF_FACTOR_INDEX]
        packed_stop = packed_start + int(packed[start:stop].sum())
        chunks.append(Chunk(start, stop, factor_start, factor_start + factor_count, packed_start,
                            packed_stop, total, _backend.KernelTable(sub, device)))
        start, factor_start, packed_start = stop, factor_start + factor_count, packed_stop
    return chunks


class PackedFactors:
    """Chunked access to packed factors/roots in full form (see the module doc)."""

    def __init__(self, layout: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.dtype = dtype  # the kernels' (Shampoo) dtype
        self.device = device
        self.numel = int(packed_sizes(layout).sum())
        self.chunks = plan_chunks(layout, device, torch.get_num_threads())
        self.max_full = max((c.full_numel for c in self.chunks), default=0)

    def scratch(self) -> torch.Tensor:
        """A full-matrix scratch for one phase of one step, freed when the caller drops it
        (max_full elements: bounded by the chunk budget, never held between steps)."""
        return torch.empty(self.max_full, dtype=self.dtype, device=self.device)

    def in_kernel_dtype(self, packed: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        """The chunk's slice of packed storage, converted to the kernels' dtype if needed (a
        copy bounded by the chunk)."""
        piece = packed[chunk.packed_start : chunk.packed_stop]
        return piece if piece.dtype == self.dtype else piece.to(self.dtype)

    def unpack(self, full: torch.Tensor, packed: torch.Tensor, chunk: Chunk, active: torch.Tensor) -> torch.Tensor:
        """The chunk's active factors of `packed` (storage dtype) into scratch `full`."""
        _backend.sym_unpack(full[: chunk.full_numel], self.in_kernel_dtype(packed, chunk), chunk.table,
                            active[chunk.block_start : chunk.block_stop])
        return full[: chunk.full_numel]

    def pack(self, packed: torch.Tensor, full: torch.Tensor, chunk: Chunk, mask: torch.Tensor | None,
             average: bool = False) -> None:
        """The chunk's factors of `full` (with mask[f], None = all) into `packed` (any dtype);
        `average`: their symmetric parts (inverse roots)."""
        piece = packed[chunk.packed_start : chunk.packed_stop]
        part = None if mask is None else mask[chunk.factor_start : chunk.factor_stop]
        if piece.dtype == self.dtype:
            _backend.sym_pack(piece, full[: chunk.full_numel], chunk.table, part, average=average)
        else:
            staged = piece.to(self.dtype)
            _backend.sym_pack(staged, full[: chunk.full_numel], chunk.table, part, average=average)
            piece.copy_(staged)


def pack_full(value: torch.Tensor) -> torch.Tensor:
    """A full d x d matrix (a checkpoint of before issue 11, or the well-known implementation's
    layout) as packed storage: its symmetric part's upper triangle by rows (the matrix itself
    when it is symmetric, as factor matrices are)."""
    d = value.shape[0]
    rows, cols = torch.triu_indices(d, d, device=value.device)
    return 0.5 * value[rows, cols] + 0.5 * value[cols, rows]


def unpack_numpy(packed: np.ndarray, d: int) -> np.ndarray:
    """The full symmetric d x d matrix of a packed one (NumPy; logging and tests)."""
    out = np.empty((d, d), dtype=packed.dtype)
    rows, cols = np.triu_indices(d)
    out[rows, cols] = packed
    out[cols, rows] = packed
    return out
