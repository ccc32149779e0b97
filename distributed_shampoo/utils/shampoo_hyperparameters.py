"""Validation and resolution of the per-group hyperparameters (SPEC B §1.3, A.3.3, A.3.7).

The same checks run on constructor arguments and on values given in param-group dicts, so a
per-group override can neither skip validation nor keep a literal -1 default.
"""

import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from distributed_shampoo.matrix_functions_types import (
    CoupledHigherOrderConfig,
    CoupledNewtonConfig,
    EigenConfig,
    RootInvConfig,
)
from distributed_shampoo.shampoo_types import (
    AdaGradGraftingConfig,
    AdamGraftingConfig,
    PrecisionConfig,
    RMSpropGraftingConfig,
    SGDGraftingConfig,
)
from distributed_shampoo.utils.soap_config import (
    check_preconditioner_config,
    check_soap_group,
    sync_root_inv_config,
)

logger = logging.getLogger("distributed_shampoo.distributed_shampoo")

_ROOT_INV_CONFIG_TYPES = (EigenConfig, CoupledNewtonConfig, CoupledHigherOrderConfig)
# isinstance, as in the reference (SPEC B §1.3 step 24).
_GRAFTING_CONFIG_TYPES = (
    SGDGraftingConfig, AdaGradGraftingConfig, RMSpropGraftingConfig, AdamGraftingConfig
)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_integral(value: Any) -> bool:
    """An int, or a float with an integer value (2.0): the reference computes with either."""
    return _is_int(value) or (_is_real(value) and math.isfinite(value) and float(value).is_integer())


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _require_real(name: str, value: Any) -> None:
    if not _is_real(value):
        raise TypeError(f"Invalid {name}: {value!r}. Must be a real number.")


def _integer(name: str, value: Any, where: str) -> int:
    """`value` as an int; an integral float (2.0) is accepted as the reference accepts it."""
    if not _is_real(value):
        raise TypeError(f"{where}Invalid {name}: {value!r}. Must be an integer.")
    if not _is_integral(value):
        raise ValueError(
            f"{where}Invalid {name}: {value!r}. Must be an integer (an integral float such as "
            "2.0 is accepted)."
        )
    return int(value)


def _check_lr(lr: Any, where: str) -> None:
    """A real number, or a one-element real tensor as torch.optim allows (read every step)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.is_complex() or lr.dtype == torch.bool:
            raise TypeError(
                f"{where}Invalid lr: a tensor learning rate must hold one real value; got "
                f"shape {tuple(lr.shape)}, dtype {lr.dtype}."
            )
        ok = bool(lr >= 0.0)
    else:
        _require_real("lr", lr)
        ok = lr >= 0.0
    _require(ok, f"{where}Invalid learning rate: {lr}. Must be >= 0.0.")


def validate_group(group: dict[str, Any], where: str = "", warn: bool = True) -> None:
    """Validates and resolves `group` in place, in the order of SPEC B §1.3.

    `where` prefixes messages (e.g. "param group 1: ") so a per-group error says which group;
    `warn` logs the start_preconditioning_step default (once, for the constructor's values).
    The reference's messages are kept verbatim (SPEC A.3.14); integral floats are stored
    back as ints.
    """
    _check_lr(group["lr"], where)

    betas = group["betas"]
    if not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"{where}Invalid betas: {betas!r}. Must be a pair (beta1, beta2).")
    _require_real("betas[0]", betas[0])
    _require_real("betas[1]", betas[1])
    _require(
        0.0 <= betas[0] < 1.0,
        f"{where}Invalid beta parameter at index 0: {betas[0]}. Must be in [0.0, 1.0).",
    )
    _require(
        0.0 < betas[1] <= 1.0,
        f"{where}Invalid beta parameter at index 1: {betas[1]}. Must be in (0.0, 1.0].",
    )
    group["betas"] = tuple(betas)

    beta3 = group["beta3"]
    _require_real("beta3", beta3)
    if beta3 == -1.0:
        group["beta3"] = betas[0]
    else:
        _require(
            0.0 <= beta3 < 1.0,
            f"{where}Invalid beta3 parameter: {beta3}. Must be in [0.0, 1.0).",
        )

    epsilon = group["epsilon"]
    _require_real("epsilon", epsilon)
    _require(epsilon > 0.0, f"{where}Invalid epsilon value: {epsilon}. Must be > 0.0.")

    momentum = group["momentum"]
    _require_real("momentum", momentum)
    _require(
        0.0 <= momentum < 1.0,
        f"{where}Invalid momentum parameter: {momentum}. Must be [0.0, 1.0).",
    )
    dampening = group["dampening"]
    _require_real("dampening", dampening)
    _require(
        0.0 <= dampening < 1.0,
        f"{where}Invalid damping parameter: {dampening}. Must be [0.0, 1.0).",
    )
    weight_decay = group["weight_decay"]
    _require_real("weight_decay", weight_decay)
    _require(
        weight_decay >= 0.0,
        f"{where}Invalid weight_decay value: {weight_decay}. Must be >= 0.0.",
    )

    max_dim = group["max_preconditioner_dim"]
    _require_real("max_preconditioner_dim", max_dim)
    _require(
        max_dim >= 1,
        f"{where}Invalid max preconditioner dimension: {max_dim}. Must be >= 1.",
    )
    group["max_preconditioner_dim"] = _integer("max_preconditioner_dim", max_dim, where)
    frequency = group["precondition_frequency"]
    _require_real("precondition_frequency", frequency)
    _require(
        frequency >= 1,
        f"{where}Invalid precondition frequency: {frequency}. Must be >= 1.",
    )
    group["precondition_frequency"] = frequency = _integer(
        "precondition_frequency", frequency, where
    )
    start = group["start_preconditioning_step"]
    _require_real("start_preconditioning_step", start)
    _require(
        start >= -1,
        f"{where}Invalid start preconditioning step: {start}. Must be >= -1.",
    )
    group["start_preconditioning_step"] = start = _integer(
        "start_preconditioning_step", start, where
    )

    group["inv_root_override"] = _validate_inv_root_override(group["inv_root_override"], where)

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
        f"{where}Invalid start_preconditioning_step value: {start}. "
        f"Must be >= precondition_frequency={frequency}.",
    )

    _validate_configs(group, where)


def _validate_inv_root_override(override: Any, where: str) -> Any:
    """Checks the override and returns it with integral floats as ints. A non-integer scalar
    root (2.5) is kept: the eigendecomposition method computes any real power; whether the
    group's root_inv_config can use it is checked in _validate_configs."""
    if isinstance(override, Sequence) and not isinstance(override, str):
        if not all(_is_real(v) for v in override):
            raise TypeError(
                f"{where}Invalid inv_root_override: {override!r}. Entries must be integers."
            )
        _require(
            all(v >= 0 for v in override),
            f"{where}Invalid exponent override list: {override}. All values must be >= 0.",
        )
        if not all(_is_integral(v) for v in override):
            raise ValueError(
                f"{where}Invalid inv_root_override: {override!r}. A list's entries must be "
                "integers (non-integer roots are supported as a single value, not per order)."
            )
        if all(_is_int(v) for v in override):
            return override
        return [int(v) for v in override]
    _require_real("inv_root_override", override)
    _require(
        override >= 0,
        f"{where}Invalid exponent override: {override}. Must be >= 0.",
    )
    return int(override) if _is_integral(override) else override


def _revalidate(config: Any) -> None:
    """Configs are mutable dataclasses (as in the reference): a field assigned after
    construction is checked again, by the same __post_init__ checks, when the optimizer
    reads the config."""
    post_init = getattr(config, "__post_init__", None)
    if post_init is not None:
        post_init()


def _validate_configs(group: dict[str, Any], where: str) -> None:
    grafting = group["grafting_config"]
    if grafting is not None and not isinstance(grafting, _GRAFTING_CONFIG_TYPES):
        raise NotImplementedError(
            f"{where}Unsupported grafting config: group[GRAFTING_CONFIG]={grafting!r}."
        )
    _revalidate(grafting)
    if not isinstance(group["precision_config"], PrecisionConfig):
        raise TypeError(
            f"{where}Invalid precision_config: {group['precision_config']!r}. "
            "Must be a PrecisionConfig."
        )
    _revalidate(group["precision_config"])
    if "preconditioner_config" in group:  # issue 14 (soap_config.py)
        check_preconditioner_config(group["preconditioner_config"], where)
        sync_root_inv_config(group, where)
    config = group["root_inv_config"]
    if type(config) not in _ROOT_INV_CONFIG_TYPES:
        raise NotImplementedError(
            f"{where}Root inverse config is not implemented! Specified root inverse config is "
            f"root_inv_config={config!r}; must be exactly one of EigenConfig, "
            "CoupledNewtonConfig, CoupledHigherOrderConfig."
        )
    _revalidate(config)
    if "preconditioner_config" in group:
        check_soap_group(group, where)
    multiplier = group["exponent_multiplier"]
    method = (
        "coupled inverse Newton iteration"
        if type(config) is CoupledNewtonConfig
        else "coupled higher order method"
    )
    if type(config) is not EigenConfig and multiplier != 1.0:
        raise ValueError(
            f"{where}Exponent multiplier {multiplier} must be equal to 1 to use {method} "
            f"(exponent_multiplier={multiplier} with root_inv_config={config!r})."
        )
    override = group["inv_root_override"]
    if type(config) is not EigenConfig and not _is_integral(override) and _is_real(override):
        raise ValueError(
            f"{where}Root {override} must be an integer to use {method}! "
            f"(inv_root_override={override} with root_inv_config={config!r}; only EigenConfig "
            "computes non-integer roots.)"
        )
