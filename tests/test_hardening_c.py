"""Regressions of issue 16's C-side findings: config values that size memory or work are
bounded (configs, binding), table checks refuse blocks that share state, the batch plan is not
quadratic in distinct shapes, DLPack capsules stay ours for the whole call, sign-flag views
and complex buffers never reach the kernels, bad scalars name their argument. Expected values
come from NumPy or from the rules stated in the headers, never from the code under test."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from block_tables import make_layout
from distributed_shampoo import _backend as B
from distributed_shampoo.matrix_functions_types import (
    MAX_ITERATIONS,
    MAX_TAYLOR_ORDER,
    CoupledHigherOrderConfig,
    CoupledNewtonConfig,
    EigenConfig,
    validate_root_inv_config,
)

# The binding itself, below _backend's Python checks: what these tests aim at.
_C = B._C

ROOT_KW = dict(method="eigen", epsilon=1e-12, exponent_multiplier=1.0, bias_correction=1.0,
               make_positive_semidefinite=True, retry_double_precision=True, max_iterations=100,
               tolerance=1e-6, rel_epsilon=0.0, order=3)


def _root_args(n=4, root=2):
    lay = make_layout([(n, n)], max_dim=n, root=root)
    rng = np.random.default_rng(1)
    g = rng.standard_normal((n, 3 * n))
    f = np.concatenate([(g @ g.T).ravel()] * 2)
    return dict(out=np.zeros(lay.factor_numel), factors=f, table=lay.table,
                active=np.ones(1, np.uint8), is_diagonal=np.zeros(2, np.uint8),
                status_out=np.zeros(2, np.int32))


def _root(args, **kw):
    a = dict(args)
    B.root_inverse(a.pop("out"), a.pop("factors"), a.pop("table"), a.pop("active"),
                   **{**ROOT_KW, **kw}, **a)


# ---- item 1 / 7: bounded config values --------------------------------------------------

@pytest.mark.parametrize("make, field, value", [
    (CoupledHigherOrderConfig, "order", 2 ** 62),
    (CoupledHigherOrderConfig, "order", 2 ** 40),
    (CoupledHigherOrderConfig, "order", MAX_TAYLOR_ORDER + 1),
    (CoupledHigherOrderConfig, "max_iterations", 10 ** 12),
    (CoupledNewtonConfig, "max_iterations", 10 ** 12),
    (CoupledNewtonConfig, "max_iterations", MAX_ITERATIONS + 1),
    (CoupledNewtonConfig, "max_iterations", -1),
])
def test_config_values_that_size_work_are_bounded_at_construction(make, field, value):
    with pytest.raises(ValueError, match=rf"Invalid {field}: {value}\. Must be an integer in \["):
        make(**{field: value, "tolerance": 0.0})


def test_bounds_are_the_kernels_and_edges_are_accepted():
    assert (MAX_ITERATIONS, MAX_TAYLOR_ORDER) == (_C.ROOT_MAX_ITERATIONS, _C.ROOT_MAX_TAYLOR_ORDER)
    CoupledHigherOrderConfig(order=MAX_TAYLOR_ORDER, max_iterations=MAX_ITERATIONS)
    CoupledNewtonConfig(max_iterations=0)
    validate_root_inv_config(EigenConfig())


def test_validation_runs_again_when_the_optimizer_reads_a_changed_config():
    cfg = CoupledHigherOrderConfig()
    object.__setattr__(cfg, "order", 2 ** 62)  # works on frozen and mutable dataclasses
    with pytest.raises(ValueError, match="Invalid order"):
        validate_root_inv_config(cfg)
    from distributed_shampoo.utils.shampoo_group_engine import root_method_kwargs
    with pytest.raises(ValueError, match="Invalid order"):
        root_method_kwargs(cfg)
    assert root_method_kwargs(dataclasses.replace(cfg, order=4))["order"] == 4


@pytest.mark.parametrize("kw, name", [
    (dict(method="higher_order", order=2 ** 62), "order"),     # wrapped the scratch size
    (dict(method="higher_order", order=2 ** 40), "order"),     # a misleading MemoryError
    (dict(method="higher_order", order=1), "order"),
    (dict(method="newton", max_iterations=10 ** 12, tolerance=0.0), "max_iterations"),
    (dict(method="newton", max_iterations=-1), "max_iterations"),
    (dict(epsilon=float("nan")), "epsilon"),
    (dict(bias_correction=0.0), "bias_correction"),
    (dict(bias_correction=float("inf")), "bias_correction"),
    (dict(tolerance=float("nan")), "tolerance"),
    (dict(exponent_multiplier=float("nan")), "exponent_multiplier"),
    (dict(method="higher_order", rel_epsilon=float("nan")), "rel_epsilon"),
])
def test_kernel_entry_names_a_bad_root_scalar(kw, name):
    args = _root_args()
    before = args["out"].copy()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"root_inverse_f64: argument '{name}' must be"):
        _root(args, **kw)
    assert time.perf_counter() - t0 < 5
    np.testing.assert_array_equal(args["out"], before)


@pytest.mark.parametrize("threads", [0, -1, 1025, 2 ** 31 - 1])
def test_c_entry_caps_num_threads(threads):
    a = _root_args()
    cfg = (_C.ROOT_EIGEN, 1e-12, 1.0, 1.0, True, True, 0, 0.0, 0.0, 3)
    with pytest.raises(ValueError, match=r"argument 'num_threads' must be in \[1, 1024\]"):
        _C.root_inverse_f64(a["out"], a["factors"], a["table"], a["active"], a["is_diagonal"],
                            a["status_out"], *cfg, threads)
    lay = make_layout([(3, 2)], max_dim=3)
    with pytest.raises(ValueError, match="num_threads"):
        _C.factor_update_f64(np.zeros(lay.factor_numel), np.zeros(lay.factor_numel),
                             np.zeros(lay.block_numel), lay.table, np.ones(1, np.uint8), 1.0,
                             threads)
    with pytest.raises(ValueError, match="num_threads"):
        _C.precondition_f64(np.zeros(lay.block_numel), np.zeros(lay.block_numel),
                            np.zeros(lay.factor_numel), lay.table, np.ones(1, np.uint8), threads)


def test_huge_root_has_no_overflow_and_gives_a_status():
    """r + 1 overflowed int64 for r = 2^63 - 1 (UB; the sanitizer run checks it)."""
    for method in ("newton", "higher_order"):
        a = _root_args(root=2 ** 63 - 1)
        _root(a, method=method, max_iterations=3)
        assert set(a["status_out"].tolist()) <= {B.ROOT_OK, B.ROOT_MAX_ITERS, B.ROOT_FAILED,
                                                 B.ROOT_NONFINITE}


def test_walk_over_a_size_one_dim_with_a_huge_stride():
    """A size-1 dim may carry any stride ((d - 1) s = 0); the walk used to step past it
    (signed overflow). gather must still read the block's 3 elements."""
    table = np.zeros((1, B.BF_COUNT), np.int64)
    table[0, B.BF_ORDER], table[0, B.BF_NUMEL], table[0, B.BF_PARAM_OFFSET] = 2, 3, 2
    table[0, B.BF_DIMS:B.BF_DIMS + 2] = (1, 3)
    table[0, B.BF_STRIDES:B.BF_STRIDES + 2] = (2 ** 63 - 1, 1)
    flat = np.arange(6, dtype=np.float64)
    out = np.zeros(3)
    assert B.gather(out, None, flat, None, table, np.ones(1, np.uint8), 0.0) == -1
    np.testing.assert_array_equal(out, flat[2:5])


# ---- item 7: tables whose blocks share state -------------------------------------------

@pytest.mark.parametrize("field", [B.BF_BLOCK_OFFSET, B.BF_FACTOR_OFFSET, B.BF_FACTOR_INDEX])
def test_table_validate_refuses_blocks_that_share_state(field):
    lay = make_layout([(4, 3), (5,), (2, 2)], max_dim=2)
    B.validate_table(lay.table)
    bad = lay.table.copy()
    bad[3, field] = bad[2, field]  # block 3 starts where block 2 does
    with pytest.raises(ValueError, match="table"):
        B.validate_table(bad)
    shuffled = lay.table[::-1].copy()  # disjoint but out of order: still fine
    B.validate_table(shuffled)
    shuffled[0, field] = shuffled[-1, field]
    with pytest.raises(ValueError, match="table"):
        B.validate_table(shuffled)


def test_kernels_refuse_overlapping_blocks_before_writing():
    lay = make_layout([(4, 4), (4, 4)], max_dim=4)
    bad = lay.table.copy()
    bad[1, B.BF_FACTOR_OFFSET] = 8  # factors of block 1 overlap block 0's second factor
    f = np.zeros(lay.factor_numel)
    g = np.ones(lay.block_numel)
    with pytest.raises(ValueError, match="share"):
        B.factor_update(f, f, g, bad, np.ones(2, np.uint8), 1.0, num_threads=2)
    assert not f.any()


# ---- item 7: batch plan in O(n log n) --------------------------------------------------

def test_batch_plan_of_many_distinct_shapes_is_fast_and_right():
    n = 30000
    table = np.zeros((n, B.BF_COUNT), np.int64)
    dims = (np.arange(n) * 7919) % n + 1  # a permutation of 1..n: all shapes distinct
    dims[n // 2] = dims[3]                 # one shape twice: a group of two
    table[:, B.BF_ORDER], table[:, B.BF_NUMEL], table[:, B.BF_DIMS] = 1, dims, dims
    table[:, B.BF_STRIDES] = 1
    table[:, B.BF_BLOCK_OFFSET] = np.concatenate([[0], np.cumsum(dims)[:-1]])
    table[:, B.BF_FACTOR_OFFSET] = np.concatenate([[0], np.cumsum(dims * dims)[:-1]])
    table[:, B.BF_FACTOR_INDEX] = np.arange(n)
    t0 = time.perf_counter()
    plan = B.batch_plan(table)
    assert time.perf_counter() - t0 < 1.0  # was 8 s (one compare per block and group)
    ngroups, nitems = int(plan[0]), int(plan[1])
    assert (ngroups, nitems) == (n - 1, n)
    rows = plan[2:2 + ngroups * B.PLAN_GROUP_FIELDS].reshape(ngroups, B.PLAN_GROUP_FIELDS)
    items = plan[2 + ngroups * B.PLAN_GROUP_FIELDS:]
    # groups in order of first block; the repeated shape's group holds blocks 3 and n // 2
    firsts = items[rows[:, B.PG_FIRST]]
    assert (np.diff(firsts) > 0).all()
    g3 = int(np.nonzero(firsts == 3)[0][0])
    assert rows[g3, B.PG_COUNT] == 2 and list(items[rows[g3, B.PG_FIRST]:][:2]) == [3, n // 2]
    np.testing.assert_array_equal(rows[:, B.PG_DIMS], dims[firsts])


# ---- item 7: DLPack owners stay alive for the call --------------------------------------

class Stash:
    """Keeps the capsule it hands out: a later argument's __dlpack__ (or another thread)
    then tries to consume it and free the memory while the kernel still uses it."""

    def __init__(self, t):
        self.t, self.capsule = t, None

    def __dlpack__(self, **kwargs):
        self.capsule = self.t.__dlpack__(**kwargs)
        self.t = None  # the capsule is now the only owner
        return self.capsule


class Thief:
    def __init__(self, t, victim):
        self.t, self.victim, self.stolen = t, victim, None

    def __dlpack__(self, **kwargs):
        self.stolen = torch.from_dlpack(self.victim.capsule)  # consumes it if it can
        return self.t.__dlpack__(**kwargs)


def test_a_borrowed_capsule_cannot_be_consumed_during_the_call():
    lay = make_layout([(3, 2)], max_dim=3)
    out = Stash(torch.zeros(lay.block_numel, dtype=torch.float64))
    thief = Thief(torch.ones(lay.block_numel, dtype=torch.float64), out)
    inv = torch.eye(3, dtype=torch.float64).ravel().repeat(1)
    inv = torch.cat([inv, torch.eye(2, dtype=torch.float64).ravel()])
    with pytest.raises(TypeError, match="grads.*could not be shared"):
        _C.precondition_f64(out, thief, inv, torch.from_numpy(lay.table),
                            torch.ones(1, dtype=torch.uint8), 1)
    assert thief.stolen is None
    # the capsule was consumed by the binding, and released: nobody can use it afterwards
    with pytest.raises(Exception, match="used|consumed|dltensor"):
        torch.from_dlpack(out.capsule)


class Shrinker:
    """Frees another argument's memory from inside its own __dlpack__."""

    def __init__(self, t, victim):
        self.t, self.victim = t, victim

    def __dlpack__(self, **kwargs):
        self.victim.untyped_storage().resize_(0)
        return self.t.__dlpack__(**kwargs)


def test_an_exporter_cannot_free_a_tensor_exported_before_it():
    """torch tensors are exported after any other exporter ran, so an earlier argument's
    memory cannot be freed behind the binding's back (it used to be read after free)."""
    lay = make_layout([(3, 2)], max_dim=3)
    g = torch.arange(float(lay.block_numel), dtype=torch.float64)
    inv = torch.cat([torch.eye(3, dtype=torch.float64).ravel(),
                     torch.eye(2, dtype=torch.float64).ravel()])
    out = torch.zeros_like(g)
    with pytest.raises(ValueError, match="'grads' has no data"):
        _C.precondition_f64(out, g, Shrinker(inv, g), torch.from_numpy(lay.table),
                            torch.ones(1, dtype=torch.uint8), 1)
    assert not out.any()


# ---- item 6 (kernel entry): sign-flag views and complex buffers --------------------------

def test_negative_and_conjugate_views_are_refused_at_the_binding():
    lay = make_layout([(3, 2)], max_dim=3)
    g = torch.arange(float(lay.block_numel), dtype=torch.float64)
    inv = torch.cat([torch.eye(3, dtype=torch.float64).ravel(),
                     torch.eye(2, dtype=torch.float64).ravel()])
    args = lambda grads, out: (out, grads, inv, torch.from_numpy(lay.table),  # noqa: E731
                               torch.ones(1, dtype=torch.uint8))
    neg = torch._neg_view(g)
    assert neg.is_neg()
    with pytest.raises(ValueError, match="'grads' is a negative view.*resolve_neg"):
        _C.precondition_f64(*args(neg, torch.zeros_like(g)), 1)
    with pytest.raises(ValueError, match="'grads' is a negative view"):
        B.precondition(*args(neg, torch.zeros_like(g)))
    out = torch.zeros_like(g)
    B.precondition(*args(neg.resolve_neg(), out))
    np.testing.assert_array_equal(out.numpy(), -g.numpy().reshape(3, 2).ravel())
    z = torch.zeros(lay.block_numel, dtype=torch.complex128)
    with pytest.raises(ValueError, match="'grads' is a conjugate view.*resolve_conj"):
        _C.precondition_f64(*args(z.conj(), torch.zeros_like(g)), 1)
    with pytest.raises(TypeError, match="'grads' has dtype complex"):
        _C.precondition_f64(*args(z, torch.zeros_like(g)), 1)
    with pytest.raises(TypeError, match="dtype"):
        B.precondition(*args(g, z))
