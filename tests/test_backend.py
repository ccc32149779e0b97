"""_backend and the binding refuse bad arguments with TypeError/ValueError naming the
argument (dtype, device, layout, grad tracking, sizes against the block table, overlaps,
read-only outputs), never crash, and borrow DLPack tensors without leaking them."""

import sys

import numpy as np
import pytest
import torch

from block_tables import make_layout
from distributed_shampoo import _backend as B


class Exporter:
    """Not a torch/NumPy object: hands its tensor's DLPack capsule straight to the binding,
    so the checks of the C side are exercised without the Python pre-checks."""

    def __init__(self, t, legacy=False):
        self.t, self.legacy, self.dtype = t, legacy, None

    def __dlpack__(self, **kwargs):
        if self.legacy and kwargs:
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        return self.t.__dlpack__(**kwargs)


def _setup(dtype=torch.float64):
    lay = make_layout([(5, 3), (4,), ()], max_dim=2)
    rng = np.random.default_rng(0)
    t = lambda n: torch.from_numpy(rng.standard_normal(n)).to(dtype)  # noqa: E731
    return dict(
        out=torch.zeros(lay.block_numel, dtype=dtype),
        grads=t(lay.block_numel),
        inv=t(lay.factor_numel),
        table=torch.from_numpy(lay.table),
        active=torch.ones(len(lay.blocks), dtype=torch.bool),
    ), lay


def _precondition(a):
    B.precondition(a["out"], a["grads"], a["inv"], a["table"], a["active"])


def test_good_call_works():
    a, _ = _setup()
    _precondition(a)


@pytest.mark.parametrize(
    "arg, value, exc, pattern",
    [
        ("grads", torch.zeros(20, dtype=torch.float16), TypeError, "grads.*float16"),
        ("out", torch.zeros(20, dtype=torch.float16), TypeError, "float32.*float64"),
        ("grads", torch.zeros(20, dtype=torch.float32), TypeError, "grads.*float32"),
        ("inv", np.zeros(100, np.float32), TypeError, "inv_roots"),
        ("table", torch.zeros(9, 23, dtype=torch.int32), TypeError, "table.*int32"),
        ("table", torch.zeros(9, 22, dtype=torch.int64), ValueError, "table.*shape"),
        ("active", torch.ones(9, dtype=torch.float32), TypeError, "active.*uint8 or bool"),
        ("active", torch.ones(8, dtype=torch.uint8), ValueError, "active.*8 elements"),
        ("grads", torch.zeros(19, dtype=torch.float64), ValueError, "grads.*too small"),
        ("inv", torch.zeros(10, dtype=torch.float64), ValueError, "inv_roots.*too small"),
        ("grads", torch.zeros(40, dtype=torch.float64)[::2], ValueError, "grads.*contiguous"),
        ("grads", np.zeros(40)[::2], ValueError, "grads.*contiguous"),
        ("grads", torch.zeros(20, dtype=torch.float64, requires_grad=True), TypeError,
         "grads.*requires grad"),
        ("grads", torch.zeros(20, dtype=torch.float64, device="meta"), TypeError,
         "grads.*device meta"),
        ("grads", [0.0] * 14, TypeError, "grads"),
        ("grads", None, TypeError, "grads.*None"),
        ("out", np.zeros(20), None, None),  # NumPy arrays are accepted
    ],
)
def test_bad_argument_is_refused_with_its_name(arg, value, exc, pattern):
    a, _ = _setup()
    a[arg] = value
    if exc is None:
        _precondition(a)
        return
    with pytest.raises(exc, match=pattern):
        _precondition(a)


@pytest.mark.parametrize(
    "arg, value, exc, pattern",
    [
        ("grads", torch.zeros(40, dtype=torch.float64)[::2], ValueError, "grads.*contiguous"),
        ("grads", torch.zeros(20, dtype=torch.float16), TypeError, "grads.*float16"),
        ("table", torch.zeros(9, 23, dtype=torch.float64), TypeError, "table.*float64"),
        ("grads", torch.zeros(20, dtype=torch.float64, requires_grad=True), TypeError,
         "grads.*require"),
    ],
)
def test_binding_checks_without_python_prechecks(arg, value, exc, pattern):
    a, _ = _setup()
    a["out"] = Exporter(a["out"]) if arg != "out" else a["out"]
    a["out"].dtype = torch.float64  # picks the float64 entry point
    a[arg] = Exporter(value)
    with pytest.raises(exc, match=pattern):
        _precondition(a)


def test_bad_table_rows_raise_never_crash():
    a, lay = _setup()
    for field, value in [(B.BF_ORDER, 9), (B.BF_NUMEL, 3), (B.BF_BLOCK_OFFSET, 10 ** 12),
                         (B.BF_FACTOR_OFFSET, -1), (B.BF_DIMS, 1 << 40), (B.BF_STRIDES, (1 << 63) - 1)]:
        bad = a["table"].clone()
        bad[1, field] = value
        with pytest.raises(ValueError, match="table"):
            B.precondition(a["out"], a["grads"], a["inv"], bad, a["active"])


def test_overlap_and_read_only_outputs_are_refused():
    a, lay = _setup()
    with pytest.raises(ValueError, match="overlap"):
        B.precondition(a["grads"], a["grads"], a["inv"], a["table"], a["active"])
    big = torch.zeros(lay.block_numel + 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="overlap"):
        B.precondition(big[3:], big[:-3], a["inv"], a["table"], a["active"])
    ro = np.zeros(lay.block_numel)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out.*read-only"):
        B.precondition(ro, a["grads"], a["inv"], a["table"], a["active"])
    # factor_update may run in place, but not on partially overlapping buffers
    f = torch.zeros(lay.factor_numel + 1, dtype=torch.float64)
    B.factor_update(f[:-1], f[:-1], a["grads"], a["table"], a["active"], 1.0)
    with pytest.raises(ValueError, match="overlap"):
        B.factor_update(f[1:], f[:-1], a["grads"], a["table"], a["active"], 1.0)


def test_companion_arguments_and_enums():
    a, lay = _setup()
    flat = torch.zeros(lay.param_numel, dtype=torch.float64)
    common = dict(graft="none", grafting_phase=False, grafting_bias_correction=1.0,
                  grafting_epsilon=1e-8, decoupled_weight_decay=0.0, momentum=0.0,
                  dampening=0.0, nesterov=False, lr=0.1)
    args = (flat, a["grads"], a["out"], None, None, None, a["table"], a["active"])
    B.finish(*args, **common)
    with pytest.raises(ValueError, match="momentum_state"):
        B.finish(*args, **{**common, "momentum": 0.9})
    with pytest.raises(ValueError, match="param_blocks"):
        B.finish(*args, **{**common, "decoupled_weight_decay": 0.1})
    with pytest.raises(ValueError, match="grafting_state"):
        B.finish(*args, **{**common, "graft": "diagonal"})
    with pytest.raises(ValueError, match="grafting_phase"):
        B.finish(*args, **{**common, "grafting_phase": True})
    with pytest.raises(ValueError, match="graft"):
        B.finish(*args, **{**common, "graft": "adam"})
    with pytest.raises(ValueError, match="filtered_grad"):
        B.moments(a["grads"], None, None, a["table"], a["active"], update_grafting_state=False,
                  grafting_beta2=1.0, beta1=0.9, beta3=0.9, bias_correction1=1.0)
    with pytest.raises(ValueError, match="grafting_state"):
        B.moments(a["grads"], None, None, a["table"], a["active"], update_grafting_state=True,
                  grafting_beta2=1.0, beta1=0.0, beta3=0.0, bias_correction1=1.0)
    factors = torch.zeros(lay.factor_numel, dtype=torch.float64)
    kw = dict(epsilon=1e-12, exponent_multiplier=1.0, bias_correction=1.0,
              make_positive_semidefinite=True, retry_double_precision=True, max_iterations=10,
              tolerance=0.0, rel_epsilon=0.0, order=3,
              is_diagonal=torch.zeros(lay.factor_count, dtype=torch.bool))
    status = torch.zeros(lay.factor_count, dtype=torch.int32)
    with pytest.raises(ValueError, match="method"):
        B.root_inverse(factors.clone(), factors, a["table"], a["active"], method="qr",
                       status_out=status, **kw)
    with pytest.raises(TypeError, match="status_out.*int64"):
        B.root_inverse(factors.clone(), factors, a["table"], a["active"], method="eigen",
                       status_out=status.long(), **kw)
    with pytest.raises(ValueError, match="status_out.*too small"):
        B.root_inverse(factors.clone(), factors, a["table"], a["active"], method="eigen",
                       status_out=status[:-1], **kw)


def test_legacy_capsules_offsets_and_zero_sized_buffers():
    a, lay = _setup()
    _precondition(a)
    want = a["out"].clone()
    out = torch.zeros(lay.block_numel + 5, dtype=torch.float64)
    legacy = Exporter(out[5:], legacy=True)  # unversioned "dltensor", data at an offset
    legacy.dtype = torch.float64
    B.precondition(legacy, Exporter(a["grads"], legacy=True), a["inv"], a["table"],
                   a["active"])
    assert torch.equal(out[5:], want) and torch.equal(out[:5], torch.zeros(5, dtype=torch.float64))
    empty = make_layout([(0, 3)], max_dim=2)
    e = torch.empty(0, dtype=torch.float64)
    B.precondition(e, torch.empty(0, dtype=torch.float64),
                   torch.zeros(empty.factor_numel, dtype=torch.float64),
                   torch.from_numpy(empty.table), torch.ones(len(empty.blocks), dtype=torch.bool))
    none = np.zeros((0, B.BF_COUNT), np.int64)
    B.precondition(e, e.clone(), e.clone(), none, np.zeros(0, np.uint8))


def test_dlpack_borrow_releases_every_reference():
    a, _ = _setup()
    before = {k: sys.getrefcount(v) for k, v in a.items()}
    for _ in range(50):
        _precondition(a)
        with pytest.raises(ValueError):
            B.precondition(a["out"], a["grads"][:-1], a["inv"], a["table"], a["active"])
    assert {k: sys.getrefcount(v) for k, v in a.items()} == before
    arr = np.zeros(20)
    n = sys.getrefcount(arr)
    for _ in range(20):
        B.precondition(arr, a["grads"], a["inv"], a["table"], a["active"])
    assert sys.getrefcount(arr) == n


def test_check_device_supported():
    B.check_device_supported(torch.device("cpu"), "params")
    with pytest.raises(TypeError, match="params.*meta"):
        B.check_device_supported(torch.device("meta"), "params")
