"""Packed symmetric storage kernels (csrc/core/sym_pack.h, csrc/cuda/sym_pack_cuda.cu): pack,
unpack and the packed root commit against NumPy's upper-triangle indexing, over tables with
several block shapes; their argument checks; the CUDA twins bitwise equal to the CPU."""

import numpy as np
import pytest
import torch

import block_tables as T
from distributed_shampoo import _backend as B

SHAPES = [(5, 6), (7,), (3, 4, 2), (), (1, 9)]
DTYPES = [np.float32, np.float64]


def packed_expected(lay: T.Layout, full: np.ndarray, average: bool) -> np.ndarray:
    parts = []
    for b in range(len(lay.blocks)):
        for m in lay.factor_views(full, b):
            rows, cols = np.triu_indices(m.shape[0])
            parts.append(0.5 * m[rows, cols] + 0.5 * m[cols, rows] if average else m[rows, cols])
    return np.concatenate(parts).astype(full.dtype) if parts else np.zeros(0, full.dtype)


def packed_sizes(lay: T.Layout) -> list[int]:
    return [d * (d + 1) // 2 for blk in lay.blocks for d in blk.shape]


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_unpack_commit_match_numpy(dtype) -> None:
    lay = T.make_layout(SHAPES, 4)
    rng = np.random.default_rng(0)
    full = rng.standard_normal(lay.factor_numel).astype(dtype)
    assert B.packed_numel(lay.table) == sum(packed_sizes(lay))

    for average in (False, True):
        packed = np.full(B.packed_numel(lay.table), 7.0, dtype)
        B.sym_pack(packed, full, lay.table, None, average=average)
        np.testing.assert_array_equal(packed, packed_expected(lay, full, average))

    # a mask leaves the other factors' packed entries alone
    mask = (np.arange(lay.factor_count) % 2).astype(np.uint8)
    packed = np.full(B.packed_numel(lay.table), 7.0, dtype)
    B.sym_pack(packed, full, lay.table, mask)
    want, at = packed_expected(lay, full, False), 0
    for f, size in enumerate(packed_sizes(lay)):
        expect = want[at : at + size] if mask[f] else np.full(size, 7.0, dtype)
        np.testing.assert_array_equal(packed[at : at + size], expect)
        at += size

    # unpack: both triangles from the packed upper one, active blocks only
    packed = packed_expected(lay, full, False)
    active = np.array([b % 3 != 1 for b in range(len(lay.blocks))], dtype=np.uint8)
    out = np.full(lay.factor_numel, -3.0, dtype)
    B.sym_unpack(out, packed, lay.table, active)
    for b in range(len(lay.blocks)):
        for got, m in zip(lay.factor_views(out, b), lay.factor_views(full, b)):
            if active[b]:
                upper = np.triu(m)
                np.testing.assert_array_equal(got, upper + np.triu(m, 1).T)
            else:
                assert (got == -3.0).all()

    # commit: committed factors take src, the others give dst back to src
    dst = rng.standard_normal(len(packed)).astype(dtype)
    src = rng.standard_normal(len(packed)).astype(dtype)
    old_dst, old_src = dst.copy(), src.copy()
    B.packed_commit(dst, src, lay.table, mask)
    at = 0
    for f, size in enumerate(packed_sizes(lay)):
        part = slice(at, at + size)
        both = old_src[part] if mask[f] else old_dst[part]
        np.testing.assert_array_equal(dst[part], both)
        np.testing.assert_array_equal(src[part], both)
        at += size


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_select_moves_the_selected_factors_both_ways(dtype) -> None:
    lay = T.make_layout(SHAPES, 4)
    rng = np.random.default_rng(3)
    sizes = packed_sizes(lay)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    select = (rng.random(lay.factor_count) < 0.6).astype(np.uint8)
    write = (rng.random(lay.factor_count) < 0.5).astype(np.uint8)
    chosen = [f for f in range(lay.factor_count) if select[f]]
    packed = rng.standard_normal(sum(sizes)).astype(dtype)
    compact_numel = sum(sizes[f] for f in chosen)
    # packed -> compact, every selected factor (write None); the spare tail is left alone
    compact = np.full(compact_numel + 3, -5.0, dtype)
    B.packed_select(compact, packed, lay.table, select, to_packed=False)
    want = np.concatenate([packed[starts[f] : starts[f] + sizes[f]] for f in chosen] + [np.full(3, -5.0, dtype)])
    np.testing.assert_array_equal(compact, want)
    # compact -> packed, only where write: the others keep their packed values
    src = rng.standard_normal(compact_numel).astype(dtype)
    dst = packed.copy()
    B.packed_select(src, dst, lay.table, select, write, to_packed=True)
    at = 0
    for f in range(lay.factor_count):
        part = slice(starts[f], starts[f] + sizes[f])
        if select[f]:
            expect = src[at : at + sizes[f]] if write[f] else packed[part]
            at += sizes[f]
        else:
            expect = packed[part]
        np.testing.assert_array_equal(dst[part], expect)
    # a compact buffer shorter than the selected factors is refused before anything is written
    with pytest.raises(ValueError, match="packed_select_f.*argument 'compact' has .* selected factors need"):
        B.packed_select(compact[: compact_numel - 1], dst, lay.table, select, to_packed=False)


def test_symmetric_part_is_exact_for_symmetric_matrices() -> None:
    lay = T.make_layout([(6, 6)], 6)
    m = np.random.default_rng(1).standard_normal((6, 6)).astype(np.float32)
    full = np.concatenate([(m + m.T).ravel()] * 2)
    a, b = (np.zeros(B.packed_numel(lay.table), np.float32) for _ in range(2))
    B.sym_pack(a, full, lay.table, None, average=False)
    B.sym_pack(b, full, lay.table, None, average=True)
    np.testing.assert_array_equal(a, b)


def test_packed_buffers_too_short_are_refused() -> None:
    lay = T.make_layout(SHAPES, 4)
    full = np.zeros(lay.factor_numel)
    short = np.zeros(B.packed_numel(lay.table) - 1)
    active = np.ones(len(lay.blocks), np.uint8)
    with pytest.raises(ValueError, match="sym_pack_f64: argument 'packed' has .* needs"):
        B.sym_pack(short, full, lay.table)
    with pytest.raises(ValueError, match="sym_unpack_f64: argument 'packed' has .* needs"):
        B.sym_unpack(full, short, lay.table, active)
    with pytest.raises(ValueError, match="packed_commit_f64: argument 'src' has .* needs"):
        B.packed_commit(np.zeros(len(short) + 1), short, lay.table, np.ones(lay.factor_count, np.uint8))
    with pytest.raises(ValueError, match="full"):  # the full side is checked against the table
        B.sym_unpack(full[:-1], np.zeros(len(short) + 1), lay.table, active)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_packed_kernels_equal_the_cpu_bitwise(dtype) -> None:
    lay = T.make_layout(SHAPES + [(40, 3)], 40)
    gen = torch.Generator().manual_seed(2)
    full = torch.randn(lay.factor_numel, generator=gen, dtype=dtype)
    n = B.packed_numel(lay.table)
    table = torch.from_numpy(lay.table)
    kt = B.KernelTable(lay.table, "cuda")
    mask = (torch.arange(lay.factor_count) % 2).to(torch.uint8)
    active = torch.tensor([b % 3 != 1 for b in range(len(lay.blocks))], dtype=torch.uint8)
    for average in (False, True):
        cpu = torch.full((n,), 7.0, dtype=dtype)
        gpu = cpu.cuda()
        B.sym_pack(cpu, full, table, mask, average=average)
        B.sym_pack(gpu, full.cuda(), kt, mask.cuda(), average=average)
        assert torch.equal(gpu.cpu(), cpu)
    packed = torch.randn(n, generator=gen, dtype=dtype)
    cpu_full = torch.full_like(full, -3.0)
    gpu_full = cpu_full.cuda()
    B.sym_unpack(cpu_full, packed, table, active)
    B.sym_unpack(gpu_full, packed.cuda(), kt, active.cuda())
    assert torch.equal(gpu_full.cpu(), cpu_full)
    dst, src = torch.randn(n, generator=gen, dtype=dtype), torch.randn(n, generator=gen, dtype=dtype)
    gdst, gsrc = dst.cuda(), src.cuda()
    B.packed_commit(dst, src, table, mask)
    B.packed_commit(gdst, gsrc, kt, mask.cuda())
    assert torch.equal(gdst.cpu(), dst) and torch.equal(gsrc.cpu(), src)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta2", [0.9, 1.0])
def test_packed_factor_update_equals_the_full_update_bitwise(dtype, beta2) -> None:
    """factor_update_packed: the upper triangles of factor_update's results, bit for bit, and
    in place; inactive blocks untouched. The full update itself is checked against NumPy in
    test_kernels_factor_update.py."""
    lay = T.make_layout(SHAPES, 4)
    rng = np.random.default_rng(3)
    full = rng.standard_normal(lay.factor_numel).astype(dtype)
    for b in range(len(lay.blocks)):  # symmetric inputs, as factors are
        for m in lay.factor_views(full, b):
            m[...] = m + m.T
    grads = rng.standard_normal(lay.block_numel).astype(dtype)
    active = np.array([b != 2 for b in range(len(lay.blocks))], dtype=np.uint8)
    packed = packed_expected(lay, full, False)
    before = packed.copy()
    want = full.copy()
    B.factor_update(want, want, grads, lay.table, active, beta2)
    B.factor_update_packed(packed, packed, grads, lay.table, active, beta2, num_threads=2)
    np.testing.assert_array_equal(packed, packed_expected(lay, want, False))
    at = 0
    for b, blk in enumerate(lay.blocks):
        for d in blk.shape:
            if not active[b]:
                np.testing.assert_array_equal(packed[at : at + d * (d + 1) // 2], before[at : at + d * (d + 1) // 2])
            at += d * (d + 1) // 2
    with pytest.raises(ValueError, match="factors_out' has .* needs"):
        B.factor_update_packed(packed[:-1], packed[:-1], grads, lay.table, active, beta2)
