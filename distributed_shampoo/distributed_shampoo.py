"""DistributedShampoo: the torch.optim.Optimizer users construct (SPEC B §1.2-§1.4, §4).

This module validates arguments, builds one flat-buffer engine per parameter group
(utils/shampoo_group_engine.py) and runs the step in two halves: every group's fallible
half first, then every group's commit, so a failed step changes nothing (SPEC A.3.12).
"""

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from distributed_shampoo import _backend
from distributed_shampoo.matrix_functions_types import DefaultEigenConfig, RootInvConfig
from distributed_shampoo.shampoo_types import (
    DDPShampooConfig,
    DistributedConfig,
    FSDPShampooConfig,
    FullyShardShampooConfig,
    GraftingConfig,
    HSDPShampooConfig,
    PrecisionConfig,
    PreconditionerConfig,
    ShampooPT2CompileConfig,
    StaggeredRootScheduleConfig,
)
from distributed_shampoo.utils import shampoo_state_dict
from distributed_shampoo.utils.shampoo_distributor import plan_distribution
from distributed_shampoo.utils.shampoo_group_engine import ShampooGroupEngine
from distributed_shampoo.utils.shampoo_hyperparameters import validate_group
from distributed_shampoo.utils.soap_config import (
    check_residual_tracking,
    engine_class,
    resolve_preconditioner_config,
)
from distributed_shampoo.utils.shampoo_step_checks import check_constructor_params

logger = logging.getLogger(__name__)
preconditioner_logger = logging.getLogger("distributed_shampoo.utils.shampoo_preconditioner_list")

_DISTRIBUTED_CONFIG_TYPES = (DDPShampooConfig, FSDPShampooConfig, FullyShardShampooConfig, HSDPShampooConfig)


class DistributedShampoo(torch.optim.Optimizer):
    """Shampoo with layer-wise grafting, block-diagonal preconditioners and C kernels.

    Arguments, defaults and semantics follow the documented Distributed Shampoo API; see
    README.md for the deliberate differences.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 1.0),
        beta3: float = -1.0,
        epsilon: float = 1e-12,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        max_preconditioner_dim: int = 1024,
        precondition_frequency: int = 1,
        start_preconditioning_step: int = -1,
        inv_root_override: int | Sequence[int] = 0,
        exponent_multiplier: float = 1.0,
        use_nesterov: bool = False,
        use_bias_correction: bool = True,
        use_decoupled_weight_decay: bool = True,
        grafting_config: GraftingConfig | None = None,
        use_merge_dims: bool = True,
        use_pytorch_compile: bool | None = None,
        shampoo_pt2_compile_config: ShampooPT2CompileConfig | None = None,
        distributed_config: DistributedConfig | None = None,
        preconditioner_dtype: torch.dtype | None = None,
        precision_config: PrecisionConfig | None = None,
        use_protected_eigh: bool = True,
        track_root_inv_residuals: bool = False,
        root_inv_config: RootInvConfig = DefaultEigenConfig,
        preconditioner_config: PreconditionerConfig | None = None,
        root_schedule_config: StaggeredRootScheduleConfig | None = None,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "beta3": beta3,
            "epsilon": epsilon,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "max_preconditioner_dim": max_preconditioner_dim,
            "precondition_frequency": precondition_frequency,
            "start_preconditioning_step": start_preconditioning_step,
            "inv_root_override": inv_root_override,
            "exponent_multiplier": exponent_multiplier,
            "use_nesterov": use_nesterov,
            "use_bias_correction": use_bias_correction,
            "use_decoupled_weight_decay": use_decoupled_weight_decay,
            "grafting_config": grafting_config,
            "use_merge_dims": use_merge_dims,
            "preconditioner_dtype": preconditioner_dtype,
            "precision_config": precision_config or PrecisionConfig(),
            "root_inv_config": root_inv_config,
        }
        # After root_inv_config, last: the Sept-2024 positional order is kept (issue 14).
        defaults.update(resolve_preconditioner_config(preconditioner_config, root_inv_config))
        check_residual_tracking(defaults["preconditioner_config"], track_root_inv_residuals)
        # Constructor arguments are checked in the reference's order (SPEC B §1.3); the
        # -1 defaults stay unresolved in `defaults` so that each group resolves them from
        # its own betas / precondition_frequency (SPEC A.3.7).
        validate_group(dict(defaults))
        if track_root_inv_residuals:
            logger.setLevel(logging.DEBUG)
        if use_nesterov and momentum == 0.0:
            logger.warning(
                "Nesterov flag is enabled but momentum parameter is zero! Continuing without "
                "using momentum or Nesterov acceleration..."
            )
        shampoo_pt2_compile_config = _resolve_pt2_config(use_pytorch_compile, shampoo_pt2_compile_config)
        if preconditioner_dtype is not None:
            if precision_config is not None:
                raise ValueError(
                    "Both preconditioner_dtype and precision_config are provided. Please use only "
                    "precision_config as preconditioner_dtype is deprecated."
                )
            logger.warning("preconditioner_dtype is deprecated. Please use precision_config instead.")
            defaults["precision_config"] = PrecisionConfig(factor_matrix_dtype=preconditioner_dtype)
        if distributed_config is not None and type(distributed_config) not in _DISTRIBUTED_CONFIG_TYPES:
            raise NotImplementedError(f"self._distributed_config={distributed_config!r} not supported!")
        if distributed_config is not None and hasattr(distributed_config, "__post_init__"):
            distributed_config.__post_init__()  # a mutable config: fields may have changed
        _check_root_schedule_config(root_schedule_config)
        super().__init__(params, defaults)
        check_constructor_params(self.param_groups)
        distribution = plan_distribution(distributed_config, self.param_groups)

        self._distributed_config = distributed_config
        self._use_protected_eigh = use_protected_eigh
        self._track_root_inv_residuals = track_root_inv_residuals
        self._shampoo_pt2_compile_config = shampoo_pt2_compile_config
        self._engines: list[ShampooGroupEngine] = []
        for index, group in enumerate(self.param_groups):
            validate_group(group, where=f"param group {index}: ", warn=False)
            if not group["params"]:
                raise ValueError(f"param group {index} has no parameters.")
            engine = engine_class(group)(
                group["params"], group, index, group["preconditioner_dtype"], use_protected_eigh,
                ddp=distribution.placement,
                pieces=distribution.pieces_by_group[index] if distribution.pieces_by_group else None,
                key_prefix=distribution.key_prefix,
                root_schedule=root_schedule_config,
            )
            self._engines.append(engine)
            for param_index, blocks in engine.block_states().items():
                self.state[group["params"][param_index]].update(blocks)
            self.state[group["params"][0]]["step"] = engine.step_count
            if preconditioner_logger.isEnabledFor(logging.INFO):
                _log_blocks(engine, group["precision_config"].grafting_state_dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with _backend.single_threaded_blas():
            plans = [engine.prepare(group) for engine, group in zip(self._engines, self.param_groups)]
            for engine, group, plan in zip(self._engines, self.param_groups, plans):
                if plan is not None:
                    engine.apply(group, plan, self._track_root_inv_residuals)
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_engines", None) is not None:
            raise NotImplementedError(
                "DistributedShampoo allocates its state at construction; add_param_group after "
                "construction is not supported. Pass every group to the constructor."
            )
        super().add_param_group(param_group)

    # -------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The standard torch.optim protocol (works with torch.save); see SPEC A.3.11."""
        return shampoo_state_dict.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Loads what state_dict() returned; validates everything before changing anything.
        With a distributed_config this is collective: every rank loads or every rank raises."""
        shampoo_state_dict.load_state_dict(self, state_dict)

    def distributed_state_dict(
        self,
        key_to_param: Iterable[tuple[str, torch.Tensor]],
        save_param_groups: bool = True,
    ) -> dict[str, Any]:
        """{"state": {param_fqn: {flat_key: tensor}}, "param_groups": {...}} (SPEC B §8.1)."""
        return shampoo_state_dict.distributed_state_dict(self, key_to_param, save_param_groups)

    def load_distributed_state_dict(
        self,
        state_dict: dict[str, Any],
        key_to_param: Iterable[tuple[str, torch.Tensor]],
        save_param_groups: bool = True,
        enable_missing_key_check: bool = True,
    ) -> None:
        """Restores distributed_state_dict's output (SPEC B §8.3), all-or-nothing; collective
        under a distributed_config. With torch.distributed.checkpoint, load with
        planner=ShampooLoadPlanner() (distributed_shampoo.utils.shampoo_dcp) so that a bad
        checkpoint never reaches the live state."""
        shampoo_state_dict.load_distributed_state_dict(
            self, state_dict, key_to_param, save_param_groups, enable_missing_key_check
        )


def _check_root_schedule_config(config: Any) -> None:
    """None (every root at once, the default) or a StaggeredRootScheduleConfig (validated
    again: a mutable dataclass)."""
    if config is None:
        return
    if not isinstance(config, StaggeredRootScheduleConfig):
        raise TypeError(
            "root_schedule_config must be None (the default schedule) or a "
            f"StaggeredRootScheduleConfig, got {type(config).__name__}."
        )
    config.__post_init__()


def _resolve_pt2_config(
    use_pytorch_compile: bool | None, config: ShampooPT2CompileConfig | None
) -> ShampooPT2CompileConfig | None:
    """SPEC B §1.3 steps 17-18, then an honest note: C kernels are not traced by PT2."""
    if use_pytorch_compile is True and config is None:
        config = ShampooPT2CompileConfig()
        logger.warning("use_pytorch_compile is deprecating. Please use shampoo_pt2_compile_config instead.")
    elif use_pytorch_compile is True:
        raise ValueError(
            "Both use_pytorch_compile and shampoo_pt2_compile_config are provided. Please use only "
            "shampoo_pt2_compile_config as use_pytorch_compile is deprecating."
        )
    elif use_pytorch_compile is False and config is not None:
        raise ValueError(
            "use_pytorch_compile=False conflicts with non-None shampoo_pt2_compile_config arg. "
            "Please use only shampoo_pt2_compile_config as use_pytorch_compile is deprecating."
        )
    if config is not None and not torch.cuda.is_available():
        raise ValueError(
            "Backend does NOT support Pytorch 2.0 compile. Switch to use_pytorch_compile in "
            "(False, None) and shampoo_pt2_compile_config=None."
        )
    if config is not None:
        logger.info(
            f"DistributedShampoo optimizer initialization is using {config.pytorch_compile_backend} "
            f"backend and enable_shampoo_pt2_dynamic_shape={config.enable_shampoo_pt2_dynamic_shape}. "
            "The step's arithmetic runs in this package's C kernels, which torch.compile does not "
            "trace, so the step is not compiled (no speed-up and no numerical change)."
        )
    return config


def _log_blocks(engine: ShampooGroupEngine, grafting_dtype: torch.dtype) -> None:
    """The reference's INFO records for every block of the group (all ranks' blocks), from
    its preconditioner-list logger: Shampoo factors, then the diagonal grafting state."""
    layout = engine.full_layout
    shampoo, adagrad = [], []
    for b, key in enumerate(layout.block_keys):
        p = int(layout.block_param[b])
        shape = torch.Size(layout.block_shapes[b])
        where = f"for Parameter {p} ({engine.params[p].shape}), Block {key} ({shape})."
        factors = [(torch.Size((d, d)), engine.factors.dtype) for d in shape]
        shampoo.append(f"Instantiated Shampoo Preconditioner {p}.{key} ({factors}) {where}")
        if engine.grafting.has_state:
            adagrad.append(
                f"Instantiated Adagrad Preconditioner {p}.{key} ({shape} with dtype "
                f"{grafting_dtype}) {where}"
            )
    for record in shampoo + adagrad:
        preconditioner_logger.info(record)
