"""The CUDA pointer-table kernels (csrc/cuda/param_io_cuda.h): gather_io / finish_io /
scatter_io on CUDA tensors, through _backend_io, against

  * the CPU pointer-table kernels on the same inputs (themselves pinned to NumPy and to
    torch's add_ by tests/test_kernels_param_io.py): bitwise, except finish with a grafting
    rescale, whose per-block norms the GPU sums in another order (rtol as
    tests/test_cuda_kernels.py's finish);
  * the staged CUDA step they replace (gather / finish into param layout, then torch's add_):
    bitwise in every case;

and the refusals (a tensor on the wrong device, a block outside its tensor, a device mask).
Layouts cut parameters into strided blocks (max_dim 32 on 129 x 65 and friends), with
inactive and zero-element blocks; float32, float64 and bfloat16 parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from block_tables import make_layout

from distributed_shampoo import _backend as B
from distributed_shampoo import _backend_io as IO
from distributed_shampoo._backend_io import IOLocator, finish_io, gather_io, scatter_io


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if not B.cuda_available():
        return "the CUDA kernels (distributed_shampoo._C_cuda) are not built"
    if not IO.cuda_io_available():
        return "this build has no CUDA pointer-table kernels"
    return None


pytestmark = pytest.mark.skipif(_cuda_skip_reason() is not None, reason=str(_cuda_skip_reason()))

DEVICE = torch.device("cuda", 0)
SHAPES = [(129, 65), (), (33,), (17, 3, 5), (0, 4), (1,), (3, 129), (1, 1)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
INT = {torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}
SENTINEL = -7.25
NORM_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _work(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class Problem:
    def __init__(self, dtype, seed, max_dim=32):
        self.lay = make_layout(SHAPES, max_dim)
        self.dtype, self.work = dtype, _work(dtype)
        self.rng = np.random.default_rng(seed)
        nb = len(self.lay.blocks)
        active = self.rng.random(nb) < 0.7
        active[0], active[-1] = True, False
        self.active = torch.from_numpy(active.astype(np.uint8))
        self.table = torch.from_numpy(self.lay.table)
        self.kt = B.KernelTable(self.table, DEVICE)
        self.loc = IOLocator(self.lay.param_offsets, np.array([b.param for b in self.lay.blocks]))

    def tensors(self):
        return [torch.from_numpy(self.rng.standard_normal(s)).to(self.dtype) for s in self.lay.shapes]

    def blocks(self, positive=False):
        x = torch.from_numpy(self.rng.standard_normal(self.lay.block_numel)).to(self.work)
        return x.abs() if positive else x


def to_dev(ts):
    return [None if t is None else t.to(DEVICE, copy=True) for t in ts]


def bits(t):
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(INT[t.dtype])


def assert_lists_bitwise(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(bits(g), bits(w)), f"{what}: entry {i} differs"


# --------------------------------------------------------------------------------------------
# gather_io
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("l2", [0.0, 0.1])
@pytest.mark.parametrize("with_params", [False, True])
def test_gather_io_matches_cpu(dtype, l2, with_params):
    pb = Problem(dtype, 1)
    grads, params = pb.tensors(), pb.tensors()
    n = pb.lay.block_numel
    want_g = torch.full((n,), SENTINEL, dtype=pb.work)
    want_w = torch.full((n,), SENTINEL, dtype=pb.work) if with_params else None
    want_sq = torch.zeros(len(pb.lay.blocks), dtype=torch.float64)
    need_w = with_params or l2 != 0.0
    gather_io(want_g, want_w, grads, params if need_w else None, pb.loc, pb.table, pb.active, l2, want_sq)
    got_g = want_g.new_full((n,), SENTINEL).to(DEVICE)
    got_w = None if want_w is None else want_w.new_full((n,), SENTINEL).to(DEVICE)
    got_sq = torch.full_like(want_sq, SENTINEL).to(DEVICE)
    flag = B.new_failure_flag(DEVICE)
    dg, dw = to_dev(grads), to_dev(params)
    assert gather_io(got_g, got_w, dg, dw if need_w else None, pb.loc, pb.kt, pb.active, l2, got_sq,
                     step=3, fail=flag) == -1
    assert torch.equal(bits(got_g), bits(want_g))
    if want_w is not None:
        assert torch.equal(bits(got_w), bits(want_w))
    # the sums of squares: in double, in another order on the GPU
    torch.testing.assert_close(got_sq.cpu(), want_sq, rtol=1e-12, atol=0.0)
    assert flag.tolist() == [B.FAIL_NONE, B.FAIL_NONE]
    assert_lists_bitwise(dg, grads, "gradients (read only)")
    assert_lists_bitwise(dw, params, "parameters (read only)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("l2", [0.0, 0.1])
def test_gather_io_matches_the_staged_gather(dtype, l2):
    pb = Problem(dtype, 2)
    grads, params = to_dev(pb.tensors()), to_dev(pb.tensors())
    n = pb.lay.block_numel
    flat_g = torch.cat([g.to(pb.work).reshape(-1) for g in grads])
    flat_w = torch.cat([w.to(pb.work).reshape(-1) for w in params])
    active_dev = pb.active.to(DEVICE)
    want_g, want_w = (torch.full((n,), SENTINEL, dtype=pb.work, device=DEVICE) for _ in range(2))
    B.gather(want_g, want_w, flat_g, flat_w, pb.kt, active_dev, l2, step=1, fail=B.new_failure_flag(DEVICE))
    got_g, got_w = (torch.full((n,), SENTINEL, dtype=pb.work, device=DEVICE) for _ in range(2))
    gather_io(got_g, got_w, grads, params, pb.loc, pb.kt, pb.active, l2)
    assert torch.equal(bits(got_g), bits(want_g)) and torch.equal(bits(got_w), bits(want_w))


def test_gather_io_sets_the_failure_flag_and_ignores_inactive_blocks():
    pb = Problem(torch.float32, 3)
    grads = pb.tensors()
    inactive = [b for b, blk in enumerate(pb.lay.blocks) if not pb.active[b] and np.prod(blk.shape) > 0]
    blk = pb.lay.blocks[inactive[0]]
    grads[blk.param][blk.index] = float("inf")
    flag = B.new_failure_flag(DEVICE)
    gather_io(None, None, to_dev(grads), None, pb.loc, pb.kt, pb.active, 0.0, step=5, fail=flag)
    assert flag.tolist() == [B.FAIL_NONE, B.FAIL_NONE]
    active = [b for b, blk in enumerate(pb.lay.blocks) if pb.active[b] and np.prod(blk.shape) > 0]
    for b in active[2:4]:
        blk = pb.lay.blocks[b]
        grads[blk.param][blk.index] = float("nan")
    gather_io(None, None, to_dev(grads), None, pb.loc, pb.kt, pb.active, 0.0, step=5, fail=flag)
    assert flag.tolist() == [5, active[2]]
    # a later step leaves an earlier failure as it is; no flag: no check
    gather_io(None, None, to_dev(grads), None, pb.loc, pb.kt, pb.active, 0.0, step=6, fail=flag)
    assert flag.tolist() == [5, active[2]]
    gather_io(None, None, to_dev(grads), None, pb.loc, pb.kt, pb.active, 0.0)


# --------------------------------------------------------------------------------------------
# finish_io
# --------------------------------------------------------------------------------------------

FINISH = [
    dict(graft="diagonal", grafting_phase=False, decoupled_weight_decay=0.01, momentum=0.9, nesterov=True),
    dict(graft="sgd", grafting_phase=False, decoupled_weight_decay=0.0, momentum=0.0, nesterov=False),
    dict(graft="diagonal", grafting_phase=True, decoupled_weight_decay=0.05, momentum=0.5, nesterov=False),
    dict(graft="none", grafting_phase=False, decoupled_weight_decay=0.02, momentum=0.3, nesterov=False),
]
FINISH_IDS = ["diag-wd-nesterov", "sgd", "grafting-phase", "none-wd-momentum"]


def _finish_inputs(pb, cfg):
    grads, direction, v = pb.blocks(), pb.blocks(), pb.blocks(positive=True)
    mom = pb.blocks() if cfg["momentum"] else None
    scalars = dict(grafting_bias_correction=0.75, grafting_epsilon=1e-8, dampening=0.1, lr=0.03, **cfg)
    return grads, direction, v, mom, scalars


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", FINISH, ids=FINISH_IDS)
def test_finish_io_matches_cpu_and_the_staged_finish(dtype, cfg):
    pb = Problem(dtype, 4)
    params = pb.tensors()
    grads, direction, v, mom, scalars = _finish_inputs(pb, cfg)
    # CPU pointer-table kernel
    cpu_params, cpu_mom = [p.clone() for p in params], None if mom is None else mom.clone()
    finish_io(cpu_params, pb.loc, grads, direction, v, cpu_mom, pb.table, pb.active, **scalars)
    # the staged CUDA step: gather W, finish into param layout, torch adds
    d_grads, d_dir, d_v = to_dev([grads, direction, v])
    active_dev = pb.active.to(DEVICE)
    staged_params = to_dev(params)
    staged_mom = None if mom is None else mom.to(DEVICE, copy=True)
    flat = torch.cat([p.to(pb.work).reshape(-1) for p in staged_params])
    w_blocks = torch.zeros(pb.lay.block_numel, dtype=pb.work, device=DEVICE)
    flag = B.new_failure_flag(DEVICE)
    B.gather(w_blocks, None, flat, None, pb.kt, active_dev, 0.0, step=1, fail=flag)
    update = torch.zeros(pb.lay.param_numel, dtype=pb.work, device=DEVICE)
    B.finish(update, d_grads, d_dir, d_v, w_blocks, staged_mom, pb.kt, active_dev, fail=flag, **scalars)
    offsets = pb.lay.param_offsets
    torch._foreach_add_(staged_params, [update[offsets[i]: offsets[i] + p.numel()].view(p.shape)
                                        for i, p in enumerate(staged_params)])
    # the CUDA pointer-table kernel
    got_params, got_mom = to_dev(params), None if mom is None else mom.to(DEVICE, copy=True)
    finish_io(got_params, pb.loc, d_grads, d_dir, d_v, got_mom, pb.kt, pb.active, fail=flag, **scalars)
    assert_lists_bitwise(got_params, staged_params, "finish_io against the staged CUDA finish")
    if mom is not None:
        assert torch.equal(bits(got_mom), bits(staged_mom))
    rescale = cfg["graft"] != "none" and not cfg["grafting_phase"]
    if not rescale:
        assert_lists_bitwise(got_params, cpu_params, "finish_io against the CPU finish_io")
        if mom is not None:
            assert torch.equal(bits(got_mom), bits(cpu_mom))
    else:
        rtol = NORM_RTOL.get(dtype, 1e-5)
        for g, w in zip(got_params, cpu_params):
            torch.testing.assert_close(g.cpu().double(), w.double(), rtol=rtol if dtype != torch.bfloat16 else 1e-2,
                                       atol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finish_io_writes_nothing_while_the_flag_is_set(dtype):
    pb = Problem(dtype, 5)
    cfg = FINISH[0]
    params = to_dev(pb.tensors())
    grads, direction, v, mom, scalars = _finish_inputs(pb, cfg)
    before, mom_dev = [p.clone() for p in params], mom.to(DEVICE)
    flag = B.new_failure_flag(DEVICE)
    flag.copy_(torch.tensor([2, 0]))
    d_grads, d_dir, d_v = to_dev([grads, direction, v])
    finish_io(params, pb.loc, d_grads, d_dir, d_v, mom_dev, pb.kt, pb.active, fail=flag, **scalars)
    assert_lists_bitwise(params, before, "parameters after a failed step")
    assert torch.equal(bits(mom_dev), bits(mom))
    # a clean flag: active blocks (only) change
    finish_io(params, pb.loc, d_grads, d_dir, d_v, mom_dev, pb.kt, pb.active,
              fail=B.new_failure_flag(DEVICE), **scalars)
    for b, blk in enumerate(pb.lay.blocks):
        changed = not torch.equal(params[blk.param][blk.index].cpu(), before[blk.param][blk.index].cpu())
        assert changed == (bool(pb.active[b]) and np.prod(blk.shape) > 0), b


# --------------------------------------------------------------------------------------------
# scatter_io
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [True, False])
def test_scatter_io_matches_cpu(dtype, accumulate):
    pb = Problem(dtype, 6)
    params = pb.tensors()
    blocks = pb.blocks()
    want = [p.clone() for p in params]
    scatter_io(want, pb.loc, blocks, pb.table, pb.active, accumulate)
    got = to_dev(params)
    scatter_io(got, pb.loc, blocks.to(DEVICE), pb.kt, pb.active, accumulate)
    assert_lists_bitwise(got, want, "scatter_io against the CPU scatter_io")


# --------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------


def test_refusals_change_nothing():
    pb = Problem(torch.float32, 7)
    params = to_dev(pb.tensors())
    snapshot = [p.clone() for p in params]
    blocks = pb.blocks().to(DEVICE)

    def refused(exc, match, ps, active=pb.active, table=pb.kt):
        with pytest.raises(exc, match=match):
            scatter_io(ps, pb.loc, blocks, table, active, True)
        assert_lists_bitwise(params, snapshot, "parameters after a refusal")

    short = list(params)
    short[0] = params[0].reshape(-1)[:10]
    refused(ValueError, "does not fit inside entry 0", short)
    on_cpu = list(params)
    on_cpu[1] = params[1].cpu()
    refused(TypeError, "CUDA tensor", on_cpu)
    missing = list(params)
    missing[0] = None
    refused(ValueError, "missing or None", missing)
    refused(ValueError, "host copy", params, active=pb.active.to(DEVICE))
    refused(TypeError, "KernelTable", params, table=pb.table)
    refused(TypeError, "float32 or bfloat16", [p.to(torch.float16) for p in params])
    alias = list(params)
    alias[1] = blocks[:7]
    refused(ValueError, "overlap", alias)
    with pytest.raises(ValueError, match="'grads' is required"):
        gather_io(None, None, params, None, pb.loc, pb.kt, pb.active, 0.1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_tensor_on_another_gpu_is_refused():
    pb = Problem(torch.float32, 8)
    params = to_dev(pb.tensors())
    params[1] = params[1].to("cuda:1")
    with pytest.raises(ValueError, match="GPU"):
        scatter_io(params, pb.loc, pb.blocks().to(DEVICE), pb.kt, pb.active, True)


# --------------------------------------------------------------------------------------------
# the pointer tables' upload failing (emulator only: failure injection)
# --------------------------------------------------------------------------------------------


def _emulator():
    import sys

    module = sys.modules.get("torch_emu")
    return None if module is None else module._installed


@pytest.mark.skipif(_emulator() is None, reason="failure injection needs the CUDA emulator")
@pytest.mark.parametrize("call", ["cudaMemcpyAsync", "cudaEventRecord"])
def test_a_failed_upload_is_reported_and_writes_nothing(call):
    emu = _emulator()
    emu.reset()
    pb = Problem(torch.float32, 9)
    params = to_dev(pb.tensors())
    before = [p.clone() for p in params]
    blocks = pb.blocks().to(DEVICE)
    try:
        emu.rt.emu_rt_fail(call.encode(), 1, 2)  # cudaErrorMemoryAllocation
        with pytest.raises(RuntimeError, match=call):
            scatter_io(params, pb.loc, blocks, pb.kt, pb.active, True)
    finally:
        emu.reset()
    if call == "cudaMemcpyAsync":  # nothing was launched
        assert_lists_bitwise(params, before, "parameters after a failed upload")
    # the staging pool is still usable afterwards
    scatter_io(params, pb.loc, blocks, pb.kt, pb.active, True)
    want = [p.cpu().clone() for p in before]
    scatter_io(want, pb.loc, blocks.cpu(), pb.table, pb.active, True)
    if call == "cudaMemcpyAsync":
        assert_lists_bitwise(params, want, "parameters after the retry")
