"""The batch plan (csrc/core/batch_plan.h) through `_backend.batch_plan`, against a grouping
written here in plain Python from the header's description (never from the C code):

  plan = [ngroups, nitems, ngroups rows of PLAN_GROUP_FIELDS, nitems block indices]
  row  = [ORDER, COUNT, FIRST, NUMEL, DIMS (MAX_ORDER entries, unused ones 0)]

Items are the blocks of order >= 1 with at least one element, grouped by (order, dims);
groups come in order of their first block, items in table order within a group, and group g
owns items [FIRST, FIRST + COUNT). The GPU kernels trust this layout to batch their cuBLAS
calls, so it is pinned here, on the CPU, where it can run without a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from block_tables import make_layout

from distributed_shampoo import _backend as B


def expected_plan(table: np.ndarray) -> list[int]:
    """The plan of `table` by the header's rules, as a list of Python ints."""
    groups: dict[tuple[int, ...], list[int]] = {}  # dicts keep insertion order: first block
    for b, row in enumerate(np.asarray(table).tolist()):
        order, numel = row[B.BF_ORDER], row[B.BF_NUMEL]
        if order == 0 or numel == 0:
            continue  # no matrix product for these: never an item
        dims = tuple(row[B.BF_DIMS : B.BF_DIMS + order])
        groups.setdefault((order, *dims), []).append(b)
    rows, items = [], []
    for (order, *dims), blocks in groups.items():
        dims_field = list(dims) + [0] * (B.MAX_ORDER - order)
        rows += [order, len(blocks), len(items), math.prod(dims), *dims_field]
        items += blocks
    return [len(groups), len(items), *rows, *items]


def plan_of(table: np.ndarray) -> np.ndarray:
    """`_backend.batch_plan` of a NumPy table, handed over as a torch CPU tensor."""
    plan = B.batch_plan(torch.from_numpy(np.ascontiguousarray(table)))
    assert isinstance(plan, np.ndarray) and plan.dtype == np.int64 and plan.ndim == 1
    return plan


def decode(plan: np.ndarray) -> tuple[list[dict[str, object]], list[int]]:
    """Groups (as dicts) and items of a plan, read with the _backend constants."""
    ngroups, nitems = int(plan[0]), int(plan[1])
    assert len(plan) == B.PLAN_HEADER + ngroups * B.PLAN_GROUP_FIELDS + nitems
    groups = []
    for g in range(ngroups):
        row = plan[B.PLAN_HEADER + g * B.PLAN_GROUP_FIELDS :][: B.PLAN_GROUP_FIELDS]
        order = int(row[B.PG_ORDER])
        groups.append(
            {
                "order": order,
                "count": int(row[B.PG_COUNT]),
                "first": int(row[B.PG_FIRST]),
                "numel": int(row[B.PG_NUMEL]),
                "dims": tuple(int(d) for d in row[B.PG_DIMS : B.PG_DIMS + order]),
                "unused_dims": [int(d) for d in row[B.PG_DIMS + order : B.PG_DIMS + B.MAX_ORDER]],
            }
        )
    return groups, [int(i) for i in plan[B.PLAN_HEADER + ngroups * B.PLAN_GROUP_FIELDS :]]


def test_constants_match_the_header():
    assert B.PLAN_HEADER == 2
    assert (B.PG_ORDER, B.PG_COUNT, B.PG_FIRST, B.PG_NUMEL, B.PG_DIMS) == (0, 1, 2, 3, 4)
    assert B.PLAN_GROUP_FIELDS == B.PG_DIMS + B.MAX_ORDER == 12


def test_matrix_split_into_edge_blocks_written_out():
    """(5, 3) cut at 2: blocks (2,2),(2,1),(2,2),(2,1),(1,2),(1,1). Written out by hand, so
    that the plain-Python grouping above is itself checked once."""
    table = B.block_plan((5, 3), 2)
    zeros6 = [0] * 6
    want = [
        4, 6,
        2, 2, 0, 4, 2, 2, *zeros6,  # (2, 2): blocks 0, 2
        2, 2, 2, 2, 2, 1, *zeros6,  # (2, 1): blocks 1, 3
        2, 1, 4, 2, 1, 2, *zeros6,  # (1, 2): block 4 (not grouped with (2, 1))
        2, 1, 5, 1, 1, 1, *zeros6,  # (1, 1): block 5
        0, 2, 1, 3, 4, 5,
    ]  # fmt: skip
    assert expected_plan(table) == want
    assert plan_of(table).tolist() == want


# One tensor's blocks, from the product's own blocking (_backend.block_plan).
SINGLE_SHAPES = [
    ((7,), 2),             # (2,),(2,),(2,),(1,)
    ((129, 65), 32),       # many equal (32, 32) blocks and three edge shapes
    ((3, 4, 5), 2),        # order 3, eight shapes
    ((17, 3, 1, 33), 8),   # order 4 with a 1 in it
    ((1,), 4),             # a single 1-element order-1 block: an item
    ((), 4),               # a 0-d tensor: one order-0 block, no items
    ((0, 4), 2),           # zero-element blocks only: no items
    ((4, 0, 3), 2),
    ((2,) * 8, 1),         # MAX_ORDER dims, all of them used in DIMS
]


@pytest.mark.parametrize("shape,max_dim", SINGLE_SHAPES, ids=str)
def test_single_tensor_plans(shape, max_dim):
    table = B.block_plan(shape, max_dim)
    assert plan_of(table).tolist() == expected_plan(table)


# Several parameters in one table (tests/block_tables.py layout): orders 0-3, zero-element
# and 1-element blocks, and shapes shared between parameters, which must share a group.
MULTI = [
    ([(5, 3), (7,), (), (3, 4, 5), (0, 4), (1, 1)], 2),
    ([(129, 65), (), (33,), (17, 3, 5), (0, 4), (1,), (3, 129), (65, 33, 3), (1, 1), (129,)], 129),
    ([(129, 65), (), (33,), (17, 3, 5), (0, 4), (1,), (3, 129), (65, 33, 3), (1, 1), (129,)], 32),
    ([(4, 4), (8,), (4, 4), (2, 2, 2), (8, 4), (4,), (), ()], 4),
]


@pytest.mark.parametrize("shapes,max_dim", MULTI, ids=lambda v: str(v)[:40])
def test_multi_parameter_plans(shapes, max_dim):
    lay = make_layout(shapes, max_dim)
    table = lay.table
    plan = plan_of(table)
    assert plan.tolist() == expected_plan(table)

    # The same facts read back through the constants, stated one by one.
    groups, items = decode(plan)
    rows = table.tolist()
    is_item = [r[B.BF_ORDER] >= 1 and r[B.BF_NUMEL] > 0 for r in rows]
    assert sorted(items) == [b for b in range(len(rows)) if is_item[b]]  # each item once
    seen_shapes = set()
    next_first = 0
    for g in groups:
        assert g["order"] >= 1 and g["count"] >= 1 and g["numel"] > 0
        assert g["first"] == next_first  # groups own consecutive runs of items
        next_first += g["count"]
        assert g["unused_dims"] == [0] * (B.MAX_ORDER - g["order"])
        assert g["numel"] == math.prod(g["dims"])
        assert (g["order"], g["dims"]) not in seen_shapes  # distinct shapes
        seen_shapes.add((g["order"], g["dims"]))
        members = items[g["first"] : g["first"] + g["count"]]
        assert members == sorted(members)  # table order within a group
        for b in members:
            order = rows[b][B.BF_ORDER]
            assert (order, tuple(rows[b][B.BF_DIMS : B.BF_DIMS + order])) == (
                g["order"],
                g["dims"],
            )
    assert next_first == len(items)
    firsts = [items[g["first"]] for g in groups]
    assert firsts == sorted(firsts)  # groups in order of their first block


def test_random_tables():
    """Random parameter shapes and cut sizes against the plain-Python grouping."""
    rng = np.random.default_rng(2024)
    for _ in range(40):
        shapes = [
            tuple(int(d) for d in rng.integers(0, 9, size=rng.integers(0, 5)))
            for _ in range(rng.integers(1, 7))
        ]
        lay = make_layout(shapes, int(rng.integers(1, 6)))
        assert plan_of(lay.table).tolist() == expected_plan(lay.table), shapes


def test_empty_and_item_free_tables():
    empty = np.zeros((0, B.BF_COUNT), np.int64)
    assert plan_of(empty).tolist() == [0, 0]
    # order-0 and empty blocks only: (), (0,), (3, 0) cut into (2, 0) and (1, 0), ()
    no_items = make_layout([(), (0,), (3, 0), ()], 2).table
    assert len(no_items) == 5
    assert plan_of(no_items).tolist() == [0, 0]


def test_numpy_table_gives_the_same_plan():
    """Like every _backend entry point, batch_plan takes NumPy arrays as well as tensors."""
    table = make_layout([(5, 3), (7,), (3, 4, 5)], 2).table
    np.testing.assert_array_equal(B.batch_plan(table), plan_of(table))


def test_malformed_table_is_refused():
    table = B.block_plan((5, 3), 2)
    bad = table.copy()
    bad[0, B.BF_NUMEL] = 5  # a (2, 2) block claiming 5 elements
    with pytest.raises(ValueError, match="table"):
        B.batch_plan(torch.from_numpy(bad))
    with pytest.raises((TypeError, ValueError), match="table"):
        B.batch_plan(torch.from_numpy(table[:, :-1].copy()))  # wrong number of fields
    with pytest.raises((TypeError, ValueError), match="table"):
        B.batch_plan(torch.from_numpy(table).to(torch.int32))


# --------------------------------------------------------------------------------------------
# KernelTable on the CPU: the same table with its plan, usable wherever a table is.
# --------------------------------------------------------------------------------------------


def test_kernel_table_on_cpu_carries_table_and_plan():
    lay = make_layout([(129, 65), (7,), (), (0, 4)], 32)
    table = torch.from_numpy(lay.table)
    kt = B.KernelTable(table, torch.device("cpu"))
    assert kt.nblocks == len(lay.blocks)
    assert torch.device(kt.device).type == "cpu"
    assert torch.equal(kt.host, table) and torch.equal(torch.as_tensor(kt.device_table), table)
    plan = expected_plan(lay.table)
    assert np.asarray(kt.plan_host).tolist() == plan
    assert np.asarray(kt.plan_device).tolist() == plan


def test_kernel_table_is_accepted_by_cpu_kernels():
    """Results with a KernelTable are bitwise those with the plain table (CPU kernels)."""
    lay = make_layout([(5, 3), (7,), (), (3, 4, 5), (0, 4)], 2)
    table = torch.from_numpy(lay.table)
    kt = B.KernelTable(table, torch.device("cpu"))
    rng = np.random.default_rng(5)
    active = torch.from_numpy((rng.random(len(lay.blocks)) < 0.7).astype(np.uint8))
    grad_flat = torch.from_numpy(rng.standard_normal(lay.param_numel))
    factors = torch.from_numpy(rng.standard_normal(lay.factor_numel))
    outs = []
    for t in (table, kt):
        grads = torch.full((lay.block_numel,), -7.25, dtype=torch.float64)
        assert B.gather(grads, None, grad_flat, None, t, active, 0.0) == -1
        f = factors.clone()
        B.factor_update(f, f, grads, t, active, 0.9)
        out = torch.full_like(grads, -7.25)
        B.precondition(out, grads, f, t, active)
        outs.append((grads, f, out))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
