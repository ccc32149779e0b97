"""DistributedShampoo on CUDA parameters (the CUDA kernels) against the same optimizer on CPU
parameters (the C kernels, pinned to tests/oracle.py by tests/test_optimizer_oracle.py), and
the CUDA-specific contract of the step:

  * the configuration matrix of tests/test_optimizer_oracle.py (its CASES, eigen root configs
    only: the CUDA backend has no Newton / higher-order roots), float32, float64 and
    low-precision parameters, every step: parameters, every state tensor, step counters;
  * a step that computes no inverse root does not synchronise with the host;
  * a NaN/Inf gradient on such a step does not raise there (that would need a sync); that
    step and later ones change nothing, a later step() raises ValueError (at the latest the
    next inverse-root step), and parameters and state are bitwise as before the bad step;
  * a NaN/Inf gradient on an inverse-root step, or a NaN/Inf factor, raises at once and
    changes nothing, as on CPU;
  * Newton / higher-order root configs are refused for CUDA parameters at construction.

Tolerance of CUDA against CPU: tests/test_optimizer_oracle.py holds the CPU product to its
oracle within tolerance(case) (and inv_rtol for inverse factors); the CUDA product must meet
the same bound, so the two may differ by twice it (triangle inequality). This is the same
kind of check as tests/test_ddp.py's DDP-against-serial comparison.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
import oracle as O
import test_optimizer_oracle as core
import torch
from test_atomicity import assert_bitwise_equal
from torch import nn

from distributed_shampoo import _backend
from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.matrix_functions_types import (
    CoupledHigherOrderConfig,
    CoupledNewtonConfig,
    EigenConfig,
)
from distributed_shampoo.shampoo_types import AdamGraftingConfig


def _cuda_skip_reason() -> str | None:
    if not hasattr(_backend, "cuda_available"):
        return "this build of distributed_shampoo._backend has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if not _backend.cuda_available():
        return "the CUDA kernels (distributed_shampoo._C_cuda) are not built"
    return None


pytestmark = pytest.mark.skipif(_cuda_skip_reason() is not None, reason=str(_cuda_skip_reason()))

DEVICE = torch.device("cuda")


# --------------------------------------------------------------------------------------------
# CUDA against CPU over the core configuration matrix.
# --------------------------------------------------------------------------------------------


def _uses_eigen_only(case: core.Case) -> bool:
    configs = [case.kwargs.get("root_inv_config")]
    configs += [overrides.get("root_inv_config") for _, overrides in case.groups or []]
    return all(c is None or type(c) is EigenConfig for c in configs)


EIGEN_CASES = [c for c in core.CASES if _uses_eigen_only(c)]


def _build(case: core.Case, device: torch.device | str):
    """The optimizer of `case` on `device`, and its parameters in the optimizer's order."""
    dtype = core.DTYPES[case.dtype]
    tensors = [nn.Parameter(p.clone().to(device)) for p in core.initial_params(case, dtype)]
    kwargs = dict(case.kwargs, **case.product_only)
    if case.dtype == "f64":
        kwargs["precision_config"] = core.F64_PRECISION
    optimizer = DistributedShampoo(core.group_specs(case, tensors), **kwargs)
    return optimizer, [tensors[i] for i in core.param_order(case)]


def _flat_state(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state dict, by path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        out.update(_flat_state(value, f"{prefix}/{key}"))
    return out


def _compare_states(gpu_opt, cpu_opt, gpu_params, cpu_params, rtol, inv_rtol, when):
    for i, (gp, cp) in enumerate(zip(gpu_params, cpu_params)):
        gpu_state = _flat_state(core.block_state(gpu_opt, gp))
        cpu_state = _flat_state(core.block_state(cpu_opt, cp))
        assert sorted(gpu_state) == sorted(cpu_state), f"{when}: param {i} state keys"
        for path, expected in cpu_state.items():
            actual = gpu_state[path]
            where = f"{when}: param {i} {path}"
            assert actual.device.type == DEVICE.type, f"{where}: state not on the GPU"
            assert actual.dtype == expected.dtype, where
            if expected.dtype == torch.bool:
                assert torch.equal(actual.cpu(), expected), where
            else:
                tol = inv_rtol if "inv_factor_matrices" in path else rtol
                core.assert_close_scaled(actual.cpu(), expected, tol, where)


@pytest.mark.parametrize("case", EIGEN_CASES, ids=[c.id for c in EIGEN_CASES])
def test_cuda_matches_cpu(case: core.Case) -> None:
    dtype = core.DTYPES[case.dtype]
    order = core.param_order(case)
    cpu_opt, cpu_params = _build(case, "cpu")
    gpu_opt, gpu_params = _build(case, DEVICE)
    rtol = 2 * core.tolerance(case)
    inv_rtol = 2 * (case.inv_rtol or (1e-7 if case.dtype == "f64" else 1e-3))
    for t, grads in enumerate(core.draw_gradients(case, dtype), start=1):
        flat_grads = [grads[i] for i in order]
        for params, device in ((cpu_params, "cpu"), (gpu_params, DEVICE)):
            for p, g in zip(params, flat_grads):
                p.grad = None if g is None else g.clone().to(device)
        cpu_opt.step()
        gpu_opt.step()
        for i, (gp, cp) in zip(order, zip(gpu_params, cpu_params)):
            assert gp.device.type == DEVICE.type and gp.dtype == cp.dtype
            if case.dtype in ("bf16", "f16"):
                torch.testing.assert_close(gp.detach().cpu().double(), cp.detach().double(),
                                           rtol=rtol, atol=rtol * 0.1,
                                           msg=f"step {t} param {i}: low-precision parameters")
            else:
                core.assert_close_scaled(gp.detach().cpu(), cp, rtol, f"step {t} param {i}")
        assert core.step_counters(case, gpu_opt, gpu_params) == core.step_counters(
            case, cpu_opt, cpu_params
        ), f"step {t}: step counters"
        _compare_states(gpu_opt, cpu_opt, gpu_params, cpu_params, rtol, inv_rtol,
                        f"step {t}")


# --------------------------------------------------------------------------------------------
# No host synchronisation in a step without an inverse root.
# --------------------------------------------------------------------------------------------

FREQUENCY = 4  # inverse roots at steps 4, 8, ...; steps before 4 are grafting steps


def _model(dtype: torch.dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 65), nn.Tanh(), nn.Linear(65, 17), nn.Tanh(),
                          nn.Linear(17, 1)).to(DEVICE, dtype)
    return model, torch.randn(64, 33, device=DEVICE, dtype=dtype)


def _model_optimizer(model: nn.Module, dtype: torch.dtype) -> DistributedShampoo:
    # Every phase in play: decoupled weight decay (parameters gathered), momentum, filtered
    # gradient, Adam grafting, several blocks per parameter (max dim 32), equal-shape groups.
    kwargs: dict[str, Any] = {
        "lr": 0.01, "betas": (0.9, 0.999), "epsilon": 1e-6, "momentum": 0.5, "weight_decay": 0.01,
        "max_preconditioner_dim": 32, "precondition_frequency": FREQUENCY,
        "start_preconditioning_step": FREQUENCY, "grafting_config": AdamGraftingConfig(),
    }
    if dtype == torch.float64:
        kwargs["precision_config"] = core.F64_PRECISION
    return DistributedShampoo(model.parameters(), **kwargs)


class _NoSync:
    """torch's sync debug mode as errors: any synchronising torch call (.item(), .cpu(), a
    blocking copy, nonzero, ...) raises. It cannot see a cudaStreamSynchronize made inside
    the extension itself; the queued-kernel check below covers that."""

    def __enter__(self) -> None:
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_steps_without_root_inverse_do_not_synchronise(dtype: torch.dtype) -> None:
    model, x = _model(dtype)
    optimizer = _model_optimizer(model, dtype)

    def train_step() -> None:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    train_step()  # t = 1: lazy set-up (active pattern, scratch buffers, library handles)
    torch.cuda.synchronize()
    for _ in range(2):  # t = 2, 3: grafting steps
        with _NoSync():
            train_step()
    train_step()  # t = 4: inverse roots (may synchronise)
    train_step()  # t = 5: first preconditioned step after it (one-time set-up allowed)
    torch.cuda.synchronize()
    for _ in range(2):  # t = 6, 7: preconditioned steps
        with _NoSync():
            train_step()
    torch.cuda.synchronize()
    assert int(optimizer.state[next(model.parameters())]["step"]) == 7
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_step_returns_while_earlier_gpu_work_runs() -> None:
    """A kernel that spins for ~0.5 s is queued before a non-root step; a step that waited
    for the device (from torch or from inside the extension) would take that long."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        pytest.skip("torch.cuda._sleep is not available in this torch")
    model, x = _model(torch.float32)
    optimizer = _model_optimizer(model, torch.float32)
    model(x).square().mean().backward()
    for _ in range(FREQUENCY + 1):  # through the first inverse root and one step after it
        optimizer.step()
    # Calibrate the spin: cycles for about 0.5 s on this GPU.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    sleep(10**8)
    end.record()
    end.synchronize()
    cycles = int(10**8 * 500.0 / max(start.elapsed_time(end), 1e-3))
    torch.cuda.synchronize()
    sleep(cycles)
    begin = time.perf_counter()
    optimizer.step()  # t = FREQUENCY + 2: no inverse root
    host_seconds = time.perf_counter() - begin
    torch.cuda.synchronize()
    assert host_seconds < 0.25, f"step() took {host_seconds:.3f} s behind a 0.5 s kernel"


# --------------------------------------------------------------------------------------------
# Failures: NaN/Inf gradients and factors; nothing changes.
# --------------------------------------------------------------------------------------------

SHAPES = ((6, 5), (7,), ())


def _make(**overrides: Any):
    """As tests/test_atomicity.py's optimizer, on the GPU (float32)."""
    generator = torch.Generator().manual_seed(7)
    params = [nn.Parameter(torch.randn(s, generator=generator).to(DEVICE)) for s in SHAPES]
    kwargs: dict[str, Any] = {
        "lr": 0.1, "betas": (0.9, 0.95), "beta3": 0.8, "momentum": 0.5, "weight_decay": 0.01,
        "max_preconditioner_dim": 4, "grafting_config": AdamGraftingConfig(), "epsilon": 1e-3,
    }
    kwargs.update(overrides)
    return params, DistributedShampoo(params, **kwargs)


def _set_grads(params: list[nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(DEVICE)


def _snapshot(params, optimizer) -> dict[str, Any]:
    torch.cuda.synchronize()
    return {
        "params": [p.detach().clone() for p in params],
        "state": {i: copy.deepcopy(optimizer.state[p]) for i, p in enumerate(params)},
    }


def _assert_names_bad_gradient(error: pytest.ExceptionInfo, word: str) -> None:
    message = str(error.value)
    assert word in message.lower(), message
    # params[1] is (7,) -> blocks (4,), (3,): element 5 is in block_1 (the flag's block)
    assert "block_1" in message, f"must name block_1 of parameter 1: {message}"


NONFINITE = [(float("nan"), "nan"), (float("inf"), "inf")]


@pytest.mark.parametrize("value,word", NONFINITE)
def test_nonfinite_gradient_on_non_root_step_raises_later_and_changes_nothing(value, word):
    params, optimizer = _make(precondition_frequency=FREQUENCY,
                              start_preconditioning_step=FREQUENCY)
    for seed in range(1, FREQUENCY + 2):  # t = 1 .. 5: through the first inverse root
        _set_grads(params, seed)
        optimizer.step()
    before = _snapshot(params, optimizer)
    _set_grads(params, 100)
    params[1].grad[5] = value
    optimizer.step()  # t = 6, no inverse root: must not wait for the device to find out
    torch.cuda.synchronize()
    _set_grads(params, 101)
    with pytest.raises(ValueError) as error:
        optimizer.step()
    _assert_names_bad_gradient(error, word)
    assert_bitwise_equal(_snapshot(params, optimizer), before, "after the failure")


@pytest.mark.parametrize("value,word", NONFINITE)
def test_nonfinite_gradient_is_reported_by_the_next_root_step_at_the_latest(value, word):
    """Without a synchronize the report may come one or more steps later, but no later than
    the next inverse-root step; nothing changes in between."""
    params, optimizer = _make(precondition_frequency=FREQUENCY,
                              start_preconditioning_step=FREQUENCY)
    for seed in range(1, FREQUENCY + 1):  # t = 1 .. 4 (inverse root at 4)
        _set_grads(params, seed)
        optimizer.step()
    before = _snapshot(params, optimizer)
    _set_grads(params, 100)
    params[1].grad[5] = value
    error = None
    for call in range(FREQUENCY):  # t = 5 (bad), 6, 7, 8 (inverse root: must raise)
        try:
            optimizer.step()
        except ValueError as raised:
            error = raised
            break
        if call == 0:
            _set_grads(params, 101)  # the later steps' gradients are fine
    assert error is not None, "no ValueError by the next inverse-root step"
    assert word in str(error).lower() and "block_1" in str(error), str(error)
    assert_bitwise_equal(_snapshot(params, optimizer), before, "after the failure")


def test_training_continues_normally_after_a_reported_failure() -> None:
    """The failure flag is reset once reported: the next good step is the step the run that
    never failed would have taken."""
    runs = {}
    for failing in (False, True):
        params, optimizer = _make(precondition_frequency=FREQUENCY,
                                  start_preconditioning_step=FREQUENCY)
        for seed in range(1, FREQUENCY + 2):
            _set_grads(params, seed)
            optimizer.step()
        if failing:
            _set_grads(params, 100)
            params[0].grad[0, 0] = float("nan")
            optimizer.step()
            torch.cuda.synchronize()
            with pytest.raises(ValueError):
                optimizer.step()
        for seed in (101, 102, 103):  # t = 6, 7, 8 (an inverse root at 8)
            _set_grads(params, seed)
            optimizer.step()
        runs[failing] = _snapshot(params, optimizer)
    assert int(runs[True]["state"][0]["step"]) == FREQUENCY + 4
    # Close rather than bitwise: two runs on a GPU need not round alike (reduction order).
    for ok, failed in zip(runs[False]["params"], runs[True]["params"]):
        torch.testing.assert_close(failed, ok, rtol=1e-6, atol=1e-7)
    for i in runs[False]["state"]:
        ok, failed = _flat_state(runs[False]["state"][i]), _flat_state(runs[True]["state"][i])
        assert sorted(ok) == sorted(failed)
        for path in ok:
            torch.testing.assert_close(failed[path], ok[path], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, where=f"param {i} {path}": f"{where}: {m}")


@pytest.mark.parametrize("value,word", NONFINITE)
def test_nonfinite_gradient_on_root_step_raises_at_once(value, word):
    params, optimizer = _make(precondition_frequency=FREQUENCY,
                              start_preconditioning_step=FREQUENCY)
    for seed in range(1, FREQUENCY):  # t = 1 .. 3
        _set_grads(params, seed)
        optimizer.step()
    before = _snapshot(params, optimizer)
    _set_grads(params, 100)
    params[1].grad[5] = value
    with pytest.raises(ValueError) as error:
        optimizer.step()  # t = 4: inverse roots, which synchronise anyway
    _assert_names_bad_gradient(error, word)
    assert_bitwise_equal(_snapshot(params, optimizer), before, "after the failure")


@pytest.mark.parametrize("value,word", NONFINITE)
def test_nonfinite_factor_fails_the_root_step_and_changes_nothing(value, word):
    """A NaN/Inf planted in a factor matrix (a live view of the GPU state) makes the GPU root
    inverse report it: ValueError naming the factor, parameters and state unchanged."""
    params, optimizer = _make()  # an inverse root every step
    for seed in (1, 2):
        _set_grads(params, seed)
        optimizer.step()
    shampoo = optimizer.state[params[0]]["block_2"]["shampoo"]
    factor = shampoo["factor_matrices"][1]["quantized_values"]
    assert factor.device.type == DEVICE.type
    factor[O.packed_index(4, 1, 2)] = value  # packed; param 0 is (6, 5): blocks (4,4),(4,1),(2,4),(2,1); block_2 dim 1
    before = _snapshot(params, optimizer)
    _set_grads(params, 3)
    message = rf"(?i)encountered {word} values in bias-corrected factor matrix 0\.block_2\.1"
    with pytest.raises(ValueError, match=message):
        optimizer.step()
    assert_bitwise_equal(_snapshot(params, optimizer), before, "after the failure")


# --------------------------------------------------------------------------------------------
# Root configs without a CUDA implementation.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [CoupledNewtonConfig(), CoupledHigherOrderConfig()],
                         ids=["newton", "higher_order"])
def test_iterative_root_configs_are_refused_on_cuda(config) -> None:
    weight = nn.Parameter(torch.zeros(4, 3, device=DEVICE))
    bias = nn.Parameter(torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError):
        DistributedShampoo([weight, bias], root_inv_config=config)
    with pytest.raises(ValueError):  # as one param group's override
        DistributedShampoo([{"params": [weight]}, {"params": [bias], "root_inv_config": config}])
    DistributedShampoo([nn.Parameter(torch.zeros(4, 3))], root_inv_config=config)  # CPU: fine


@pytest.mark.parametrize("soap", [False, True])
@pytest.mark.parametrize("staggered", [False, True])
def test_unstaged_root_steps_equal_the_staged_ones_bitwise(staggered: bool, soap: bool) -> None:
    """shampoo_roots_in_apply.py on the GPU: a provably safe root step (use_protected_eigh)
    computes its roots (SOAP: eigenbases) in the pipeline, nothing staged; the bits are those
    of the staged path (use_protected_eigh=False), for the default and the staggered schedule."""
    from distributed_shampoo.shampoo_types import DefaultSOAPConfig, StaggeredRootScheduleConfig
    from test_roots_in_apply import unstaged_root_steps

    runs = []
    for protected in (True, False):
        extra: dict[str, Any] = dict(grafting_config=None, preconditioner_config=DefaultSOAPConfig) if soap else {}
        params, optimizer = _make(
            use_protected_eigh=protected, precondition_frequency=3, start_preconditioning_step=3,
            root_schedule_config=StaggeredRootScheduleConfig() if staggered else None, **extra,
        )
        with unstaged_root_steps() as proofs:
            for seed in range(7):
                _set_grads(params, seed)
                optimizer.step()
        runs.append(_snapshot(params, optimizer))
        # protected: every root step unstaged; unprotected: every one staged
        assert proofs and all(p == protected for p in proofs), proofs
    assert_bitwise_equal(runs[0], runs[1], "unstaged vs staged on CUDA")
