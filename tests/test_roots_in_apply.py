"""Root steps without staging (issue 11 item 1; distributed_shampoo/utils/shampoo_roots_in_apply.py).

With use_protected_eigh=True and the eigen method, a root step that provably cannot raise
computes its roots in apply(), chunk by chunk, and stages nothing. Checked here: the bits are
those of the staged root step (use_protected_eigh=False runs the staged path; its numerics
are checked against the oracles elsewhere), for the default and the staggered schedule,
float32 and float64, low-precision root storage; the proof's refusals (an epsilon whose power
overflows, a corrupted state) take the staged path; and the peak of torch allocations during
a root step stays below one buffer of the packed factors' size, which the staged path needs
twice (measured with torch.profiler's memory events, the allocator's running total)."""

import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_atomicity import _snapshot, assert_bitwise_equal  # noqa: E402

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import AdamGraftingConfig, PrecisionConfig, StaggeredRootScheduleConfig
from distributed_shampoo.utils import shampoo_roots_in_apply
from distributed_shampoo.utils.shampoo_group_engine import ShampooGroupEngine


def model_and_batches(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6)).to(dtype)
    return model, [torch.randn(8, 12, dtype=dtype) for _ in range(7)]


FLOAT64 = PrecisionConfig(**{f: torch.float64 for f in (
    "computation_dtype", "factor_matrix_dtype", "inv_factor_matrix_dtype", "filtered_grad_dtype",
    "momentum_dtype", "grafting_state_dtype")})


@contextlib.contextmanager
def unstaged_root_steps() -> Iterator[list[bool]]:
    """Per root step taken inside, whether it ran unstaged (the plan prepare() made)."""
    seen: list[bool] = []
    original = ShampooGroupEngine._prepare_live

    def recording(self: Any, group: Any, grads: Any) -> Any:
        plan = original(self, group, grads)
        if plan.root_step:
            seen.append(plan.roots_in_apply)
        return plan

    ShampooGroupEngine._prepare_live = recording
    try:
        yield seen
    finally:
        ShampooGroupEngine._prepare_live = original


def train(protected: bool, staggered: bool = False, dtype: torch.dtype = torch.float32, **kwargs: Any) -> tuple:
    model, batches = model_and_batches(dtype=dtype)
    if dtype == torch.float64:
        kwargs.setdefault("precision_config", FLOAT64)
    optimizer = DistributedShampoo(
        model.parameters(), lr=0.05, betas=(0.9, 0.999), epsilon=kwargs.pop("epsilon", 1e-10), momentum=0.3,
        weight_decay=1e-3, max_preconditioner_dim=8, precondition_frequency=3, start_preconditioning_step=3,
        grafting_config=kwargs.pop("grafting_config", AdamGraftingConfig(beta2=0.999, epsilon=1e-8)),
        use_protected_eigh=protected,
        root_schedule_config=StaggeredRootScheduleConfig() if staggered else None, **kwargs,
    )
    with unstaged_root_steps() as unstaged:
        for x in batches:
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    return _snapshot(list(model.parameters()), optimizer), unstaged


@pytest.mark.parametrize("staggered", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unstaged_root_steps_equal_the_staged_ones_bitwise(staggered: bool, dtype: torch.dtype) -> None:
    unstaged, proofs = train(True, staggered, dtype)
    staged, staged_proofs = train(False, staggered, dtype)
    # every root step took the unstaged path in one run and the staged path in the other
    assert proofs and all(proofs) and staged_proofs and not any(staged_proofs), (proofs, staged_proofs)
    assert_bitwise_equal(unstaged, staged, "unstaged vs staged")


def test_low_precision_roots_unstaged_equal_staged_bitwise() -> None:
    precision = PrecisionConfig(inv_factor_matrix_dtype=torch.bfloat16)
    unstaged, proofs = train(True, precision_config=precision)
    staged, staged_proofs = train(False, precision_config=precision)
    assert proofs and all(proofs) and not any(staged_proofs)
    assert_bitwise_equal(unstaged, staged, "bf16 roots")


def test_an_epsilon_whose_power_overflows_takes_the_staged_path() -> None:
    # float32 epsilon 1e-40 (subnormal) to the power -1 (inv_root_override=1) is 1e40 > 3.4e38:
    # the proof refuses, and the staged root step raises as the reference does, unchanged
    with pytest.raises(ValueError, match="Encountered nan or inf values in inverse factor matrix"):
        train(True, epsilon=1e-40, inv_root_override=1)
    # float64 holds 1e40: the proof goes through
    _, proofs = train(True, dtype=torch.float64, epsilon=1e-40, inv_root_override=1)
    assert proofs and all(proofs)


def test_a_corrupted_factor_is_found_and_the_step_raises_unchanged() -> None:
    model, batches = model_and_batches()
    optimizer = DistributedShampoo(model.parameters(), lr=0.05, max_preconditioner_dim=8,
                                   precondition_frequency=2, start_preconditioning_step=2)
    for x in batches[:3]:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    engine = optimizer._engines[0]
    # an off-diagonal entry (the trace-based overflow proof cannot see it), written through
    # torch: the factors' version changes, so the next root step checks them all again
    engine.factors[1] = float("inf")
    assert not shampoo_roots_in_apply.factors_known_sound(engine)
    before = [p.detach().clone() for p in model.parameters()], engine.inv_factors.clone()
    optimizer.zero_grad()
    model(batches[3]).square().mean().backward()
    with pytest.raises(ValueError, match="(?i)encountered inf values in bias-corrected factor matrix"):
        optimizer.step()
    assert_bitwise_equal([p.detach() for p in model.parameters()], before[0], "params")
    assert_bitwise_equal(engine.inv_factors, before[1], "roots")


def torch_peak_bytes(step: Any) -> int:
    """Peak of torch's allocated CPU bytes during step(), above the level at its start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = [e["args"] for e in json.loads(path.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


@pytest.mark.parametrize("protected", [True, False])
def test_root_step_peak_is_bounded_by_a_chunk_unless_staged(protected: bool) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one block per chunk
    # 256 x 256 blocks: one block per chunk (shampoo_packed_chunks.MIN_CHUNK_ELEMENTS)
    model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(12)])
    optimizer = DistributedShampoo(model.parameters(), lr=0.01, max_preconditioner_dim=256,
                                   precondition_frequency=2, start_preconditioning_step=2,
                                   use_protected_eigh=protected)
    x = torch.randn(4, 256)

    def step() -> None:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    step()
    optimizer.zero_grad()
    model(x).square().mean().backward()
    peak = torch_peak_bytes(optimizer.step)  # step 2: every root
    packed_bytes = optimizer._engines[0].packing.numel * 4
    if protected:
        assert peak < packed_bytes, (peak, packed_bytes)  # chunk scratch only (12 chunks)
    else:
        assert peak >= 2 * packed_bytes, (peak, packed_bytes)  # new factors and roots staged


@pytest.mark.parametrize("staggered", [False, True])
@pytest.mark.parametrize("qr", [False, True])
def test_soap_unstaged_root_steps_equal_the_staged_ones_bitwise(staggered: bool, qr: bool) -> None:
    """Eigenvalue-corrected Shampoo: the eigenbases computed in the pipeline and committed
    whole, per chunk (due factors: one copy each), equal the staged eigenbasis steps."""
    from distributed_shampoo.shampoo_types import DefaultEigenvalueCorrectedShampooConfig, DefaultSOAPConfig

    config = DefaultSOAPConfig if qr else DefaultEigenvalueCorrectedShampooConfig
    runs = [train(protected, staggered, grafting_config=None, preconditioner_config=config)
            for protected in (True, False)]
    assert runs[0][1] and all(runs[0][1]) and not any(runs[1][1]), (runs[0][1], runs[1][1])
    assert_bitwise_equal(runs[0][0], runs[1][0], "SOAP unstaged vs staged")


def test_soap_root_step_peak_is_bounded_by_a_chunk() -> None:
    from distributed_shampoo.shampoo_types import DefaultSOAPConfig

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(12)])
    optimizer = DistributedShampoo(model.parameters(), lr=0.01, max_preconditioner_dim=256,
                                   precondition_frequency=2, start_preconditioning_step=2,
                                   grafting_config=None, preconditioner_config=DefaultSOAPConfig)
    x = torch.randn(4, 256)
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    model(x).square().mean().backward()
    peak = torch_peak_bytes(optimizer.step)  # step 2: every eigenbasis
    bases_bytes = optimizer._engines[0].bases.numel() * 4
    assert peak < bases_bytes / 2, (peak, bases_bytes)  # staged: the whole bases once more
