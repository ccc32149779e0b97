"""Checkpointing in one process (SPEC A.3.9, A.3.11, B §8): torch.distributed.checkpoint with
both APIs and ShampooLoadPlanner, atomic loads of bad checkpoints, and a training process
killed with SIGKILL that resumes from its last complete checkpoint.

(tests/test_checkpoint_distributed.py has DDP, FSDP, HSDP and FSDP2; tests/test_state_dict.py
the flat keys of SPEC §8.1 and torch.save round trips.)
"""

import copy
import itertools
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import AdamGraftingConfig, PrecisionConfig
from distributed_shampoo.utils.shampoo_dcp import ShampooLoadPlanner

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# Roots at steps 2, 4, 6, ...: a resumed run needs the restored step counter to keep them.
KWARGS: Dict[str, Any] = dict(
    lr=0.05, betas=(0.9, 0.99), epsilon=1e-4, momentum=0.5, weight_decay=0.01,
    max_preconditioner_dim=4, precondition_frequency=2, start_preconditioning_step=2,
    grafting_config=AdamGraftingConfig(beta2=0.99),
)


def make(
    two_groups: bool = False, extra_layer: bool = False, **overrides: Any
) -> Tuple[nn.Module, DistributedShampoo]:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)]
    model = nn.Sequential(*layers, *([nn.Linear(3, 2)] if extra_layer else []))
    params: Any = model.parameters()
    if two_groups:
        params = [
            {"params": list(model[0].parameters())},
            {"params": list(model[2].parameters()), "lr": 0.01},
        ]
    return model, DistributedShampoo(params, **{**KWARGS, **overrides})


def train(model: nn.Module, optimizer: DistributedShampoo, steps: range) -> None:
    """Gradients depend on the step number only: runs are reproducible across processes."""
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


def checkpoint_state(model: nn.Module, optimizer: DistributedShampoo) -> Dict[str, Any]:
    # distributed_state_dict() returns the live state: saving copies nothing.
    return {
        "model": model.state_dict(),
        "optim": optimizer.distributed_state_dict(key_to_param=model.named_parameters()),
    }


def save(model: nn.Module, optimizer: DistributedShampoo, path: str, legacy: bool = False) -> None:
    state = checkpoint_state(model, optimizer)
    if legacy:
        # The older API does not detect a missing process group: no_dist=True is "one process".
        writer = dcp.FileSystemWriter(path)
        dcp.save_state_dict(state_dict=state, storage_writer=writer, no_dist=True)
    else:
        dcp.save(state, checkpoint_id=path)


def load(
    model: nn.Module,
    optimizer: DistributedShampoo,
    path: str,
    legacy: bool = False,
    planner: bool = True,
) -> None:
    """The documented flow (README "Checkpointing"); planner=False shows why it has one."""
    state = checkpoint_state(model, optimizer)
    kwargs = dict(planner=ShampooLoadPlanner()) if planner else {}
    if legacy:
        reader = dcp.FileSystemReader(path)
        dcp.load_state_dict(state_dict=state, storage_reader=reader, no_dist=True, **kwargs)
    else:
        dcp.load(state, checkpoint_id=path, **kwargs)
    optimizer.load_distributed_state_dict(state["optim"], key_to_param=model.named_parameters())
    model.load_state_dict(state["model"])


def snapshot(model: nn.Module, optimizer: DistributedShampoo) -> Dict[str, Any]:
    state = optimizer.distributed_state_dict(
        key_to_param=model.named_parameters(), save_param_groups=False
    )
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return copy.deepcopy({"state": state["state"], "groups": groups})


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and (a.dtype, a.shape) == (b.dtype, b.shape)
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def params(model: nn.Module) -> List[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "legacy", [False, True], ids=["dcp.save/load", "save_state_dict/load_state_dict"]
)
def test_resume_is_bitwise(tmp_path: Path, legacy: bool) -> None:
    model, optimizer = make()
    train(model, optimizer, range(1, 4))
    at_checkpoint = snapshot(model, optimizer)
    save(model, optimizer, str(tmp_path), legacy)
    train(model, optimizer, range(4, 8))

    fresh_model, fresh_optimizer = make(lr=0.5)  # the checkpoint's lr must win
    load(fresh_model, fresh_optimizer, str(tmp_path), legacy)
    assert same(snapshot(fresh_model, fresh_optimizer), at_checkpoint)
    assert fresh_optimizer.param_groups[0]["lr"] == KWARGS["lr"]
    train(fresh_model, fresh_optimizer, range(4, 8))
    assert same(params(fresh_model), params(model))
    assert same(snapshot(fresh_model, fresh_optimizer), snapshot(model, optimizer))


def test_standard_state_dict_agrees_with_distributed_form() -> None:
    model, optimizer = make(two_groups=True)
    train(model, optimizer, range(1, 4))
    standard = optimizer.state_dict()
    names = [n for n, _ in model.named_parameters()]
    distributed = optimizer.distributed_state_dict(key_to_param=model.named_parameters())
    assert {names[i] for i in standard["state"]} == set(distributed["state"])
    for index, flat in standard["state"].items():
        for key, tensor in flat.items():
            # The same live tensor, so the two forms can never disagree.
            assert tensor.data_ptr() == distributed["state"][names[index]][key].data_ptr()


# ------------------------------------------------------------------------ bad checkpoints
NAN_KEY = '["block_0", "shampoo", "factor_matrices", 1, "quantized_values"]'
BAD = {
    # name: (how the checkpoint was written, the exception, what the message must say).
    # "load_momentum" is the momentum of the optimizer that loads it (else KWARGS').
    "missing key": (
        dict(momentum=0.0), KeyError, r'\["block_0", "momentum", "quantized_values"\] not found'
    ),
    "extra key": (dict(load_momentum=0.0), KeyError, r'Unexpected key \["block_0", "momentum"'),
    "shape": (
        dict(max_preconditioner_dim=8),
        (KeyError, ValueError),
        r'(?s)\["block_\d", "(shampoo|adagrad|momentum|filtered_grad)".*max_preconditioner_dim',
    ),
    "dtype": (
        dict(precision_config=PrecisionConfig(factor_matrix_dtype=torch.float64)),
        ValueError,
        r"(?s)Dtype mismatch.*factor_matrices.*float64",
    ),
    "unknown parameter": (
        dict(extra_layer=True), KeyError, r"Parameter key 3\.(weight|bias) not found"
    ),
    "param groups": (dict(two_groups=True), ValueError, r"Different param_groups count: 1 vs 2"),
    "nan": (dict(nan=True), ValueError, re.escape(NAN_KEY) + r" of parameter 0\.weight holds NaN"),
}


def write_bad(path: str, how: Dict[str, Any]) -> None:
    how = dict(how)
    how.pop("load_momentum", None)
    nan = how.pop("nan", False)
    model, optimizer = make(**how)
    train(model, optimizer, range(1, 4))
    state = copy.deepcopy(optimizer.distributed_state_dict(key_to_param=model.named_parameters()))
    if nan:
        state["state"]["0.weight"][NAN_KEY][1] = float("nan")  # packed: entry (0, 1)
    dcp.save({"model": model.state_dict(), "optim": state}, checkpoint_id=path)


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory) -> Dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (how, _, _) in BAD.items():
            write_bad(str(root / name.replace(" ", "-")), how)
    return {name: str(root / name.replace(" ", "-")) for name in BAD}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_checkpoint_is_a_clear_error_and_changes_nothing(
    bad_checkpoints: Dict[str, str], name: str
) -> None:
    how, error, pattern = BAD[name]
    momentum = how.get("load_momentum", KWARGS["momentum"])
    model, optimizer = make(momentum=momentum)
    train(model, optimizer, range(1, 4))
    before = snapshot(model, optimizer)
    with pytest.raises(error, match=pattern):
        load(model, optimizer, bad_checkpoints[name])
    assert same(snapshot(model, optimizer), before)
    # Still a working optimizer, and the model untouched too (the planner read the model's
    # tensors into new ones as well): the run goes on exactly as if nothing had been tried.
    reference_model, reference = make(momentum=momentum)
    train(reference_model, reference, range(1, 4))
    train(model, optimizer, range(4, 6))
    train(reference_model, reference, range(4, 6))
    assert same(params(model), params(reference_model))


def test_without_the_planner_a_bad_checkpoint_is_reported_as_not_atomic(
    bad_checkpoints: Dict[str, str],
) -> None:
    """Plain dcp.load reads into the live tensors of distributed_state_dict(): the NaN is in
    the optimizer before load_distributed_state_dict can look, and the error says so."""
    model, optimizer = make()
    train(model, optimizer, range(1, 4))
    with pytest.raises(ValueError, match=r"(?s)holds NaN.*NOT intact.*ShampooLoadPlanner"):
        load(model, optimizer, bad_checkpoints["nan"], planner=False)
    factors = optimizer.state[model[0].weight]["block_0"]["shampoo"]["factor_matrices"]
    assert torch.isnan(factors[1]["quantized_values"]).any()


def test_fresh_tensors_from_torch_load_are_atomic(tmp_path: Path) -> None:
    model, optimizer = make()
    train(model, optimizer, range(1, 4))
    state = copy.deepcopy(optimizer.distributed_state_dict(key_to_param=model.named_parameters()))
    key = next(k for k in state["state"]["2.bias"] if "filtered_grad" in k)
    state["state"]["2.bias"][key][0] = float("inf")
    torch.save(state, tmp_path / "optim.pt")
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"2\.bias holds NaN or Inf") as info:
        loaded = torch.load(tmp_path / "optim.pt", weights_only=False)
        optimizer.load_distributed_state_dict(loaded, key_to_param=model.named_parameters())
    assert "NOT intact" not in str(info.value)
    assert same(snapshot(model, optimizer), before)


# ------------------------------------------------------------------- killed mid-training
def train_and_checkpoint_forever(root: str) -> None:
    """Run in a subprocess by the test below: trains, checkpointing every 2 steps, forever."""
    warnings.simplefilter("ignore")
    model, optimizer = make()
    for step in itertools.count(1):
        train(model, optimizer, range(step, step + 1))
        if step % 2 == 0:
            save(model, optimizer, os.path.join(root, f"step-{step:06d}"))
        time.sleep(0.02)


def latest_complete_checkpoint(root: Path) -> Path:
    """DCP writes .metadata last (atomically, by rename): a directory without it is a
    checkpoint that was being written when the process died."""
    return max(d for d in root.iterdir() if (d / ".metadata").exists())


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    root.mkdir()
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import test_checkpoint; test_checkpoint.train_and_checkpoint_forever({str(root)!r})"
    )
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:  # a file, not a pipe: a full pipe would stall the child
        process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 180
        while not (root / "step-000004" / ".metadata").exists():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no second checkpoint"
            time.sleep(0.01)
        assert process.poll() is None  # still training: killed mid-run
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    checkpoint = latest_complete_checkpoint(root)
    step = int(checkpoint.name.split("-")[1])
    assert step >= 4
    model, optimizer = make()
    load(model, optimizer, str(checkpoint))
    assert int(optimizer.state[model[0].weight]["step"]) == step
    train(model, optimizer, range(step + 1, step + 5))

    reference_model, reference = make()
    train(reference_model, reference, range(1, step + 5))
    assert same(params(model), params(reference_model))
    assert same(snapshot(model, optimizer), snapshot(reference_model, reference))
