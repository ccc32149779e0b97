"""Checkpointing (SPEC B §8, A.3.9, A.3.11): state_dict() / load_state_dict() through
torch.save, distributed_state_dict() / load_distributed_state_dict() through torch.save and
through torch.distributed.checkpoint (single process); resuming is bitwise identical to the
uninterrupted run.  Plus the exact flat keys of SPEC §8.1's example and the load errors.
"""

import copy
import io
import logging
import re
import warnings
from itertools import chain
from typing import Any

import pytest
import torch
from torch import nn

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.matrix_functions_types import DefaultEigenConfig
from distributed_shampoo.shampoo_types import (
    AdaGradGraftingConfig,
    AdamGraftingConfig,
    PrecisionConfig,
)

CHECKPOINT_STEP = 4
TOTAL_STEPS = 8


class _Model(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(6, 5)  # a.weight (5, 6), a.bias (5,)
        self.b = nn.Linear(5, 3, bias=False)  # b.weight (3, 5)
        self.scale = nn.Parameter(torch.ones(()))


def _optimizer(model: _Model) -> DistributedShampoo:
    # Two groups with different hyperparameters; frequency 2 from step 3, so the schedule
    # depends on the restored step counter (roots at 3, 4, 6, 8); the checkpoint is taken after
    # roots were computed, so factors are dense and their diagonal flags are False (A.3.9).
    groups = [
        {"params": [model.a.weight, model.a.bias]},
        {"params": [model.b.weight, model.scale], "lr": 0.05, "momentum": 0.0},
    ]
    return DistributedShampoo(
        groups,
        lr=0.1,
        betas=(0.9, 0.95),
        beta3=0.7,
        momentum=0.5,
        weight_decay=0.01,
        max_preconditioner_dim=4,
        precondition_frequency=2,
        start_preconditioning_step=3,
        grafting_config=AdamGraftingConfig(),
        epsilon=1e-4,
    )


def _set_grads(model: _Model, step: int) -> None:
    generator = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    if step == 6:
        model.a.bias.grad = None  # a missing gradient after the resume point


def _run(model: _Model, optimizer: DistributedShampoo, steps: range) -> None:
    for step in steps:
        _set_grads(model, step)
        optimizer.step()


def _flat_state(model: _Model, optimizer: DistributedShampoo) -> dict[str, Any]:
    """name -> optimizer.state[param] deep copy, for bitwise comparison."""
    return {name: copy.deepcopy(optimizer.state[p]) for name, p in model.named_parameters()}


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where}: differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ: {set(a) ^ set(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _uninterrupted() -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    model = _Model(seed=0)
    optimizer = _optimizer(model)
    _run(model, optimizer, range(1, CHECKPOINT_STEP + 1))
    at_checkpoint = _flat_state(model, optimizer)
    _run(model, optimizer, range(CHECKPOINT_STEP + 1, TOTAL_STEPS + 1))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return params, _flat_state(model, optimizer), at_checkpoint


def _first_half() -> tuple[_Model, DistributedShampoo]:
    model = _Model(seed=0)
    optimizer = _optimizer(model)
    _run(model, optimizer, range(1, CHECKPOINT_STEP + 1))
    return model, optimizer


def _check_resumed(model: _Model, optimizer: DistributedShampoo) -> None:
    expected_params, expected_state, at_checkpoint = _uninterrupted()
    _assert_same(_flat_state(model, optimizer), at_checkpoint, "restored state")
    _run(model, optimizer, range(CHECKPOINT_STEP + 1, TOTAL_STEPS + 1))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), expected_params[name]), f"{name} differs after resuming"
    _assert_same(_flat_state(model, optimizer), expected_state, "final state")


def _diagonal_flags(state: dict[str, Any]) -> list[bool]:
    flags = []
    for key, block in state.items():
        if key.startswith("block_"):
            stored = block["shampoo"]["is_factor_matrices_diagonal"]
            values = stored.values() if isinstance(stored, dict) else stored
            flags += [bool(flag) for flag in values]
    return flags


def _expected_flags_at_checkpoint() -> list[bool]:
    """a.weight (5, 6) -> blocks (4,4), (4,2), (1,4), (1,2): every factor with d > 1 is dense
    (random gradients); the 1x1 factors have no off-diagonal entries, so they stay diagonal."""
    return [d == 1 for shape in ((4, 4), (4, 2), (1, 4), (1, 2)) for d in shape]


def test_checkpointed_state_has_dense_flags() -> None:
    """Sanity of the scenario: at the checkpoint the factors with d > 1 are non-diagonal."""
    model, optimizer = _first_half()
    assert _diagonal_flags(optimizer.state[model.a.weight]) == _expected_flags_at_checkpoint()


def test_state_dict_torch_save_round_trip() -> None:
    model, optimizer = _first_half()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)

    fresh_model = _Model(seed=1)  # different initial values: everything must come from the file
    fresh_optimizer = _optimizer(fresh_model)
    fresh_model.load_state_dict(loaded["model"])
    fresh_optimizer.load_state_dict(loaded["optim"])
    _check_resumed(fresh_model, fresh_optimizer)


def test_distributed_state_dict_torch_save_round_trip() -> None:
    model, optimizer = _first_half()
    state = optimizer.distributed_state_dict(key_to_param=model.named_parameters())
    # Faithful diagonal flags (A.3.9): the saved flags are the ones the computation uses.
    saved_flags = [
        bool(v)
        for k, v in sorted(state["state"]["a.weight"].items())
        if "is_factor_matrices_diagonal" in k
    ]
    assert saved_flags == _expected_flags_at_checkpoint()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)

    fresh_model = _Model(seed=2)
    fresh_optimizer = _optimizer(fresh_model)
    fresh_model.load_state_dict(loaded["model"])
    fresh_optimizer.load_distributed_state_dict(
        loaded["optim"], key_to_param=fresh_model.named_parameters()
    )
    _check_resumed(fresh_model, fresh_optimizer)


def test_torch_distributed_checkpoint_round_trip(tmp_path) -> None:
    import torch.distributed.checkpoint as dcp

    model, optimizer = _first_half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(
            {
                "model": model.state_dict(),
                "optim": optimizer.distributed_state_dict(key_to_param=model.named_parameters()),
            },
            checkpoint_id=str(tmp_path),
        )

        fresh_model = _Model(seed=3)
        fresh_optimizer = _optimizer(fresh_model)
        state = {
            "model": fresh_model.state_dict(),
            "optim": fresh_optimizer.distributed_state_dict(
                key_to_param=fresh_model.named_parameters()
            ),
        }
        dcp.load(state, checkpoint_id=str(tmp_path))
    fresh_model.load_state_dict(state["model"])
    fresh_optimizer.load_distributed_state_dict(
        state["optim"], key_to_param=fresh_model.named_parameters()
    )
    _check_resumed(fresh_model, fresh_optimizer)


def test_param_groups_keyed_by_sorted_joined_names() -> None:
    model = _Model(seed=0)
    optimizer = _optimizer(model)
    state = optimizer.distributed_state_dict(key_to_param=model.named_parameters())
    assert set(state) == {"state", "param_groups"}
    assert set(state["param_groups"]) == {"a.bias/a.weight", "b.weight/scale"}
    assert state["param_groups"]["b.weight/scale"]["lr"] == 0.05
    assert "params" not in state["param_groups"]["a.bias/a.weight"]
    # The group's first parameter carries the step counter.
    assert '["step"]' in state["state"]["a.weight"] and '["step"]' in state["state"]["b.weight"]
    assert '["step"]' not in state["state"]["a.bias"]
    assert set(
        optimizer.distributed_state_dict(model.named_parameters(), save_param_groups=False)
    ) == {"state"}


# --------------------------------------------------------------------------------------------
# SPEC §8.1's example: Linear(5, 10) weight, max_preconditioner_dim 5, AdaGrad grafting.
# --------------------------------------------------------------------------------------------


def _example() -> tuple[nn.Module, DistributedShampoo]:
    model = nn.Sequential(nn.Linear(5, 10, bias=False))
    optimizer = DistributedShampoo(
        model.parameters(),
        lr=0.01,
        betas=(0.9, 1.0),
        epsilon=1e-12,
        momentum=0.0,
        weight_decay=0.0,
        max_preconditioner_dim=5,
        precondition_frequency=1,
        start_preconditioning_step=-1,
        distributed_config=None,
        grafting_config=AdaGradGraftingConfig(epsilon=0.001),
    )
    return model, optimizer


def test_example_exact_keys_and_values() -> None:
    model, optimizer = _example()
    state_dict = optimizer.distributed_state_dict(key_to_param=model.named_parameters())
    assert set(state_dict) == {"state", "param_groups"}
    assert set(state_dict["state"]) == {"0.weight"}
    expected_keys = {'["step"]'}
    for block in ("block_0", "block_1"):
        for k in (0, 1):
            expected_keys |= {
                f'["{block}", "shampoo", "factor_matrices", {k}, "quantized_values"]',
                f'["{block}", "shampoo", "inv_factor_matrices", {k}, "quantized_values"]',
                f'["{block}", "shampoo", "is_factor_matrices_diagonal", {k}]',
            }
        expected_keys |= {
            f'["{block}", "adagrad", "quantized_values"]',
            f'["{block}", "filtered_grad", "quantized_values"]',
        }
    flat = state_dict["state"]["0.weight"]
    assert set(flat) == expected_keys
    for key, value in flat.items():
        assert isinstance(value, torch.Tensor), key
        if key == '["step"]':
            assert value.dtype == torch.int64 and value.dim() == 0 and int(value) == 0
        elif "is_factor_matrices_diagonal" in key:
            assert value.dtype == torch.bool and value.dim() == 0 and bool(value)
        else:
            # factor matrices and roots packed (15 = 5 * 6 / 2), the others in block shape
            shape = (15,) if "factor_matrices" in key else (5, 5)
            assert value.shape == shape and value.dtype == torch.float32 and not value.any(), key
    assert state_dict["param_groups"] == {
        "0.weight": {
            "lr": 0.01,
            "betas": (0.9, 1.0),
            "beta3": 0.9,
            "epsilon": 1e-12,
            "momentum": 0.0,
            "dampening": 0.0,
            "weight_decay": 0.0,
            "max_preconditioner_dim": 5,
            "precondition_frequency": 1,
            "start_preconditioning_step": 1,
            "inv_root_override": 0,
            "exponent_multiplier": 1.0,
            "use_nesterov": False,
            "use_bias_correction": True,
            "use_decoupled_weight_decay": True,
            "grafting_config": AdaGradGraftingConfig(epsilon=0.001),
            "use_merge_dims": True,
            "preconditioner_dtype": None,
            "precision_config": PrecisionConfig(),
            "root_inv_config": DefaultEigenConfig,
            # issue 14: the reference's Dec-2024 group key (None: Shampoo with root_inv_config)
            "preconditioner_config": None,
        }
    }


def test_example_load_round_trip_after_steps() -> None:
    """Load a state saved after two steps into the same optimizer after a third step: it must
    return exactly the saved values (including the step counter)."""
    model, optimizer = _example()
    for seed in (1, 2):
        model[0].weight.grad = torch.randn(10, 5, generator=torch.Generator().manual_seed(seed))
        optimizer.step()
    saved = copy.deepcopy(optimizer.distributed_state_dict(key_to_param=model.named_parameters()))
    model[0].weight.grad = torch.randn(10, 5, generator=torch.Generator().manual_seed(3))
    optimizer.step()
    optimizer.load_distributed_state_dict(saved, key_to_param=model.named_parameters())
    reloaded = optimizer.distributed_state_dict(key_to_param=model.named_parameters())
    _assert_same(reloaded["state"], saved["state"], "state")
    assert reloaded["param_groups"] == saved["param_groups"]
    assert int(optimizer.state[model[0].weight]["step"]) == 2


def test_load_different_param_groups_count() -> None:
    model, optimizer = _example()
    state_dict = optimizer.distributed_state_dict(key_to_param=model.named_parameters())
    state_dict["param_groups"]["1.weight"] = {}
    with pytest.raises(ValueError, match=r"(?i)different param_groups count.*1.*2"):
        optimizer.load_distributed_state_dict(state_dict, key_to_param=model.named_parameters())


def test_load_missing_param_group_key() -> None:
    model, optimizer = _example()
    state_dict = optimizer.distributed_state_dict(key_to_param=model.named_parameters())
    state_dict["param_groups"] = {"1.weight": state_dict["param_groups"]["0.weight"]}
    with pytest.raises(ValueError, match=r"(?i)param group.*0\.weight.*not found"):
        optimizer.load_distributed_state_dict(state_dict, key_to_param=model.named_parameters())


def test_load_unknown_parameter_key(caplog: pytest.LogCaptureFixture) -> None:
    model, optimizer = _example()
    state_dict = optimizer.distributed_state_dict(key_to_param=model.named_parameters())
    with pytest.raises(KeyError, match=r"0\.weight"):
        optimizer.load_distributed_state_dict(
            state_dict, key_to_param=iter([]), save_param_groups=False
        )
    with caplog.at_level(logging.WARNING):
        optimizer.load_distributed_state_dict(
            state_dict,
            key_to_param=iter([]),
            save_param_groups=False,
            enable_missing_key_check=False,
        )
    assert any("0.weight" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_load_parameter_without_state() -> None:
    model, optimizer = _example()
    state_dict = optimizer.distributed_state_dict(key_to_param=model.named_parameters())
    state_dict["state"]["1.weight"] = {}
    stranger = torch.nn.Parameter(torch.tensor(1.0))
    with pytest.raises(KeyError, match=r"(?i)not found in state"):
        optimizer.load_distributed_state_dict(
            state_dict,
            key_to_param=chain(model.named_parameters(), [("1.weight", stranger)]),
            save_param_groups=False,
        )


def test_load_missing_state_key() -> None:
    model, optimizer = _example()
    state_dict = optimizer.distributed_state_dict(key_to_param=model.named_parameters())
    del state_dict["state"]["0.weight"]['["block_1", "adagrad", "quantized_values"]']
    with pytest.raises(KeyError) as info:
        optimizer.load_distributed_state_dict(state_dict, key_to_param=model.named_parameters())
    assert re.search(
        r"(?i)(adagrad|quantized_values).*not found|not found.*(adagrad|quantized_values)",
        str(info.value),
    )


def test_standard_state_dict_is_torch_saveable_and_nonempty() -> None:
    _, optimizer = _first_half()
    state_dict = optimizer.state_dict()
    assert set(state_dict) >= {"state", "param_groups"}
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    assert buffer.tell() > 0
