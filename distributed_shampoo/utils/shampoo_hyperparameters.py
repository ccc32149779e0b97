"""Validation and resolution of the per-group hyperparameters (SPEC B §1.3, A.3.3, A.3.7).

The same checks run on constructor arguments and on values given in param-group dicts, so a
per-group override can neither skip validation nor keep a literal -1 default.
"""

import logging
import numbers
from collections.abc import Sequence
from typing import Any

from distributed_shampoo.matrix_functions_types import (
    CoupledHigherOrderConfig,
    CoupledNewtonConfig,
    EigenConfig,
    RootInvConfig,
)
from distributed_shampoo.shampoo_types import (
    AdaGradGraftingConfig,
    GraftingConfig,
    PrecisionConfig,
    SGDGraftingConfig,
)

logger = logging.getLogger("distributed_shampoo.distributed_shampoo")

_ROOT_INV_CONFIG_TYPES = (EigenConfig, CoupledNewtonConfig, CoupledHigherOrderConfig)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _require_real(name: str, value: Any) -> None:
    if not _is_real(value):
        raise TypeError(f"Invalid {name}: {value!r}. Must be a real number.")


def _require_int(name: str, value: Any) -> None:
    if not _is_int(value):
        raise TypeError(f"Invalid {name}: {value!r}. Must be an integer.")


def validate_group(group: dict[str, Any], where: str = "", warn: bool = True) -> None:
    """Validates and resolves `group` in place, in the order of SPEC B §1.3.

    `where` prefixes messages (e.g. "param group 1: ") so a per-group error says which group;
    `warn` logs the start_preconditioning_step default (once, for the constructor's values).
    """
    lr = group["lr"]
    _require_real("lr", lr)
    _require(lr >= 0.0, f"{where}Invalid learning rate: lr={lr}. Must be >= 0.0.")

    betas = group["betas"]
    if not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"{where}Invalid betas: {betas!r}. Must be a pair (beta1, beta2).")
    _require_real("betas[0]", betas[0])
    _require_real("betas[1]", betas[1])
    _require(
        0.0 <= betas[0] < 1.0,
        f"{where}Invalid beta parameter at index 0: betas[0]={betas[0]}. Must be in [0.0, 1.0).",
    )
    _require(
        0.0 < betas[1] <= 1.0,
        f"{where}Invalid beta parameter at index 1: betas[1]={betas[1]}. Must be in (0.0, 1.0].",
    )
    group["betas"] = tuple(betas)

    beta3 = group["beta3"]
    _require_real("beta3", beta3)
    if beta3 == -1.0:
        group["beta3"] = betas[0]
    else:
        _require(
            0.0 <= beta3 < 1.0,
            f"{where}Invalid beta3 parameter: beta3={beta3}. Must be in [0.0, 1.0) or -1.0 "
            "(use betas[0]).",
        )

    epsilon = group["epsilon"]
    _require_real("epsilon", epsilon)
    _require(epsilon > 0.0, f"{where}Invalid epsilon value: epsilon={epsilon}. Must be > 0.0.")

    momentum = group["momentum"]
    _require_real("momentum", momentum)
    _require(
        0.0 <= momentum < 1.0,
        f"{where}Invalid momentum parameter: momentum={momentum}. Must be [0.0, 1.0).",
    )
    dampening = group["dampening"]
    _require_real("dampening", dampening)
    _require(
        0.0 <= dampening < 1.0,
        f"{where}Invalid damping parameter: dampening={dampening}. Must be [0.0, 1.0).",
    )
    weight_decay = group["weight_decay"]
    _require_real("weight_decay", weight_decay)
    _require(
        weight_decay >= 0.0,
        f"{where}Invalid weight_decay value: weight_decay={weight_decay}. Must be >= 0.0.",
    )

    max_dim = group["max_preconditioner_dim"]
    _require_int("max_preconditioner_dim", max_dim)
    _require(
        max_dim >= 1,
        f"{where}Invalid max preconditioner dimension: max_preconditioner_dim={max_dim}. "
        "Must be >= 1.",
    )
    frequency = group["precondition_frequency"]
    _require_int("precondition_frequency", frequency)
    _require(
        frequency >= 1,
        f"{where}Invalid precondition frequency: precondition_frequency={frequency}. "
        "Must be >= 1.",
    )
    start = group["start_preconditioning_step"]
    _require_int("start_preconditioning_step", start)
    _require(
        start >= -1,
        f"{where}Invalid start preconditioning step: start_preconditioning_step={start}. "
        "Must be >= -1.",
    )

    _validate_inv_root_override(group["inv_root_override"], where)

    exponent_multiplier = group["exponent_multiplier"]
    _require_real("exponent_multiplier", exponent_multiplier)
    _require(
        exponent_multiplier > 0.0,
        f"{where}Invalid exponent_multiplier: {exponent_multiplier}. Must be > 0.0.",
    )

    if start == -1:
        group["start_preconditioning_step"] = start = frequency
        if warn:
            logger.warning(
                "start_preconditioning_step set to -1. Setting start_preconditioning_step equal "
                f"to precondition frequency {frequency} by default."
            )
    _require(
        start >= frequency,
        f"{where}Invalid start_preconditioning_step value: start_preconditioning_step={start}. "
        f"Must be >= precondition_frequency={frequency}.",
    )

    _validate_configs(group, where)


def _validate_inv_root_override(override: Any, where: str) -> None:
    if isinstance(override, Sequence) and not isinstance(override, str):
        if not all(_is_int(v) for v in override):
            raise TypeError(
                f"{where}Invalid inv_root_override: {override!r}. Entries must be integers."
            )
        _require(
            all(v >= 0 for v in override),
            f"{where}Invalid exponent override list: inv_root_override={list(override)}. "
            "All values must be >= 0 (0 means the default root 2 * order).",
        )
    else:
        _require_int("inv_root_override", override)
        _require(
            override >= 0,
            f"{where}Invalid exponent override: inv_root_override={override}. Must be >= 0 "
            "(0 means the default root 2 * order).",
        )


def _validate_configs(group: dict[str, Any], where: str) -> None:
    grafting = group["grafting_config"]
    if grafting is not None and not isinstance(
        grafting, (SGDGraftingConfig, AdaGradGraftingConfig)
    ):
        raise NotImplementedError(
            f"{where}Unsupported grafting config: group[GRAFTING_CONFIG]={grafting!r}. "
            f"Use None or one of the concrete subclasses of {GraftingConfig.__name__}."
        )
    if not isinstance(group["precision_config"], PrecisionConfig):
        raise TypeError(
            f"{where}Invalid precision_config: {group['precision_config']!r}. "
            "Must be a PrecisionConfig."
        )
    config = group["root_inv_config"]
    if type(config) not in _ROOT_INV_CONFIG_TYPES:
        kind = "Root inverse config is not implemented! " if isinstance(config, RootInvConfig) else ""
        raise NotImplementedError(
            f"{where}{kind}Specified root inverse config is root_inv_config={config!r}; must be "
            "exactly one of EigenConfig, CoupledNewtonConfig, CoupledHigherOrderConfig."
        )
    multiplier = group["exponent_multiplier"]
    if type(config) is not EigenConfig and multiplier != 1.0:
        method = (
            "coupled inverse Newton iteration"
            if type(config) is CoupledNewtonConfig
            else "coupled higher order method"
        )
        raise ValueError(
            f"{where}Exponent multiplier {multiplier} must be equal to 1 to use {method} "
            f"(exponent_multiplier={multiplier} with root_inv_config={config!r})."
        )
