"""Small public helpers of the reference API (SPEC B §1.1, §2, §10.4).

merge_small_dims plans through the C core; multi_dim_split returns torch views for users and
tests (the optimizer itself addresses blocks through the C block table, not these views).
"""

from collections.abc import Sequence
from typing import TypeVar

import torch

from distributed_shampoo import _backend

_T = TypeVar("_T")


def merge_small_dims(tensor_shape: Sequence[int], threshold: int) -> tuple[int, ...]:
    """SPEC B §2.1: squeeze size-1 dims, then greedily merge neighbours up to `threshold`."""
    return _backend.merge_small_dims(tuple(int(d) for d in tensor_shape), int(threshold))


def multi_dim_split(tensor: torch.Tensor, split_size: int) -> tuple[torch.Tensor, ...]:
    """SPEC B §2.2: split every dim into chunks of `split_size`, dim 0 outermost."""
    blocks: list[torch.Tensor] = [tensor]
    for dim in range(tensor.dim()):
        blocks = [piece for block in blocks for piece in torch.split(block, split_size, dim)]
    return tuple(blocks)


def compress_list(complete_list: Sequence[_T], selector: Sequence[bool]) -> tuple[_T, ...]:
    """Keeps the items whose selector entry is True."""
    assert len(complete_list) == len(selector), (
        f"Inconsistent lengths between complete_list {len(complete_list)} and selector "
        f"{len(selector)}!"
    )
    return tuple(item for item, keep in zip(complete_list, selector) if keep)


def get_dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element (bits / 8 rounded up, so bool is 1)."""
    return torch.empty((), dtype=dtype).element_size()


def generate_pairwise_indices(input_list: Sequence[int]) -> list[tuple[int, int]]:
    """Cumulative (start, end) pairs: (1, 3, 2) -> [(0, 1), (1, 4), (4, 6)]."""
    pairs = []
    start = 0
    for count in input_list:
        pairs.append((start, start + count))
        start += count
    return pairs
