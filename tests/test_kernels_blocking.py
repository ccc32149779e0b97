"""Merging and blocking (SPEC B §2.1-2.2) in C against SPEC's examples and a torch.split
oracle; the block table's offsets checked field by field; table validation."""

import numpy as np
import pytest
import torch

from block_tables import make_layout
from distributed_shampoo import _backend as B


@pytest.mark.parametrize(
    "shape, threshold, expected",
    [
        ((1, 2, 5, 1), 10, (10,)),
        ((1, 2, 5, 1), 1, (2, 5)),
        ((2,), 10, (2,)),
        ((1, 1, 1, 1), 3, (1,)),
        ((1, 1, 1, 1), 1000, (1,)),
        ((), 10, (1,)),
        ((0,), 10, (0,)),
        ((0, 1), 10, (0,)),
        ((0, 1, 5, 10, 20), 10, (0,)),
        ((64, 3, 3, 3), 1024, (576, 3)),
        ((3, 5, 7), 16, (15, 7)),
        ((2, 2, 2, 2, 2, 2, 2, 2, 2, 2), 4, (4, 4, 4, 4, 4)),  # more dims than MAX_ORDER in
    ],
)
def test_merge_small_dims_spec_examples(shape, threshold, expected):
    assert B.merge_small_dims(shape, threshold) == expected


def test_merge_small_dims_accepts_torch_size_and_rejects_bad_input():
    assert B.merge_small_dims(torch.Size([4, 1, 4]), 16) == (16,)
    with pytest.raises(ValueError, match="threshold"):
        B.merge_small_dims((2, 3), 0)
    with pytest.raises(ValueError, match="shape"):
        B.merge_small_dims((2, -3), 4)
    with pytest.raises(TypeError, match="shape"):
        B.merge_small_dims(5, 4)


def _torch_blocks(x: torch.Tensor, size: int):
    """SPEC §2.2 literally: torch.split along dim 0, then each piece along dim 1, ..."""
    blocks = [x]
    for dim in range(x.dim()):
        blocks = [piece for b in blocks for piece in torch.split(b, size, dim=dim)]
    return blocks


def _blocks_from_table(table, flat):
    out = []
    for row in table:
        order = int(row[B.BF_ORDER])
        dims = [int(d) for d in row[B.BF_DIMS:B.BF_DIMS + order]]
        strides = [int(s) for s in row[B.BF_STRIDES:B.BF_STRIDES + order]]
        base = int(row[B.BF_PARAM_OFFSET])
        idx = np.zeros(dims, dtype=np.int64) + base
        for k, (d, s) in enumerate(zip(dims, strides)):
            shape = [1] * order
            shape[k] = d
            idx = idx + (np.arange(d) * s).reshape(shape)
        out.append(flat[idx] if order else flat[base].reshape(()))
    return out


def test_spec_5x3_example():
    table = B.block_plan((5, 3), 2)
    flat = np.arange(15.0)
    blocks = _blocks_from_table(table, flat)
    expected = [[[0, 1], [3, 4]], [[2], [5]], [[6, 7], [9, 10]], [[8], [11]], [[12, 13]], [[14]]]
    assert [b.tolist() for b in blocks] == expected
    assert table[:, B.BF_BLOCK_OFFSET].tolist() == [0, 4, 6, 10, 12, 14]
    assert table[:, B.BF_FACTOR_OFFSET].tolist() == [0, 8, 13, 21, 26, 31]
    assert table[:, B.BF_FACTOR_INDEX].tolist() == [0, 2, 4, 6, 8, 10]
    assert (table[:, B.BF_ROOT] == 0).all()


@pytest.mark.parametrize(
    "shape, size",
    [((), 3), ((7,), 3), ((7,), 7), ((7,), 100), ((5, 3), 2), ((4, 6), 4), ((3, 4, 5), 2),
     ((2, 3, 2, 5), 2), ((3, 1, 4), 2), ((0,), 4), ((0, 9), 4), ((3, 0, 5), 2), ((1,), 1),
     ((2, 2, 2, 2, 2, 2, 2, 3), 2)],
)
def test_block_plan_matches_torch_split(shape, size):
    x = torch.arange(int(np.prod(shape, dtype=np.int64)), dtype=torch.float64).reshape(shape)
    expected = _torch_blocks(x, size)
    table = B.block_plan(shape, size)
    assert table.dtype == np.int64 and table.shape == (len(expected), B.BF_COUNT)
    got = _blocks_from_table(table, x.reshape(-1).numpy())
    b_off = f_off = f_idx = 0
    for row, want, have in zip(table, expected, got):
        assert tuple(have.shape) == tuple(want.shape)
        np.testing.assert_array_equal(have, want.numpy())
        order = len(shape)
        assert row[B.BF_ORDER] == order and row[B.BF_NUMEL] == want.numel()
        assert (row[B.BF_BLOCK_OFFSET], row[B.BF_FACTOR_OFFSET], row[B.BF_FACTOR_INDEX]) == (
            b_off, f_off, f_idx)
        assert (row[B.BF_DIMS + order:B.BF_STRIDES] == 0).all()
        assert (row[B.BF_STRIDES + order:] == 0).all()
        b_off += want.numel()
        f_off += sum(d * d for d in want.shape)
        f_idx += order
    B.validate_table(table, block_numel=b_off, factor_numel=f_off, factor_count=f_idx,
                     param_numel=x.numel())


def test_block_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="max_dim"):
        B.block_plan((3,), 0)
    with pytest.raises(ValueError, match="dims"):
        B.block_plan((2,) * (B.MAX_ORDER + 1), 2)
    with pytest.raises(ValueError, match="shape"):
        B.block_plan((2, -1), 2)


def test_validate_table_rejects_malformed_and_out_of_range_rows():
    lay = make_layout([(5, 3), (4,), ()], max_dim=2)
    sizes = dict(block_numel=lay.block_numel, factor_numel=lay.factor_numel,
                 factor_count=lay.factor_count, param_numel=lay.param_numel)
    B.validate_table(lay.table, **sizes)
    corruptions = [
        (0, B.BF_ORDER, B.MAX_ORDER + 1),
        (0, B.BF_ORDER, -1),
        (0, B.BF_NUMEL, 5),                       # != product of dims
        (1, B.BF_DIMS + 1, -1),
        (1, B.BF_DIMS + 3, 2),                    # dim beyond the order
        (2, B.BF_STRIDES, -1),
        (2, B.BF_BLOCK_OFFSET, lay.block_numel),  # block runs past the block buffer
        (3, B.BF_FACTOR_OFFSET, lay.factor_numel - 1),
        (4, B.BF_FACTOR_INDEX, lay.factor_count),
        (5, B.BF_PARAM_OFFSET, lay.param_numel),
        (6, B.BF_PARAM_OFFSET, -1),
        (7, B.BF_ROOT, -2),
        (3, B.BF_DIMS, 1 << 62),                  # numel overflow
    ]
    for b, field, value in corruptions:
        bad = lay.table.copy()
        bad[b, field] = value
        with pytest.raises(ValueError, match="table"):
            B.validate_table(bad, **sizes)
