"""The CUDA kernels (distributed_shampoo._C_cuda) through `_backend`, op by op, against the
same op on the CPU (the CPU kernels are themselves pinned to NumPy / tests/oracle.py by
tests/test_kernels_*.py) and, where cheap, against those oracles directly. Nothing here
compares the CUDA code with itself.

Inputs are random block tables from tests/block_tables.py with odd sizes (1, 3, 17, 33, 65,
129), orders 0-3, zero-element blocks and inactive blocks, cut once at 129 (every size as it
is) and once at 32 (many equal blocks: batched cuBLAS/cuSOLVER groups with count > 1).

Tolerances, CUDA against CPU (both float32 and float64):
  * gather, scatter, packed_commit: copies, bitwise equal.
  * moments, finish: a handful of roundings per element; the GPU may contract a*b+c into
    one FMA where the CPU build rounds twice, so results agree to a few ulps of the buffer's
    scale: rtol 1e-6 (float32) / 1e-12 (float64). finish with norm grafting also divides by
    per-block norms summed in another order: 1e-5 / 1e-12.
  * factor_update, precondition: GEMMs. Both sides are held to the worst-case dot-product
    bound of tests/test_kernels_{factor_update,precondition}.py ((K + c) eps times the sum of
    |terms|); CUDA must meet it against the oracle, and so lie within twice it of the CPU.
    TF32 (rounding inputs to 10 mantissa bits) would break that bound by ~100x.
  * root_inverse: float64 against the oracle's eigen root by rel_tol of
    tests/test_kernels_matrix_root.py (backward-stable eigensolver: ~ n eps kappa), float32
    to 1e-3 relative on well-conditioned (kappa 10) SPD factors; CPU within twice that.
Inactive blocks must be left bitwise untouched, except by precondition, whose `out` is
unspecified there on CUDA (shampoo_cuda.h), so only active blocks are compared.
"""

from __future__ import annotations

import numpy as np
import oracle as O
import pytest
import torch
from block_tables import eps, make_layout
from test_batch_plan import expected_plan
from test_kernels_elementwise import FINISH_CASES
from test_kernels_factor_update import oracle as factor_update_oracle
from test_kernels_matrix_root import DEFAULTS as ROOT_DEFAULTS
from test_kernels_matrix_root import (
    Result,
    assert_root_close,
    fl32,
    make_table,
    rel_tol,
    spd,
)
from test_kernels_precondition import contract

from distributed_shampoo import _backend as B


def _cuda_skip_reason() -> str | None:
    if not hasattr(B, "cuda_available"):
        return "this build of distributed_shampoo._backend has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if not B.cuda_available():
        return "the CUDA kernels (distributed_shampoo._C_cuda) are not built"
    return None


pytestmark = pytest.mark.skipif(_cuda_skip_reason() is not None, reason=str(_cuda_skip_reason()))

# An indexed device: KernelTable.device must equal the buffers' device (cuda:0 after .to).
DEVICE = torch.device("cuda", 0)
DTYPES = [torch.float32, torch.float64]
NP = {torch.float32: np.float32, torch.float64: np.float64}
SENTINEL = -7.25  # exactly representable: "not written" is checked bit for bit

ELEMENTWISE_RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}
NORM_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
ROOT_RTOL_F32 = 1e-3

SHAPES = [(129, 65), (), (33,), (17, 3, 5), (0, 4), (1,), (3, 129), (65, 33, 3), (1, 1),
          (129,), (33,)]
LAYOUTS = {"cut129": 129, "cut32": 32}


# --------------------------------------------------------------------------------------------
# Set-up and comparisons.
# --------------------------------------------------------------------------------------------


class Problem:
    """One layout, its tables (plain CPU and KernelTable on the GPU) and an active mask with
    active and inactive blocks of order >= 1 among them."""

    def __init__(self, layout: str, dtype: torch.dtype, seed: int) -> None:
        self.lay = make_layout(SHAPES, LAYOUTS[layout])
        self.dtype = dtype
        self.rng = np.random.default_rng(seed)
        self.table = torch.from_numpy(self.lay.table)
        self.kt = B.KernelTable(self.table, DEVICE)
        nb = len(self.lay.blocks)
        active = self.rng.random(nb) < 0.7
        matrices = [b for b in range(nb) if self.lay.table[b, B.BF_ORDER] >= 1
                    and self.lay.table[b, B.BF_NUMEL] > 0]
        active[matrices[0]] = True
        active[matrices[-1]] = False
        self.active_np = active.astype(np.uint8)
        self.active = torch.from_numpy(self.active_np)
        self.active_dev = self.active.to(DEVICE)
        self.block_mask, self.param_mask, self.factor_mask = _active_masks(self.lay, active)

    def randn(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self.rng.standard_normal(n)).to(self.dtype)

    def rand(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self.rng.random(n)).to(self.dtype)

    def sentinel(self, n: int) -> torch.Tensor:
        return torch.full((n,), SENTINEL, dtype=self.dtype)


def _param_positions(lay, b: int) -> np.ndarray:
    """Flat param-layout positions of block b, in the block's row-major order."""
    blk = lay.blocks[b]
    return lay.param_views(np.arange(lay.param_numel))[blk.param][blk.index].ravel()


def _active_masks(lay, active) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elements of the block, param and factor layouts that belong to active blocks."""
    blocks = np.zeros(lay.block_numel, bool)
    params = np.zeros(lay.param_numel, bool)
    factors = np.zeros(lay.factor_numel, bool)
    for b, blk in enumerate(lay.blocks):
        if active[b]:
            blocks[blk.block_offset : blk.block_offset + int(lay.table[b, B.BF_NUMEL])] = True
            params[_param_positions(lay, b)] = True
            nf = sum(d * d for d in blk.shape)
            factors[blk.factor_offset : blk.factor_offset + nf] = True
    return tuple(torch.from_numpy(m) for m in (blocks, params, factors))


def dev(*tensors: torch.Tensor | None):
    """GPU copies (None stays None)."""
    out = [None if t is None else t.to(DEVICE, copy=True) for t in tensors]
    return out if len(out) > 1 else out[0]


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str, mask=None) -> None:
    g, w = bits(got), bits(want)
    if mask is not None:
        g, w = g[mask], w[mask]
    assert torch.equal(g, w), f"{what}: not bitwise equal"


def assert_close_to_cpu(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str,
                        mask=None) -> None:
    """|got - want| <= rtol * (|want| + max|want|) elementwise, NaNs in the same places."""
    g, w = got.detach().cpu().double(), want.double()
    if mask is not None:
        g, w = g[mask], w[mask]
    if w.numel() == 0:
        return
    scale = float(w[w.isfinite()].abs().max()) if w.isfinite().any() else 1.0
    torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * max(scale, 1e-30), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def new_flag() -> torch.Tensor:
    flag = B.new_failure_flag(DEVICE)
    assert flag.dtype == torch.int64 and flag.shape == (2,) and flag.device.type == DEVICE.type
    assert flag.tolist() == [B.FAIL_NONE, B.FAIL_NONE]
    return flag


def set_flag(step: int, block: int) -> torch.Tensor:
    flag = new_flag()
    flag.copy_(torch.tensor([step, block], dtype=torch.int64))
    return flag


# --------------------------------------------------------------------------------------------
# KernelTable and table/device checks.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_table_on_cuda(layout):
    p = Problem(layout, torch.float64, 0)
    kt = p.kt
    assert kt.nblocks == len(p.lay.blocks)
    assert torch.device(kt.device).type == DEVICE.type
    assert kt.host.device.type == "cpu" and torch.equal(kt.host, p.table)
    assert kt.device_table.device.type == DEVICE.type and torch.equal(kt.device_table.cpu(), p.table)
    plan = expected_plan(p.lay.table)
    assert np.asarray(kt.plan_host).tolist() == plan
    assert torch.as_tensor(kt.plan_device).device.type == DEVICE.type
    assert torch.as_tensor(kt.plan_device).cpu().tolist() == plan


def test_kernel_table_for_the_unindexed_cuda_device():
    """KernelTable(table, "cuda") serves tensors made with .to("cuda") (which land on
    cuda:0, the current device), as torch's own APIs treat "cuda"."""
    lay = make_layout([(5, 3), (7,)], 2)
    table = torch.from_numpy(lay.table)
    active = torch.ones(len(lay.blocks), dtype=torch.uint8)
    blocks = torch.randn(lay.block_numel)
    want = torch.zeros(lay.param_numel)
    B.scatter(want, blocks, table, active)
    got = torch.zeros(lay.param_numel, device="cuda")
    B.scatter(got, blocks.to("cuda"), B.KernelTable(table, "cuda"), active.to("cuda"))
    assert torch.equal(got.cpu(), want)


def test_cuda_buffers_need_a_kernel_table():
    p = Problem("cut32", torch.float32, 0)
    n = p.lay.block_numel
    with pytest.raises((TypeError, ValueError)):
        B.scatter(dev(p.sentinel(p.lay.param_numel)), dev(p.randn(n)), p.table, p.active_dev)


# --------------------------------------------------------------------------------------------
# Elementwise kernels: gather, scatter, moments, finish.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("l2", [0.0, 0.1])
def test_gather(dtype, layout, l2):
    p = Problem(layout, dtype, 1)
    lay = p.lay
    grad_flat, param_flat = p.randn(lay.param_numel), p.randn(lay.param_numel)
    cpu = [p.sentinel(lay.block_numel), p.sentinel(lay.block_numel)]
    assert B.gather(cpu[0], cpu[1], grad_flat, param_flat, p.table, p.active, l2) == -1
    gpu = [dev(p.sentinel(lay.block_numel)), dev(p.sentinel(lay.block_numel))]
    flag = new_flag()
    got = B.gather(gpu[0], gpu[1], *dev(grad_flat, param_flat), p.kt, p.active_dev, l2,
                   step=3, fail=flag)
    assert got == -1
    assert flag.tolist() == [B.FAIL_NONE, B.FAIL_NONE]  # all gradients finite
    if l2 == 0.0:
        assert_bitwise(gpu[0], cpu[0], "grad_blocks")
    else:
        assert_close_to_cpu(gpu[0], cpu[0], ELEMENTWISE_RTOL[dtype], "grad_blocks")
        assert_bitwise(gpu[0], cpu[0], "grad_blocks of inactive blocks", ~p.block_mask)
    assert_bitwise(gpu[1], cpu[1], "param_blocks")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_sets_the_failure_flag(dtype):
    """fail[0] = the step, fail[1] = the first active block holding NaN/Inf; inactive blocks
    are not looked at; an earlier step's failure is kept; copies happen either way."""
    p = Problem("cut32", dtype, 2)
    lay = p.lay
    nonempty = [b for b in range(len(lay.blocks)) if lay.table[b, B.BF_NUMEL] > 0]
    act = [b for b in nonempty if p.active_np[b]]
    inact = [b for b in nonempty if not p.active_np[b]]
    first, second = act[1], act[3]
    grad_flat = p.randn(lay.param_numel)

    def gather(grads: torch.Tensor, flag: torch.Tensor, step: int) -> torch.Tensor:
        out = dev(p.sentinel(lay.block_numel))
        assert B.gather(out, None, dev(grads), None, p.kt, p.active_dev, 0.0, step=step,
                        fail=flag) == -1
        return out

    only_inactive_bad = grad_flat.clone()
    only_inactive_bad[_param_positions(lay, inact[0])[0]] = float("inf")
    flag = new_flag()
    gather(only_inactive_bad, flag, 4)
    assert flag.tolist() == [B.FAIL_NONE, B.FAIL_NONE]

    bad = only_inactive_bad.clone()
    bad[_param_positions(lay, second)[0]] = float("nan")
    bad[_param_positions(lay, first)[-1]] = float("-inf")
    flag = new_flag()
    out = gather(bad, flag, 4)
    assert flag.tolist() == [4, first]
    # The copies were made anyway (scratch): the gradient as it is, NaN and Inf included.
    want = p.sentinel(lay.block_numel)
    for b in act:
        o = lay.blocks[b].block_offset
        pos = _param_positions(lay, b)
        want[o : o + len(pos)] = bad[pos]
    assert_bitwise(out, want, "grad_blocks")

    gather(bad, flag, 5)  # an earlier step failed: left as it is
    assert flag.tolist() == [4, first]
    flag = set_flag(4, lay.table.shape[0])  # same step, later block recorded: the minimum
    gather(bad, flag, 4)
    assert flag.tolist() == [4, first]
    flag = set_flag(4, 0)
    gather(bad, flag, 4)
    assert flag.tolist() == [4, 0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_on_cuda_requires_the_flag(dtype):
    p = Problem("cut32", dtype, 0)
    with pytest.raises((TypeError, ValueError)):
        B.gather(dev(p.sentinel(p.lay.block_numel)), None, dev(p.randn(p.lay.param_numel)),
                 None, p.kt, p.active_dev, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter(dtype, layout):
    p = Problem(layout, dtype, 3)
    blocks = p.randn(p.lay.block_numel)
    cpu = p.sentinel(p.lay.param_numel)
    B.scatter(cpu, blocks, p.table, p.active)
    gpu = dev(p.sentinel(p.lay.param_numel))
    B.scatter(gpu, dev(blocks), p.kt, p.active_dev)
    assert_bitwise(gpu, cpu, "flat")  # inactive blocks' places keep the sentinel on both


MOMENTS_CASES = [
    # grafting beta2 (None: no grafting state), beta1, beta3, bias_correction1
    (None, 0.0, 0.0, 1.0),
    (1.0, 0.9, 0.9, 0.19),
    (0.999, 0.9, 0.95, 0.19),
    (0.999, 0.3, 0.8, 1.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", MOMENTS_CASES, ids=str)
@pytest.mark.parametrize("with_flag", [True, False], ids=["clean_flag", "no_flag"])
def test_moments(dtype, layout, case, with_flag):
    graft_beta2, beta1, beta3, bc1 = case
    p = Problem(layout, dtype, 4)
    n = p.lay.block_numel
    G0, V0, F0 = p.randn(n), p.rand(n), p.randn(n)
    kw = {"update_grafting_state": graft_beta2 is not None,
          "grafting_beta2": graft_beta2 or 1.0, "beta1": beta1, "beta3": beta3,
          "bias_correction1": bc1}
    use_v, use_f = graft_beta2 is not None, beta1 != 0.0
    cpu = [G0.clone(), V0.clone(), F0.clone()]
    B.moments(cpu[0], cpu[1] if use_v else None, cpu[2] if use_f else None, p.table, p.active,
              **kw)
    gpu = list(dev(G0, V0, F0))
    B.moments(gpu[0], gpu[1] if use_v else None, gpu[2] if use_f else None, p.kt, p.active_dev,
              **kw, fail=new_flag() if with_flag else None)
    for name, g, c in zip(("grads", "grafting_state", "filtered_grad"), gpu, cpu):
        assert_close_to_cpu(g, c, ELEMENTWISE_RTOL[dtype], name)
        assert_bitwise(g, c, f"{name} of inactive blocks", ~p.block_mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", FINISH_CASES, ids=str)
@pytest.mark.parametrize("with_flag", [True, False], ids=["clean_flag", "no_flag"])
def test_finish(dtype, layout, case, with_flag):
    graft, phase, wd, mom, damp, nesterov = case
    p = Problem(layout, dtype, 5)
    n = p.lay.block_numel
    G, S, W, M0 = p.randn(n), p.randn(n), p.randn(n), p.randn(n)
    V = p.rand(n) + 0.01
    kw = {"graft": graft, "grafting_phase": phase, "grafting_bias_correction": fl32(0.271),
          "grafting_epsilon": 1e-8, "decoupled_weight_decay": wd, "momentum": mom,
          "dampening": damp, "nesterov": nesterov, "lr": fl32(0.1)}

    def args(G, S, V, W, M):
        return (G, None if phase else S, V if graft == "diagonal" else None, W if wd else None,
                M if mom else None)

    cpu_update, cpu_m = p.sentinel(p.lay.param_numel), M0.clone()
    B.finish(cpu_update, *args(G, S, V, W, cpu_m), p.table, p.active, **kw)
    gpu_update, gpu_m = dev(p.sentinel(p.lay.param_numel), M0)
    B.finish(gpu_update, *args(*dev(G, S, V, W), gpu_m), p.kt, p.active_dev, **kw,
             fail=new_flag() if with_flag else None)
    rtol = NORM_RTOL[dtype] if graft != "none" and not phase else ELEMENTWISE_RTOL[dtype]
    assert_close_to_cpu(gpu_update, cpu_update, rtol, "update", p.param_mask)
    assert_bitwise(gpu_update, cpu_update, "update of inactive blocks", ~p.param_mask)
    assert_close_to_cpu(gpu_m, cpu_m, rtol, "momentum")
    assert_bitwise(gpu_m, cpu_m, "momentum of inactive blocks", ~p.block_mask)


@pytest.mark.parametrize("missing,kw,match", [
    ("shampoo_dir", {}, "argument 'shampoo_dir' must be given outside the grafting phase"),
    ("grafting_state", {"graft": "diagonal"}, "argument 'grafting_state' must be given for diagonal grafting"),
    ("param_blocks", {"decoupled_weight_decay": 0.01}, "argument 'param_blocks' must be given when decoupled"),
    ("momentum_state", {"momentum": 0.9}, "argument 'momentum_state' must be given exactly when momentum"),
])
def test_finish_refuses_a_missing_buffer_by_name(missing, kw, match):
    """As the CPU finish: a scalar that needs a buffer not given is a ValueError naming it,
    before anything runs (the output keeps its sentinel)."""
    p = Problem("cut32", torch.float32, 8)
    n = p.lay.block_numel
    G, S, V, W, M = dev(p.randn(n), p.randn(n), p.rand(n) + 0.01, p.randn(n), p.randn(n))
    buffers = {"shampoo_dir": S, "grafting_state": V, "param_blocks": W, "momentum_state": M}
    buffers[missing] = None
    if missing != "momentum_state" and not kw.get("momentum"):
        buffers["momentum_state"] = None  # momentum 0: none given
    update = dev(p.sentinel(p.lay.param_numel))
    before = update.cpu().clone()
    scalars = dict(graft="sgd", grafting_phase=False, grafting_bias_correction=1.0, grafting_epsilon=1e-8,
                   decoupled_weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, lr=0.1)
    scalars.update(kw)
    with pytest.raises(ValueError, match=match):
        B.finish(update, G, buffers["shampoo_dir"], buffers["grafting_state"], buffers["param_blocks"],
                 buffers["momentum_state"], p.kt, p.active_dev, **scalars)
    assert_bitwise(update, before, "update after a refused call")


# --------------------------------------------------------------------------------------------
# A set failure flag: no writes to state, finish writes -0.0.
# --------------------------------------------------------------------------------------------

SET_FLAGS = [(3, 0), (7, 5)]  # an earlier step's failure, and this step's


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flag_value", SET_FLAGS, ids=str)
def test_set_flag_moments_write_no_state(dtype, flag_value):
    p = Problem("cut32", dtype, 6)
    n = p.lay.block_numel
    G, V, F = dev(p.randn(n), p.rand(n), p.randn(n))
    V0, F0 = V.clone(), F.clone()
    B.moments(G, V, F, p.kt, p.active_dev, update_grafting_state=True, grafting_beta2=0.99,
              beta1=0.9, beta3=0.8, bias_correction1=0.5, fail=set_flag(*flag_value))
    assert_bitwise(V, V0, "grafting_state")
    assert_bitwise(F, F0, "filtered_grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flag_value", SET_FLAGS, ids=str)
@pytest.mark.parametrize("case", FINISH_CASES, ids=str)
def test_set_flag_finish_writes_negative_zero(dtype, flag_value, case):
    """-0.0 updates (x + -0.0 == x bitwise for every x); momentum untouched. What finish
    writes for inactive blocks under a set flag is not part of the contract: not checked."""
    graft, phase, wd, mom, damp, nesterov = case
    p = Problem("cut32", dtype, 7)
    n = p.lay.block_numel
    G, S, V, W, M = dev(p.randn(n), p.randn(n), p.rand(n) + 0.01, p.randn(n), p.randn(n))
    M0 = M.clone()
    update = dev(p.sentinel(p.lay.param_numel))
    B.finish(update, G, None if phase else S, V if graft == "diagonal" else None,
             W if wd else None, M if mom else None, p.kt, p.active_dev, graft=graft,
             grafting_phase=phase, grafting_bias_correction=1.0, grafting_epsilon=1e-8,
             decoupled_weight_decay=wd, momentum=mom, dampening=damp, nesterov=nesterov,
             lr=0.1, fail=set_flag(*flag_value))
    written = update.cpu()[p.param_mask]
    assert bool((written == 0).all() and torch.signbit(written).all()), "updates are not -0.0"
    assert_bitwise(M, M0, "momentum")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flag_value", SET_FLAGS, ids=str)
@pytest.mark.parametrize("beta2", [1.0, 0.95])
def test_set_flag_factor_update_writes_no_state(dtype, flag_value, beta2):
    p = Problem("cut32", dtype, 8)
    factors = dev(p.randn(p.lay.factor_numel))
    before = factors.clone()
    B.factor_update(factors, factors, dev(p.randn(p.lay.block_numel)), p.kt, p.active_dev,
                    beta2, fail=set_flag(*flag_value))
    assert_bitwise(factors, before, "factors")


# --------------------------------------------------------------------------------------------
# GEMM kernels: factor_update, precondition.
# --------------------------------------------------------------------------------------------


def _symmetric_factors(p: Problem) -> torch.Tensor:
    f = p.rng.standard_normal(p.lay.factor_numel)
    for b in range(len(p.lay.blocks)):
        for F in p.lay.factor_views(f, b):  # real factors are symmetric (sums of U U^T)
            F[...] = F + F.T
    return torch.from_numpy(f).to(p.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("beta2", [1.0, 0.95])
@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("with_flag", [True, False], ids=["clean_flag", "no_flag"])
def test_factor_update(dtype, layout, beta2, in_place, with_flag):
    p = Problem(layout, dtype, 9)
    grads = p.randn(p.lay.block_numel)
    factors = _symmetric_factors(p)
    cpu = factors.clone()
    B.factor_update(cpu, cpu, grads, p.table, p.active, beta2)
    gpu_in = dev(factors)
    gpu_out = gpu_in if in_place else dev(torch.full_like(factors, float("nan")))
    B.factor_update(gpu_out, gpu_in, dev(grads), p.kt, p.active_dev, beta2,
                    fail=new_flag() if with_flag else None)
    got = gpu_out.cpu()
    want, bound = factor_update_oracle(p.lay, factors.numpy(), grads.numpy(), p.active_np, beta2)
    err_oracle = np.abs(got.double().numpy() - want)
    assert np.all(err_oracle <= bound), f"vs oracle: max excess {np.max(err_oracle - bound):.3g}"
    err_cpu = np.abs(got.double().numpy() - cpu.double().numpy())
    assert np.all(err_cpu <= 2 * bound), f"vs CPU: max excess {np.max(err_cpu - 2 * bound):.3g}"
    # inactive blocks: the input factors, copied through when out of place
    assert_bitwise(got, factors, "factors of inactive blocks", ~p.factor_mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_factor_update_keeps_a_one_sided_nan(dtype):
    """Elementwise on the full matrix, like the CPU (SPEC A.3.12): a NaN in one triangle of a
    factor stays there, the other triangle stays finite."""
    lay = make_layout([(2, 40)], max_dim=64)
    table = torch.from_numpy(lay.table)
    kt = B.KernelTable(table, DEVICE)
    factors = np.zeros(lay.factor_numel)
    lay.factor_views(factors, 0)[1][1, 2] = np.nan
    grads = torch.from_numpy(np.random.default_rng(3).standard_normal(lay.block_numel)).to(dtype)
    for beta2 in (1.0, 0.9):
        out = dev(torch.from_numpy(factors).to(dtype))
        B.factor_update(out, out, dev(grads), kt, dev(torch.ones(1, dtype=torch.uint8)), beta2,
                        fail=new_flag())
        R = lay.factor_views(out.cpu().double().numpy(), 0)[1]
        assert np.isnan(R[1, 2]) and np.isfinite(np.delete(R.ravel(), 1 * 40 + 2)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_precondition(dtype, layout):
    """Non-symmetric inverse roots pin the index convention (dim 0 with Q_k's first index)."""
    p = Problem(layout, dtype, 10)
    grads, inv_roots = p.randn(p.lay.block_numel), p.randn(p.lay.factor_numel)
    cpu = p.sentinel(p.lay.block_numel)
    B.precondition(cpu, grads, inv_roots, p.table, p.active)
    gpu = dev(p.sentinel(p.lay.block_numel))
    B.precondition(gpu, dev(grads), dev(inv_roots), p.kt, p.active_dev)
    got, cpu_np = gpu.cpu().double().numpy(), cpu.double().numpy()
    g_np, q_np = grads.double().numpy(), inv_roots.double().numpy()
    for b, blk in enumerate(p.lay.blocks):
        if not p.active_np[b]:
            continue  # unspecified on CUDA
        G = p.lay.block_view(g_np, b)
        Qs = p.lay.factor_views(q_np, b)
        want = contract(G, Qs)
        bound = (sum(blk.shape) + 2 * len(blk.shape)) * eps(NP[dtype]) * contract(
            np.abs(G), [np.abs(Q) for Q in Qs]) + 1e-300
        g = p.lay.block_view(got, b)
        assert np.all(np.abs(g - want) <= bound), (blk.shape, "vs oracle")
        assert np.all(np.abs(g - p.lay.block_view(cpu_np, b)) <= 2 * bound), (blk.shape, "vs CPU")


# --------------------------------------------------------------------------------------------
# packed_commit.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_commit(dtype, layout):
    """Per factor, packed layout (n(n+1)/2 entries each, blocks in table order): committed
    factors copy src into dst, the others restore src from dst. Against that rule, and
    bitwise the CPU kernel."""
    p = Problem(layout, dtype, 11)
    n = B.packed_numel(p.table)
    dst0, src0 = p.randn(n), p.randn(n)
    commit = torch.from_numpy((p.rng.random(p.lay.factor_count) < 0.5).astype(np.uint8))
    assert 0 < int(commit.sum()) < len(commit)
    want, at = torch.empty(n, dtype=dtype), 0
    for b, blk in enumerate(p.lay.blocks):
        for k, d in enumerate(blk.shape):
            span = slice(at, at + d * (d + 1) // 2)
            take = commit[int(p.lay.table[b, B.BF_FACTOR_INDEX]) + k]
            want[span] = src0[span] if take else dst0[span]
            at = span.stop
    assert at == n
    cpu = [dst0.clone(), src0.clone()]
    B.packed_commit(cpu[0], cpu[1], p.table, commit)
    assert_bitwise(cpu[0], want, "cpu dst")
    assert_bitwise(cpu[1], want, "cpu src")
    gpu = list(dev(dst0, src0))
    B.packed_commit(gpu[0], gpu[1], p.kt, dev(commit))
    assert_bitwise(gpu[0], cpu[0], "dst")
    assert_bitwise(gpu[1], cpu[1], "src")


# --------------------------------------------------------------------------------------------
# root_inverse (eigen).
# --------------------------------------------------------------------------------------------


def run_roots(mats, roots, dtype, *, active=None, is_diagonal=None, diag_dtype=torch.uint8,
              **cfg) -> tuple[Result, Result]:
    """The same root_inverse call on the CPU (NumPy buffers) and on the GPU."""
    table, offsets = make_table([([len(m) for m in ms], r) for ms, r in zip(mats, roots)])
    dims = [len(m) for ms in mats for m in ms]
    flat = [np.asarray(m, NP[dtype]).ravel() for ms in mats for m in ms]
    factors = np.concatenate(flat) if flat else np.zeros(0, NP[dtype])
    nf = len(dims)
    act = np.array([1] * len(mats) if active is None else active, np.uint8)
    diag = np.array([0] * nf if is_diagonal is None else is_diagonal, np.uint8)
    kw = {**ROOT_DEFAULTS, **cfg}

    cpu_out, cpu_diag = np.full_like(factors, SENTINEL), diag.copy()
    cpu_status = np.full(nf, -1, np.int32)
    B.root_inverse(cpu_out, factors, table, act, **kw, is_diagonal=cpu_diag, status_out=cpu_status)

    kt = B.KernelTable(torch.from_numpy(table), DEVICE)
    gpu_out = torch.full((len(factors),), SENTINEL, dtype=dtype, device=DEVICE)
    gpu_diag = torch.from_numpy(diag).to(diag_dtype).to(DEVICE)
    gpu_status = torch.full((nf,), -1, dtype=torch.int32)
    B.root_inverse(gpu_out, dev(torch.from_numpy(factors)), kt, dev(torch.from_numpy(act)), **kw,
                   is_diagonal=gpu_diag, status_out=gpu_status)
    gpu = Result(gpu_out.cpu().numpy(), gpu_status.numpy(),
                 gpu_diag.cpu().to(torch.uint8).numpy(), offsets, dims)
    return Result(cpu_out, cpu_status, cpu_diag, offsets, dims), gpu


def root_tol(dtype, n: int, kappa: float, alpha: float) -> float:
    return rel_tol(np.float64, n, kappa, alpha) if dtype == torch.float64 else ROOT_RTOL_F32


def oracle_root(m: np.ndarray, dtype, root: int, *, epsilon: float, exponent_multiplier: float,
                bias_correction: float = 1.0, make_positive_semidefinite: bool = True,
                is_diagonal: bool = False, **_) -> np.ndarray:
    """tests/oracle.py's inverse root (float64) of the factor as stored in `dtype`."""
    a = torch.from_numpy(np.asarray(m, NP[dtype]).astype(np.float64)) / bias_correction
    config = O.EigenConfig(make_positive_semidefinite=make_positive_semidefinite)
    return O.matrix_inverse_root(a, root, config, epsilon, exponent_multiplier,
                                 is_diagonal).numpy()


def assert_same_outcome(cpu: Result, gpu: Result) -> None:
    np.testing.assert_array_equal(gpu.status, cpu.status, err_msg="statuses differ from CPU")
    np.testing.assert_array_equal(gpu.is_diagonal, cpu.is_diagonal, err_msg="diagonal flags")


ROOT_BLOCKS = [((33,), 2), ((129,), 4), ((17, 3), 4), ((32, 32), 2), ((31, 2, 5), 6),
               ((65, 1), 2), ((), 2), ((0, 3), 2), ((17, 17), 8), ((64,), 4), ((1,), 2),
               ((33, 33), 4)]
ROOT_ACTIVE = [True] * 8 + [False] + [True] * 3  # ((17, 17), 8) inactive
ROOT_CFGS = {
    "eps1e-12": {"epsilon": 1e-12},
    "eps1e-3_mult0.5_bc0.25": {"epsilon": 1e-3, "exponent_multiplier": 0.5,
                               "bias_correction": 0.25},
    "no_psd_eps1e-6": {"epsilon": 1e-6, "make_positive_semidefinite": False},
}
KAPPA = 10.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", ROOT_CFGS.values(), ids=ROOT_CFGS.keys())
def test_root_inverse_random_spd(dtype, cfg):
    """Sizes on both sides of 32 (syevjBatched / other solvers), several factors of one size
    in one batch, 1x1 factors, an order-0 block, a zero-size factor and an inactive block."""
    rng = np.random.default_rng(12)
    mats = [[spd(rng, n, KAPPA, scale=rng.uniform(0.1, 3.0)) if n else np.zeros((0, 0))
             for n in dims] for dims, _ in ROOT_BLOCKS]
    roots = [r for _, r in ROOT_BLOCKS]
    cpu, gpu = run_roots(mats, roots, dtype, active=ROOT_ACTIVE, **cfg)
    assert_same_outcome(cpu, gpu)
    full = {**ROOT_DEFAULTS, **cfg}
    f = 0
    for ms, root, act in zip(mats, roots, ROOT_ACTIVE):
        for m in ms:
            n = len(m)
            if not act:
                assert gpu.status[f] == B.ROOT_INACTIVE
                assert np.all(gpu.factor(f) == SENTINEL), "inactive factor written"
            else:
                assert gpu.status[f] == B.ROOT_OK
            if act and n == 1:  # 1x1 shortcut: (a + eps) ** fl32(-multiplier / root)
                want = oracle_root(m, dtype, root, **full)
                np.testing.assert_allclose(gpu.factor(f), want, rtol=8 * eps(NP[dtype]))
            elif act and n > 1:
                want = oracle_root(m, dtype, root, **full)
                tol = root_tol(dtype, n, KAPPA, full["exponent_multiplier"] / root)
                assert_root_close(gpu.factor(f), want, tol)
                assert_root_close(gpu.factor(f), cpu.factor(f).astype(np.float64), 2 * tol)
            f += 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_root_inverse_diagonal_flags(dtype):
    """Flag set and factor diagonal: SPEC §5.2 (no PSD shift, so a negative entry gives NaN
    there: NONFINITE, written anyway); flag set and factor dense: flag cleared, eigen; flag
    clear: eigen even for a diagonal factor. A zero factor's root is eps^(-1/r) I. Inactive
    blocks' flags are left alone. Sizes below and above 32."""
    rng = np.random.default_rng(5)
    dneg = np.diag([2.0, -1.0, 3.0])
    dpos40 = np.diag(rng.uniform(0.5, 4.0, 40))
    mats = [
        [dneg, spd(rng, 3, 5.0), dneg],  # flags 1, 1, 0
        [spd(rng, 3, 5.0)],              # inactive, flag 1
        [np.zeros((4, 4)), dpos40],       # flags 1, 1
        [spd(rng, 40, 5.0), dpos40],      # flags 1, 0
        [np.array([[2.5]])],             # flag 1 (1x1)
    ]
    flags = [1, 1, 0, 1, 1, 1, 1, 0, 1]
    active = [True, False, True, True, True]
    cfg = {"epsilon": 0.5}  # -1 + 0.5 stays negative; the shifted spectra stay > 0
    cpu, gpu = run_roots(mats, [2, 2, 4, 2, 2], dtype, active=active, is_diagonal=flags,
                         diag_dtype=torch.bool, **cfg)
    assert_same_outcome(cpu, gpu)
    assert list(gpu.is_diagonal) == [1, 0, 0, 1, 1, 1, 0, 0, 1]
    ok, nonfinite, inactive = B.ROOT_OK, B.ROOT_NONFINITE, B.ROOT_INACTIVE
    assert list(gpu.status) == [nonfinite, ok, ok, inactive, ok, ok, ok, ok, ok]
    x0 = gpu.factor(0)
    assert np.isnan(x0[1, 1]) and x0[0, 1] == 0 and x0[1, 0] == 0
    np.testing.assert_allclose(np.diag(x0)[[0, 2]], [2.5**-0.5, 3.5**-0.5], rtol=8 * eps(NP[dtype]))
    assert np.all(gpu.factor(3) == SENTINEL)
    full = {**ROOT_DEFAULTS, **cfg}
    cases = [  # factor, matrix, root, diagonal path, kappa of the shifted matrix
        (1, mats[0][1], 2, False, 5.0), (2, dneg, 2, False, 9.0), (4, mats[2][0], 4, True, 1.0),
        (5, dpos40, 4, True, 8.0), (6, mats[3][0], 2, False, 5.0), (7, dpos40, 2, False, 8.0),
        (8, mats[4][0], 2, True, 1.0),
    ]
    for f, m, root, diagonal, kappa in cases:
        want = oracle_root(m, dtype, root, **full, is_diagonal=diagonal)
        tol = root_tol(dtype, len(m), kappa, 1.0 / root)
        assert_root_close(gpu.factor(f), want, tol)
        assert_root_close(gpu.factor(f), cpu.factor(f).astype(np.float64), 2 * tol)
    np.testing.assert_allclose(gpu.factor(4), 0.5 ** -0.25 * np.eye(4), rtol=8 * eps(NP[dtype]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_root_inverse_nonfinite_factors_leave_output_untouched(dtype):
    """NaN/Inf factors (NaN wins over Inf) get FACTOR_NAN / FACTOR_INF and are not written;
    their batch-mates (same size, same cuSOLVER batch) are computed as usual."""
    rng = np.random.default_rng(6)

    def poisoned(n, i, j, value):
        m = spd(rng, n, KAPPA)
        m[i, j] = value
        return m

    both = poisoned(17, 2, 2, np.inf)
    both[4, 1] = np.nan
    mats = [[spd(rng, 17, KAPPA)], [poisoned(17, 0, 5, np.nan)], [spd(rng, 17, KAPPA)],
            [poisoned(40, 39, 39, np.inf)], [spd(rng, 40, KAPPA)], [np.array([[np.nan]])],
            [np.array([[3.0]])], [both], [poisoned(3, 1, 0, -np.inf), spd(rng, 3, KAPPA)]]
    roots = [2] * len(mats)
    cpu, gpu = run_roots(mats, roots, dtype, epsilon=1e-6)
    assert_same_outcome(cpu, gpu)
    NAN, INF, OK = B.ROOT_FACTOR_NAN, B.ROOT_FACTOR_INF, B.ROOT_OK
    assert list(gpu.status) == [OK, NAN, OK, INF, OK, NAN, OK, NAN, INF, OK]
    flat = [m for ms in mats for m in ms]
    for f, (m, st) in enumerate(zip(flat, gpu.status)):
        if st != OK:
            assert np.all(gpu.factor(f) == SENTINEL), f"factor {f} written"
        else:
            want = oracle_root(m, dtype, 2, **{**ROOT_DEFAULTS, "epsilon": 1e-6})
            assert_root_close(gpu.factor(f), want, root_tol(dtype, len(m), KAPPA, 0.5))


def test_root_inverse_bias_correction_overflow_is_an_inf_factor():
    """F / bias_correction is checked in the working dtype (float32 overflows to Inf)."""
    mats = [[np.eye(2) * 3e38], [np.eye(40) * 3e38]]
    cpu, gpu = run_roots(mats, [2, 2], torch.float32, bias_correction=0.5)
    assert_same_outcome(cpu, gpu)
    assert list(gpu.status) == [B.ROOT_FACTOR_INF] * 2
    assert np.all(gpu.out == SENTINEL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_root_inverse_no_psd_negative_spectrum_is_nonfinite(dtype):
    rng = np.random.default_rng(12)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    indefinite = (q * np.array([-1.0, 0.5, 1.0, 2.0])) @ q.T
    q40, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    indefinite40 = (q40 * np.linspace(-1.0, 2.0, 40)) @ q40.T
    cpu, gpu = run_roots([[indefinite], [indefinite40]], [2, 2], dtype,
                         make_positive_semidefinite=False)
    assert_same_outcome(cpu, gpu)
    assert list(gpu.status) == [B.ROOT_NONFINITE] * 2
    for f in range(2):  # written anyway
        assert np.isnan(gpu.factor(f)).any() and not np.any(gpu.factor(f) == SENTINEL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_root_inverse_all_inactive_and_root_zero(dtype):
    rng = np.random.default_rng(8)
    mats = [[spd(rng, 4, 3.0), spd(rng, 40, 3.0)], [spd(rng, 3, 3.0)]]
    cpu, gpu = run_roots(mats, [2, 2], dtype, active=[False, False], is_diagonal=[1, 0, 1])
    assert_same_outcome(cpu, gpu)
    assert list(gpu.status) == [B.ROOT_INACTIVE] * 3
    assert np.all(gpu.out == SENTINEL) and list(gpu.is_diagonal) == [1, 0, 1]
    # Root 0 fails on every path (SPEC: "Root 0 should be positive!"): FAILED, nothing written.
    cpu, gpu = run_roots([[np.eye(2), np.array([[3.0]]), spd(rng, 40, 3.0)]], [0], dtype,
                         is_diagonal=[1, 0, 0])
    assert_same_outcome(cpu, gpu)
    assert list(gpu.status) == [B.ROOT_FAILED] * 3 and np.all(gpu.out == SENTINEL)


@pytest.mark.parametrize("method", ["newton", "higher_order"])
def test_root_inverse_iterative_methods_are_refused(method):
    table, _ = make_table([([3], 2)])
    with pytest.raises(ValueError):
        B.root_inverse(dev(torch.zeros(9)), dev(torch.eye(3).ravel()),
                       B.KernelTable(torch.from_numpy(table), DEVICE),
                       dev(torch.ones(1, dtype=torch.uint8)),
                       **{**ROOT_DEFAULTS, "method": method},
                       is_diagonal=dev(torch.zeros(1, dtype=torch.uint8)),
                       status_out=torch.zeros(1, dtype=torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,count", [(32, 32768 + 9), (256, 512 + 9)])
def test_root_inverse_large_groups(dtype, n, count):
    """More equal factors than one cuSOLVER batch holds (2^25 elements per staging buffer in
    today's implementation; the test holds whatever that limit is): every factor OK and
    finite, and factors on both sides of each batch boundary against the oracle."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    # Wishart with 2n samples + 0.5 I: eigenvalues in about [0.6, 3.4], kappa ~ 6.
    x = torch.randn(count, n, 2 * n, generator=gen, device=DEVICE, dtype=torch.float64)
    a = (x @ x.transpose(1, 2)) / (2 * n) + 0.5 * torch.eye(n, device=DEVICE, dtype=torch.float64)
    del x
    a = a.to(dtype)
    table, _ = make_table([([n], 4)] * count)
    kt = B.KernelTable(torch.from_numpy(table), DEVICE)
    out = torch.full((count * n * n,), SENTINEL, dtype=dtype, device=DEVICE)
    status = torch.full((count,), -1, dtype=torch.int32)
    B.root_inverse(out, a.reshape(-1), kt, torch.ones(count, dtype=torch.uint8, device=DEVICE),
                   **{**ROOT_DEFAULTS, "epsilon": 1e-6},
                   is_diagonal=torch.zeros(count, dtype=torch.uint8, device=DEVICE),
                   status_out=status)
    assert bool((status == B.ROOT_OK).all()), np.unique(status.numpy())
    out = out.view(count, n, n)
    assert bool(torch.isfinite(out).all())
    per_batch = (1 << 25) // (n * n)
    for f in sorted({0, 1, per_batch - 1, per_batch, count - 1}):
        m = a[f].cpu().numpy()
        want = oracle_root(m, dtype, 4, epsilon=1e-6, exponent_multiplier=1.0)
        assert_root_close(out[f].cpu().numpy(), want, root_tol(dtype, n, 6.0, 0.25))
