"""Issue 16 items 2, 3, 4, 6: everything a step uses is read and checked before any write.

A failed step must leave parameters and optimizer state bit for bit unchanged
(assert_bitwise_equal of test_atomicity), and training must continue afterwards.
"""

import math
import pathlib
import sys
import warnings

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_atomicity import _make, _set_grads, _snapshot, assert_bitwise_equal

from distributed_shampoo import _backend
from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.matrix_functions_types import CoupledNewtonConfig
from distributed_shampoo.shampoo_types import AdaGradGraftingConfig, PrecisionConfig

F32_MAX = float(np.finfo(np.float32).max)


def _step_count(optimizer) -> int:
    return int(optimizer.state[optimizer.param_groups[0]["params"][0]]["step"])


def _assert_refused(params, optimizer, error, match, edit=None) -> None:
    """The step raises `error` and changes nothing."""
    before = _snapshot(params, optimizer)
    with pytest.raises(error, match=match):
        optimizer.step()
    assert_bitwise_equal(before, _snapshot(params, optimizer), "after refused step")


def _continue(params, optimizer, steps=3) -> None:
    for seed in range(steps):
        _set_grads(params, 100 + seed)
        optimizer.step()
    for p in params:
        assert torch.isfinite(p).all()


# ------------------------------------------------------------------ item 2: no overflow
def test_gather_returns_block_squared_norms_in_double() -> None:
    params, opt = _make()
    engine = opt._engines[0]
    g = np.asarray([3e19, 4e19, 1.0], dtype=np.float32)  # squares overflow float32, not double
    grad_flat = torch.zeros(engine.layout.param_numel)
    grad_flat[:3] = torch.from_numpy(g)
    sq = torch.full((engine.layout.num_blocks,), -1.0, dtype=torch.float64)
    blocks = torch.zeros(engine.layout.numel)
    active = torch.ones(engine.layout.num_blocks, dtype=torch.uint8)
    active[-1] = 0
    _backend.gather(blocks, None, grad_flat, None, engine.table, active, 0.0, sq_norms=sq)
    expected = np.zeros(engine.layout.num_blocks)
    gf = grad_flat.numpy().astype(np.float64)
    for b in range(engine.layout.num_blocks - 1):  # oracle: the block's elements, summed in double
        row = engine.layout.table[b].numpy()
        off, n = int(row[_backend.BF_BLOCK_OFFSET]), int(row[_backend.BF_NUMEL])
        expected[b] = float((blocks.numpy()[off : off + n].astype(np.float64) ** 2).sum())
    assert expected.sum() == pytest.approx(float((gf**2).sum()), rel=1e-12)
    np.testing.assert_allclose(sq.numpy(), expected, rtol=1e-15)
    assert sq[-1] == 0.0


@pytest.mark.parametrize("scale", [1e19, 1e25, 1e30, 3e38])
def test_huge_finite_gradient_on_non_root_step_is_refused(scale: float) -> None:
    params, opt = _make(precondition_frequency=10)
    _set_grads(params, 1)
    opt.step()  # step 1: not a root step
    _set_grads(params, 2)
    params[0].grad.fill_(scale)  # every block of parameter 0: ||G||^2 >= 4 scale^2
    _assert_refused(params, opt, ValueError, r"too large.*0\.block_0\.[01].*unchanged")
    assert _step_count(opt) == 1
    _continue(params, opt, steps=10)  # passes the root step at 10
    assert _step_count(opt) == 11


def test_bound_admits_what_fits_and_refuses_the_unweighted_gram() -> None:
    """beta2 = 0.9, a 2x2 block of equal entries e: with ||G||^2 = 4e^2 = 0.5 max it fits; with
    4e^2 = 3 max the weighted trace (0.3 max) would fit, but the kernel forms G G^T first and
    its entries 2e^2 = 1.5 max overflow float32 (oracle below), so the step is refused."""
    params, opt = _make(shapes=((2, 2),), betas=(0.0, 0.9), momentum=0.0, grafting_config=None,
                        weight_decay=0.0, precondition_frequency=100, use_merge_dims=False)
    params[0].grad = torch.full((2, 2), math.sqrt(0.125 * F32_MAX))
    opt.step()
    factors = opt.state[params[0]]["block_0"]["shampoo"]["factor_matrices"]
    for k in (0, 1):
        assert torch.isfinite(factors[k]["quantized_values"]).all()
    g = torch.full((2, 2), math.sqrt(0.75 * F32_MAX))
    assert not torch.isfinite(g @ g.T).all()  # oracle: the Gram matrix overflows
    assert 0.1 * float((g.double() ** 2).sum()) < F32_MAX  # while the weighted trace fits
    params[0].grad = g
    _assert_refused(params, opt, ValueError, "too large")


def test_float64_gradient_whose_square_overflows_double_is_refused() -> None:
    p = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.float64))
    opt = DistributedShampoo([p], precondition_frequency=5, precision_config=PrecisionConfig(
        computation_dtype=torch.float64, factor_matrix_dtype=torch.float64))
    p.grad = torch.ones(3, 2, dtype=torch.float64)
    opt.step()
    p.grad = torch.full((3, 2), 1e160, dtype=torch.float64)  # squares: Inf even in double
    _assert_refused([p], opt, ValueError, "too large")
    p.grad = torch.ones(3, 2, dtype=torch.float64)
    opt.step()


# ------------------------------------------------------- item 3: read before any commit
def test_step_counter_at_int64_max_is_refused() -> None:
    params, opt = _make()
    _set_grads(params, 1)
    opt.step()
    opt.state[params[0]]["step"].fill_(2**63 - 1)  # as loaded from a corrupted checkpoint
    _set_grads(params, 2)
    _assert_refused(params, opt, ValueError, "int64")


@pytest.mark.parametrize("key", ["dampening", "beta3", "lr", "start_preconditioning_step"])
def test_deleted_key_on_root_step_is_refused(key: str) -> None:
    params, opt = _make()
    _set_grads(params, 1)
    opt.step()
    del opt.param_groups[0][key]
    _set_grads(params, 2)
    _assert_refused(params, opt, KeyError, key)


@pytest.mark.parametrize("key,value", [("lr", "0.1"), ("beta3", "x"), ("dampening", None)])
def test_bad_type_on_root_step_is_refused(key: str, value) -> None:
    params, opt = _make()
    _set_grads(params, 1)
    opt.step()
    opt.param_groups[0][key] = value
    _set_grads(params, 2)
    _assert_refused(params, opt, TypeError, key)


# --------------------------------------------------- item 4: param_groups edits checked
@pytest.mark.parametrize(
    "key,value",
    [
        ("lr", -1.0), ("lr", float("nan")), ("lr", float("inf")), ("lr", None), ("lr", 1e300),
        ("betas", (1.5, 0.95)), ("betas", (-0.1, 0.95)), ("betas", (float("nan"), 0.95)),
        ("beta3", 2.0), ("momentum", 1.5), ("momentum", float("nan")), ("dampening", 1.0),
        ("weight_decay", -1.0), ("weight_decay", float("inf")), ("weight_decay", float("nan")),
        ("precondition_frequency", 0), ("start_preconditioning_step", -5),
        ("betas", (0.9,)), ("use_nesterov", True) and ("momentum", -0.5),
    ],
)
def test_invalid_edit_between_steps_is_refused(key: str, value) -> None:
    params, opt = _make()
    _set_grads(params, 1)
    opt.step()
    opt.param_groups[0][key] = value
    _set_grads(params, 2)
    _assert_refused(params, opt, (ValueError, TypeError), _MESSAGE_NAMES.get(key, key.split("_")[0]))


# The reference's verbatim messages name some values in words, not by their key.
_MESSAGE_NAMES = {"lr": "learning rate|lr", "dampening": "damping|dampening", "betas": "beta|betas", "weight_decay": "weight decay|weight_decay",
                  "precondition_frequency": "precondition_frequency|precondition frequency",
                  "start_preconditioning_step": "start_preconditioning_step|start preconditioning step"}


@pytest.mark.parametrize(
    "key,value",
    [
        ("epsilon", 1e-6), ("betas", (0.9, 0.5)), ("max_preconditioner_dim", 8),
        ("root_inv_config", CoupledNewtonConfig()), ("inv_root_override", 2),
        ("exponent_multiplier", 0.5), ("precision_config", PrecisionConfig(factor_matrix_dtype=torch.float64)),
        ("grafting_config", AdaGradGraftingConfig()),
    ],
)
def test_change_of_construction_time_key_is_refused(key: str, value) -> None:
    params, opt = _make()
    _set_grads(params, 1)
    opt.step()
    old = opt.param_groups[0][key]
    opt.param_groups[0][key] = value
    _set_grads(params, 2)
    label = "betas\\[1\\]" if key == "betas" else key
    _assert_refused(params, opt, ValueError, f"{label} was changed.*only at construction")
    opt.param_groups[0][key] = old  # restored: training continues
    _continue(params, opt)


def test_construction_time_key_from_loaded_checkpoint_is_refused() -> None:
    params, opt = _make()
    _set_grads(params, 1)
    opt.step()
    saved = opt.state_dict()
    params2, opt2 = _make(epsilon=1e-6)
    opt2.load_state_dict(saved)  # the checkpoint's epsilon replaces the constructed one
    _set_grads(params2, 2)
    _assert_refused(params2, opt2, ValueError, "epsilon was changed")


def test_valid_edits_are_honoured() -> None:
    params, opt = _make()
    _set_grads(params, 1)
    opt.step()
    opt.param_groups[0]["lr"] = 0.0  # an LR scheduler's edit; lr 0 leaves parameters as they are
    opt.param_groups[0]["weight_decay"] = 0.0
    before = [p.detach().clone() for p in params]
    _set_grads(params, 2)
    opt.step()
    for a, b in zip(before, params):
        assert torch.equal(a, b)
    opt.param_groups[0]["lr"] = 0.05
    opt.param_groups[0]["momentum"] = 0.3
    _continue(params, opt)


# ------------------------------------------------------------- item 6: refused inputs
@pytest.mark.parametrize("shape", [(5,), (1, 5), (6, 1), ()])
def test_broadcastable_gradient_of_wrong_shape_is_refused(shape) -> None:
    params, opt = _make()
    _set_grads(params, 1)
    params[0].grad.data = torch.ones(shape)  # .data skips autograd's shape check
    _assert_refused(params, opt, ValueError, r"parameter 0 of param group 0.*shape")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_real_gradient_dtype_is_refused(dtype) -> None:
    params, opt = _make()
    _set_grads(params, 1)
    params[1].grad_dtype = None  # lets autograd store a gradient of another dtype
    params[1].grad = torch.ones(params[1].shape, dtype=dtype)
    _assert_refused(params, opt, TypeError, rf"parameter 1 of param group 0.*{dtype}")


def test_complex_parameter_is_refused() -> None:
    with pytest.raises(TypeError, match="complex"):
        DistributedShampoo([torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))])


def test_parameter_listed_twice_is_refused() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about duplicates before we refuse
        with pytest.raises(ValueError, match="listed only once"):
            DistributedShampoo([p, p])


def test_parameter_appended_after_construction_is_refused() -> None:
    params, opt = _make()
    extra = torch.nn.Parameter(torch.ones(3))
    opt.param_groups[0]["params"].append(extra)
    _set_grads(params, 1)
    extra.grad = torch.ones(3)
    _assert_refused(params, opt, ValueError, "'params' list was changed")
    opt.param_groups[0]["params"].pop()
    _continue(params, opt)
