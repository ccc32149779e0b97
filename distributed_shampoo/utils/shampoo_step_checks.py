"""What a step reads from its param group and gradients, read and checked before any write
(issue 16 items 3, 4 and 6).

GroupValues validates a param group's values again whenever they differ from the last ones it
validated (a dict comparison per step otherwise), with the constructor's checks
(shampoo_hyperparameters.validate_group), and refuses a change of a value the engine fixed at
construction. read_step_scalars turns the validated values into every scalar the step's
commit half uses, so that half reads nothing that can fail.
"""

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distributed_shampoo.utils.shampoo_hyperparameters import _check_lr, validate_group
from distributed_shampoo.utils.shampoo_scalars import (
    first_moment_bias_correction,
    fl32,
    float32_bias_correction,
)

PARAMS = "params"
# Read once at construction: they size or shape the state, or are baked into the engine.
CONSTRUCTION_KEYS = (
    "epsilon", "max_preconditioner_dim", "root_inv_config", "inv_root_override",
    "exponent_multiplier", "precision_config", "use_merge_dims", "preconditioner_dtype",
    "preconditioner_config",
)
# Every key a step reads (validate_group reads them all).
REQUIRED_KEYS = (
    "lr", "betas", "beta3", "epsilon", "momentum", "dampening", "weight_decay",
    "max_preconditioner_dim", "precondition_frequency", "start_preconditioning_step",
    "inv_root_override", "exponent_multiplier", "use_nesterov", "use_bias_correction",
    "use_decoupled_weight_decay", "grafting_config", "use_merge_dims", "preconditioner_dtype",
    "precision_config", "root_inv_config", "preconditioner_config",
)
# The step counter is an int64 tensor: the next step must fit.
MAX_STEP = 2**63 - 1


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same type (a tensor or odd object compares as 'changed')."""
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


def hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != PARAMS}


def construction_changes(
    fixed: dict[str, Any], values: dict[str, Any]
) -> list[tuple[str, Any, Any]]:
    """(key, constructed, now) for every construction-time value that `values` changes."""
    changes = [(k, fixed[k], values[k]) for k in CONSTRUCTION_KEYS if not _same(fixed[k], values[k])]
    if not _same(fixed["betas"][1], values["betas"][1]):
        changes.append(("betas[1]", fixed["betas"][1], values["betas"][1]))
    # grafting can be switched off (None) but not changed: its state and constants are fixed
    grafting = values["grafting_config"]
    if grafting is not None and not _same(fixed["grafting_config"], grafting):
        changes.append(("grafting_config", fixed["grafting_config"], grafting))
    return changes


def check_construction_keys(fixed: dict[str, Any], values: dict[str, Any], where: str) -> None:
    changes = construction_changes(fixed, values)
    if changes:
        key, was, now = changes[0]
        raise ValueError(
            f"{where}{key} was changed from {was!r} to {now!r}, but DistributedShampoo reads it "
            "only at construction (it sizes or fixes the optimizer state), so the change cannot "
            f"be honoured. Restore {key}, or construct a new optimizer."
        )


class GroupValues:
    """The validated, resolved values of one param group, re-validated only when changed."""

    def __init__(self, group: dict[str, Any], index: int) -> None:
        self.where = f"param group {index}: "
        self.raw = copy.deepcopy(hyperparameters(group))
        self.values = dict(self.raw)  # validate_group already resolved the group in place
        self.fixed = copy.deepcopy(self.values)

    def current(self, group: dict[str, Any]) -> dict[str, Any]:
        raw = hyperparameters(group)
        same_keys = raw.keys() == self.raw.keys()
        changed = [k for k, v in raw.items() if not _same(v, self.raw.get(k))] if same_keys else None
        if changed == []:
            return self.values
        if changed == ["lr"]:  # what an LR scheduler does every step: check it alone
            lr = raw["lr"]
            _check_lr(lr, self.where)  # the constructor's check and wording (tensors allowed)
            if not math.isfinite(float(lr)):
                raise ValueError(f"{self.where}Invalid learning rate: {lr}. Must be finite.")
            # a copy, so that an in-place change of a tensor lr is seen as a change next step
            self.raw["lr"] = self.values["lr"] = copy.deepcopy(lr)
            return self.values
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise KeyError(f"{self.where}key {missing[0]!r} was removed from the param group.")
        values = copy.deepcopy(raw)
        validate_group(values, where=self.where, warn=False)
        for key in ("lr", "beta3", "momentum", "dampening", "weight_decay"):
            if not math.isfinite(values[key]):
                raise ValueError(f"{self.where}Invalid {key}: {values[key]}. Must be finite.")
        check_construction_keys(self.fixed, values, self.where)
        self.raw, self.values = copy.deepcopy(raw), values
        return values


@dataclass
class StepScalars:
    """Every scalar apply() uses, derived in the fallible half."""

    lr: float
    beta1: float
    beta3: float
    weight_decay: float
    decoupled: bool
    momentum: float
    dampening: float
    nesterov: bool
    grafting_on: bool
    grafting_phase: bool
    bias_correction1: float
    grafting_bias_correction: float
    shampoo_bias_correction: bool


def read_step_scalars(values: dict[str, Any], step: int, grafting_bias_corrected: bool,
                      grafting_beta2: float, beta2: float, where: str) -> StepScalars:
    if not 1 <= step <= MAX_STEP:
        raise ValueError(
            f"{where}the step counter would become {step}, beyond the int64 range of the "
            f"optimizer's step (at most {MAX_STEP}); was the checkpoint's 'step' corrupted?"
        )
    beta1 = float(values["betas"][0])
    beta3 = float(values["beta3"])
    grafting_on = values["grafting_config"] is not None
    with np.errstate(over="ignore"):  # an lr beyond float32 is refused just below
        lr = fl32(values["lr"])
    if not math.isfinite(lr):
        raise ValueError(f"{where}Invalid learning rate: lr={values['lr']}. Must be finite in float32.")
    bc1 = 1.0
    if bool(values["use_bias_correction"]) and beta1 != 0.0:
        bc1 = first_moment_bias_correction(beta1, beta3, step)
    return StepScalars(
        lr=lr,
        beta1=beta1,
        beta3=beta3,
        weight_decay=float(values["weight_decay"]),
        decoupled=bool(values["use_decoupled_weight_decay"]),
        momentum=float(values["momentum"]),
        dampening=float(values["dampening"]),
        nesterov=bool(values["use_nesterov"]),
        grafting_on=grafting_on,
        grafting_phase=step < values["start_preconditioning_step"] and grafting_on,
        bias_correction1=bc1,
        grafting_bias_correction=(
            float32_bias_correction(grafting_beta2, step) if grafting_bias_corrected else 1.0
        ),
        shampoo_bias_correction=bool(values["use_bias_correction"]) and beta2 < 1.0,
    )


def check_params(group: dict[str, Any], params: list[torch.Tensor], where: str) -> None:
    """The group still holds exactly the parameters it was constructed with."""
    current = group[PARAMS]
    if len(current) != len(params) or any(a is not b for a, b in zip(current, params)):
        raise ValueError(
            f"{where}its 'params' list was changed after construction ({len(params)} parameters "
            f"then, {len(current)} now). DistributedShampoo allocates state per parameter at "
            "construction; pass every parameter to the constructor."
        )


def check_grad(param: torch.Tensor, grad: torch.Tensor, describe: str) -> None:
    """A gradient the kernels can take without casting or broadcasting."""
    if grad.is_sparse:
        raise TypeError("DistributedShampoo does not support sparse gradients.")
    if not grad.dtype.is_floating_point:
        raise TypeError(
            f"The gradient of {describe} has dtype {grad.dtype}; DistributedShampoo takes real "
            "floating-point gradients (float16, bfloat16, float32, float64)."
        )
    if grad.shape != param.shape:
        raise ValueError(
            f"The gradient of {describe} has shape {tuple(grad.shape)} but the parameter has "
            f"shape {tuple(param.shape)}; it is not broadcast."
        )


def check_constructor_params(param_groups: list[dict[str, Any]]) -> None:
    """Real floating-point parameters, each listed once over all groups."""
    seen: dict[int, tuple[int, int]] = {}
    for g, group in enumerate(param_groups):
        for i, p in enumerate(group[PARAMS]):
            if not p.dtype.is_floating_point:
                raise TypeError(
                    f"Parameter {i} of param group {g} has dtype {p.dtype}; DistributedShampoo "
                    "optimizes real floating-point parameters only (complex parameters would "
                    "lose their imaginary part)."
                )
            if id(p) in seen:
                first = seen[id(p)]
                raise ValueError(
                    f"Parameter {i} of param group {g} is the same tensor as parameter "
                    f"{first[1]} of param group {first[0]}: a parameter may be listed only once."
                )
            seen[id(p)] = (g, i)
