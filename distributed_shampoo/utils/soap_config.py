"""How `preconditioner_config=` (issue 14) selects Shampoo or eigenvalue-corrected Shampoo
(SOAP) and how it combines with this package's Sept-2024 `root_inv_config=` argument.

The group keeps both keys: "root_inv_config" is what the Shampoo engine reads (a
ShampooPreconditionerConfig's amortized_computation_config when one is given), and
"preconditioner_config" (None: Shampoo with root_inv_config) says which engine a group gets
(engine_class).
"""

from typing import Any

from distributed_shampoo.matrix_functions_types import (
    DefaultEigenConfig,
    EigenvectorConfig,
    RootInvConfig,
)
from distributed_shampoo.shampoo_types import (
    EigenvalueCorrectedShampooPreconditionerConfig,
    ShampooPreconditionerConfig,
)

_TYPES = (ShampooPreconditionerConfig, EigenvalueCorrectedShampooPreconditionerConfig)


def is_soap(config: Any) -> bool:
    return type(config) is EigenvalueCorrectedShampooPreconditionerConfig


def check_preconditioner_config(config: Any, where: str = "") -> None:
    """The reference's NotImplementedError for an unknown config type (exact type, as it
    dispatches), then the config's own checks again (a mutable dataclass). None: Shampoo
    with root_inv_config."""
    if config is None:
        return
    if type(config) not in _TYPES:
        raise NotImplementedError(f"{where}group[PRECONDITIONER_CONFIG]={config!r} not supported!")
    config.__post_init__()


def resolve_preconditioner_config(
    preconditioner_config: Any, root_inv_config: RootInvConfig
) -> dict[str, Any]:
    """The group value of preconditioner_config. None (the default) means Shampoo with
    root_inv_config (each group's own, if it overrides it); a ShampooPreconditionerConfig
    replaces root_inv_config (sync_root_inv_config, per group), which must then be left at
    its default."""
    if preconditioner_config is None:
        return {"preconditioner_config": None}
    check_preconditioner_config(preconditioner_config)
    amortized = preconditioner_config.amortized_computation_config
    if (type(preconditioner_config) is ShampooPreconditionerConfig
            and root_inv_config != DefaultEigenConfig and root_inv_config != amortized) or (
            type(preconditioner_config) is not ShampooPreconditionerConfig
            and root_inv_config != DefaultEigenConfig):
        raise ValueError(
            "Both root_inv_config and preconditioner_config are provided. Please use only "
            "preconditioner_config (root_inv_config is its ShampooPreconditionerConfig's "
            "amortized_computation_config)."
        )
    return {"preconditioner_config": preconditioner_config}


def sync_root_inv_config(group: dict[str, Any], where: str) -> None:
    """A param group's own ShampooPreconditionerConfig decides its root method: its
    amortized_computation_config becomes the group's root_inv_config (which must then be the
    default or the same config), so that the engine reads one of them only."""
    config = group.get("preconditioner_config")
    if type(config) is not ShampooPreconditionerConfig:
        return
    amortized = config.amortized_computation_config
    root_inv_config = group["root_inv_config"]
    if root_inv_config is amortized:
        return
    if root_inv_config != DefaultEigenConfig and root_inv_config != amortized:
        raise ValueError(
            f"{where}Both root_inv_config and preconditioner_config are provided. Please use "
            "only preconditioner_config (root_inv_config is its ShampooPreconditionerConfig's "
            "amortized_computation_config)."
        )
    group["root_inv_config"] = amortized


def check_residual_tracking(preconditioner_config: Any, track_root_inv_residuals: bool) -> None:
    """The reference's check and wording: residuals exist only for inverse roots."""
    if preconditioner_config is None:
        return
    amortized_computation_config = preconditioner_config.amortized_computation_config
    if isinstance(amortized_computation_config, EigenvectorConfig) and track_root_inv_residuals:
        raise ValueError(
            f"{track_root_inv_residuals=} has to be set to False when "
            f"{amortized_computation_config=} is not an instance of RootInvConfig."
        )


def check_soap_group(group: dict[str, Any], where: str) -> None:
    """What a SOAP group cannot use: Shampoo's inverse-root exponent, and a non-integer root
    (the corrected eigenvalues are raised to 1/r for an integer r, default 2)."""
    if not is_soap(group.get("preconditioner_config")):
        return
    if group["exponent_multiplier"] != 1.0:
        raise ValueError(
            f"{where}Invalid exponent_multiplier: {group['exponent_multiplier']}. Must be 1.0 with "
            "EigenvalueCorrectedShampooPreconditionerConfig (it scales Shampoo's inverse-root "
            "exponent; eigenvalue-corrected Shampoo uses inv_root_override's root, default 2)."
        )
    override = group["inv_root_override"]
    if isinstance(override, float) and not override.is_integer():
        raise ValueError(
            f"{where}Invalid inv_root_override: {override}. Must be an integer with "
            "EigenvalueCorrectedShampooPreconditionerConfig."
        )


def engine_class(group: dict[str, Any]) -> type:
    """The engine a param group gets: the SOAP engine when its preconditioner_config asks."""
    from distributed_shampoo.utils.shampoo_group_engine import ShampooGroupEngine

    if is_soap(group.get("preconditioner_config")):
        from distributed_shampoo.utils.soap_group_engine import SOAPGroupEngine

        return SOAPGroupEngine
    return ShampooGroupEngine
