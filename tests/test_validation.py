"""Constructor validation (SPEC B §1.3, §1.5.3), the extra rejections of SPEC A.3.3 / A.3.7,
unknown config types, PT2 argument conflicts and the warnings the constructor logs.

Messages are matched on key words and the offending value, not on the reference's exact text
(SPEC A.2: our wording may differ and may add the allowed range).
"""

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.matrix_functions_types import (
    CoupledHigherOrderConfig,
    CoupledNewtonConfig,
    EigenConfig,
    RootInvConfig,
)
from distributed_shampoo.shampoo_types import (
    AbstractDataclass,
    AdaGradGraftingConfig,
    AdamGraftingConfig,
    DDPShampooConfig,
    DistributedConfig,
    GraftingConfig,
    PrecisionConfig,
    RMSpropGraftingConfig,
    SGDGraftingConfig,
    ShampooPT2CompileConfig,
)


def _param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(3, 2))


def _num(value: Any) -> str:
    """Regex for a number as Python prints it (str), e.g. -0.1, 1.3, nan."""
    return re.escape(str(value))


# (id, constructor kwargs, regex the message must match: key words ... value)
INVALID = [
    ("lr_negative", dict(lr=-0.1), r"(?i)(learning rate|\blr\b).*" + _num(-0.1)),
    ("lr_nan", dict(lr=math.nan), r"(?i)(learning rate|\blr\b).*nan"),
    ("beta1_negative", dict(betas=(-0.1, 1.0)), r"(?i)beta.*0.*" + _num(-0.1)),
    ("beta1_one", dict(betas=(1.0, 1.0)), r"(?i)beta.*(index 0|betas\[0\]).*" + _num(1.0)),
    ("beta1_nan", dict(betas=(math.nan, 1.0)), r"(?i)beta.*nan"),
    ("beta2_zero", dict(betas=(0.9, 0.0)), r"(?i)beta.*(index 1|betas\[1\]).*" + _num(0.0)),
    ("beta2_above_one", dict(betas=(0.9, 1.1)), r"(?i)beta.*(index 1|betas\[1\]).*" + _num(1.1)),
    ("beta3_one", dict(beta3=1.0), r"(?i)beta3.*" + _num(1.0)),
    ("beta3_negative", dict(beta3=-0.5), r"(?i)beta3.*" + _num(-0.5)),
    ("epsilon_zero", dict(epsilon=0.0), r"(?i)epsilon.*" + _num(0.0)),
    ("epsilon_negative", dict(epsilon=-1e-12), r"(?i)epsilon.*" + _num(-1e-12)),
    ("epsilon_nan", dict(epsilon=math.nan), r"(?i)epsilon.*nan"),
    ("momentum_one", dict(momentum=1.0), r"(?i)momentum.*" + _num(1.0)),
    ("momentum_negative", dict(momentum=-0.1), r"(?i)momentum.*" + _num(-0.1)),
    ("dampening_one", dict(dampening=1.0), r"(?i)damp.*" + _num(1.0)),
    ("dampening_negative", dict(dampening=-0.1), r"(?i)damp.*" + _num(-0.1)),
    ("weight_decay_negative", dict(weight_decay=-0.1), r"(?i)weight.?decay.*" + _num(-0.1)),
    (
        "max_preconditioner_dim_zero",
        dict(max_preconditioner_dim=0),
        r"(?i)max.?preconditioner.?dim.*0",
    ),
    (
        "precondition_frequency_zero",
        dict(precondition_frequency=0),
        r"(?i)precondition.?frequency.*0",
    ),
    (
        "start_preconditioning_step_below_minus_one",
        dict(start_preconditioning_step=-2),
        r"(?i)start.?preconditioning.?step.*-2",
    ),
    (
        "inv_root_override_negative",
        dict(inv_root_override=-1),
        r"(?i)(exponent override|inv_root_override).*-1",
    ),
    (
        "inv_root_override_list_negative",
        dict(inv_root_override=[2, -1, 3]),
        r"(?i)(exponent override|inv_root_override).*\[2, -1, 3\]",
    ),
    (
        "start_below_frequency",
        dict(precondition_frequency=100, start_preconditioning_step=10),
        r"(?i)start.?preconditioning.?step.*10.*(precondition.?frequency.*)?100",
    ),
    # SPEC A.3.3: rejected at construction instead of inside the protected root computation.
    (
        "newton_exponent_multiplier",
        dict(root_inv_config=CoupledNewtonConfig(), exponent_multiplier=2.0),
        r"(?i)exponent.?multiplier.*2\.0",
    ),
    (
        "higher_order_exponent_multiplier",
        dict(root_inv_config=CoupledHigherOrderConfig(), exponent_multiplier=0.5),
        r"(?i)exponent.?multiplier.*0\.5",
    ),
    # SPEC §1.3 step 19.
    (
        "preconditioner_dtype_with_precision_config",
        dict(preconditioner_dtype=torch.float64, precision_config=PrecisionConfig()),
        r"(?i)preconditioner_dtype.*precision_config",
    ),
]


@pytest.mark.parametrize(
    "kwargs,pattern", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID]
)
def test_invalid_constructor_argument(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        DistributedShampoo([_param()], **kwargs)


def test_boundary_values_are_accepted() -> None:
    """The closed ends of the ranges in §1.3 are legal (so the checks above are not too strict)."""
    DistributedShampoo(
        [_param()],
        lr=0.0,
        betas=(0.0, 1.0),
        beta3=0.0,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        max_preconditioner_dim=1,
        precondition_frequency=1,
        start_preconditioning_step=1,
        inv_root_override=[0, 0, 0],
    )
    DistributedShampoo(
        [_param()], betas=(0.999, 1e-9), precondition_frequency=7, start_preconditioning_step=7
    )
    DistributedShampoo([_param()], root_inv_config=CoupledNewtonConfig(), exponent_multiplier=1.0)
    DistributedShampoo([_param()], root_inv_config=EigenConfig(), exponent_multiplier=2.5)


# --------------------------------------------------------------------------------------------
# SPEC A.3.7: per-group hyperparameters are validated and resolved like constructor arguments.
# --------------------------------------------------------------------------------------------

INVALID_GROUP = [
    ("lr", {"lr": -1.0}, r"(?i)(learning rate|\blr\b).*-1\.0"),
    ("betas", {"betas": (1.5, 1.0)}, r"(?i)beta.*1\.5"),
    ("beta3", {"beta3": 2.0}, r"(?i)beta3.*2\.0"),
    ("epsilon", {"epsilon": 0.0}, r"(?i)epsilon.*0\.0"),
    ("momentum", {"momentum": 1.5}, r"(?i)momentum.*1\.5"),
    ("weight_decay", {"weight_decay": -0.5}, r"(?i)weight.?decay.*-0\.5"),
    ("precondition_frequency", {"precondition_frequency": 0}, r"(?i)precondition.?frequency.*0"),
    (
        "start_below_frequency",
        {"precondition_frequency": 5, "start_preconditioning_step": 2},
        r"(?i)start.?preconditioning.?step.*2",
    ),
    ("inv_root_override", {"inv_root_override": [1, -2]}, r"(?i)(override).*-2"),
    (
        "newton_exponent_multiplier",
        {"root_inv_config": CoupledNewtonConfig(), "exponent_multiplier": 3.0},
        r"(?i)exponent.?multiplier.*3\.0",
    ),
]


@pytest.mark.parametrize(
    "overrides,pattern", [c[1:] for c in INVALID_GROUP], ids=[c[0] for c in INVALID_GROUP]
)
def test_invalid_per_group_hyperparameter(overrides: dict[str, Any], pattern: str) -> None:
    groups = [{"params": [_param()]}, dict(overrides, params=[_param()])]
    with pytest.raises(ValueError, match=pattern):
        DistributedShampoo(groups)


def test_per_group_minus_one_defaults_are_resolved() -> None:
    groups = [
        {"params": [_param()]},
        {
            "params": [_param()],
            "betas": (0.7, 0.99),
            "beta3": -1.0,
            "precondition_frequency": 3,
            "start_preconditioning_step": -1,
        },
    ]
    optimizer = DistributedShampoo(
        groups, betas=(0.9, 1.0), precondition_frequency=2, start_preconditioning_step=4
    )
    first, second = optimizer.param_groups
    assert first["beta3"] == 0.9 and first["start_preconditioning_step"] == 4
    assert second["beta3"] == 0.7
    assert second["start_preconditioning_step"] == 3


def test_constructor_minus_one_defaults_are_resolved() -> None:
    optimizer = DistributedShampoo([_param()], betas=(0.8, 1.0), precondition_frequency=5)
    (group,) = optimizer.param_groups
    assert group["beta3"] == 0.8
    assert group["start_preconditioning_step"] == 5


def test_param_group_keys_are_the_documented_ones() -> None:
    """SPEC B §1.4: exactly these keys (plus params), values after normalisation."""
    optimizer = DistributedShampoo([_param()], start_preconditioning_step=1)
    (group,) = optimizer.param_groups
    assert set(group) == {
        "params",
        "lr",
        "betas",
        "beta3",
        "epsilon",
        "momentum",
        "dampening",
        "weight_decay",
        "max_preconditioner_dim",
        "precondition_frequency",
        "start_preconditioning_step",
        "inv_root_override",
        "exponent_multiplier",
        "use_nesterov",
        "use_bias_correction",
        "use_decoupled_weight_decay",
        "grafting_config",
        "use_merge_dims",
        "preconditioner_dtype",
        "precision_config",
        "root_inv_config",
        "preconditioner_config",  # issue 14, as the reference stores it since Dec 2024
    }
    assert group["precision_config"] == PrecisionConfig()
    assert group["preconditioner_dtype"] is None
    assert group["root_inv_config"] == EigenConfig()
    assert tuple(group["betas"]) == (0.9, 1.0) and group["beta3"] == 0.9


# --------------------------------------------------------------------------------------------
# Config dataclasses (SPEC B §1.5.3).
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [AbstractDataclass, DistributedConfig, GraftingConfig])
def test_abstract_configs_cannot_be_instantiated(cls: type) -> None:
    with pytest.raises(TypeError, match=rf"(?i)cannot instantiate abstract class.*{cls.__name__}"):
        cls()


@pytest.mark.parametrize("cls", [AdaGradGraftingConfig, RMSpropGraftingConfig, AdamGraftingConfig])
@pytest.mark.parametrize("epsilon", [0.0, -1e-8])
def test_grafting_epsilon_rejected(cls: type, epsilon: float) -> None:
    with pytest.raises(ValueError, match=r"(?i)epsilon.*" + _num(epsilon)):
        cls(epsilon=epsilon)


@pytest.mark.parametrize("cls", [RMSpropGraftingConfig, AdamGraftingConfig])
@pytest.mark.parametrize("beta2", [-1.0, 0.0, 1.3])
def test_grafting_beta2_rejected(cls: type, beta2: float) -> None:
    with pytest.raises(ValueError, match=r"(?i)beta2.*" + _num(beta2)):
        cls(beta2=beta2)


def test_grafting_config_defaults() -> None:
    assert AdaGradGraftingConfig().epsilon == 1e-10
    assert (RMSpropGraftingConfig().beta2, RMSpropGraftingConfig().epsilon) == (0.99, 1e-8)
    assert (AdamGraftingConfig().beta2, AdamGraftingConfig().epsilon) == (0.999, 1e-8)
    assert RMSpropGraftingConfig(beta2=1.0).beta2 == 1.0  # beta2 range is (0, 1]
    with pytest.raises(TypeError):
        SGDGraftingConfig(epsilon=1e-8)  # no fields


# --------------------------------------------------------------------------------------------
# Unknown config types.
# --------------------------------------------------------------------------------------------


@dataclass
class _UnknownGrafting(GraftingConfig):
    epsilon: float = 1e-3


def test_unknown_grafting_config_type() -> None:
    with pytest.raises(NotImplementedError, match=r"(?i)grafting.*_UnknownGrafting"):
        DistributedShampoo([_param()], grafting_config=_UnknownGrafting())


@dataclass
class _UnknownDistributed(DistributedConfig):
    pass


@dataclass(kw_only=True)
class _DDPSubclass(DDPShampooConfig):
    pass


@pytest.mark.parametrize(
    "config", [_UnknownDistributed(), _DDPSubclass()], ids=["unknown", "ddp_subclass"]
)
def test_unknown_distributed_config_type(config: DistributedConfig) -> None:
    # Dispatch is by exact type (SPEC B §1.3 step 22): a subclass of DDPShampooConfig is unknown.
    with pytest.raises(
        NotImplementedError, match=r"(?i)" + re.escape(type(config).__name__) + r".*not supported"
    ):
        DistributedShampoo([_param()], distributed_config=config)


def test_unknown_root_inv_config_type() -> None:
    # SPEC A.3.3: discovered at construction, with the reference's exception type.
    with pytest.raises(NotImplementedError, match=r"(?i)root.?inv.*config"):
        DistributedShampoo([_param()], root_inv_config=RootInvConfig())


# --------------------------------------------------------------------------------------------
# PT2 (SPEC B §1.3 steps 17-18) and deprecations, with the warnings they log.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_pt2_both_arguments_conflict(no_cuda: None, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(
            ValueError, match=r"(?i)both.*use_pytorch_compile.*shampoo_pt2_compile_config"
        ),
    ):
        DistributedShampoo(
            [_param()],
            use_pytorch_compile=True,
            shampoo_pt2_compile_config=ShampooPT2CompileConfig(),
        )
    # A rejected use_pytorch_compile is not "deprecated but accepted": no deprecation warning.
    assert "deprecat" not in _warnings(caplog).lower()


def test_pt2_false_with_config_conflicts(no_cuda: None, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(
            ValueError, match=r"(?i)use_pytorch_compile=False.*conflict.*shampoo_pt2_compile_config"
        ),
    ):
        DistributedShampoo(
            [_param()],
            use_pytorch_compile=False,
            shampoo_pt2_compile_config=ShampooPT2CompileConfig(),
        )
    assert "deprecat" not in _warnings(caplog).lower()


def test_pt2_use_pytorch_compile_alone_warns_then_needs_backend(
    no_cuda: None, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(ValueError, match=r"(?i)backend does not support pytorch 2\.0 compile"),
    ):
        DistributedShampoo([_param()], use_pytorch_compile=True)
    assert re.search(r"(?i)use_pytorch_compile.*deprecat", _warnings(caplog))


def test_pt2_config_without_cuda(no_cuda: None) -> None:
    with pytest.raises(ValueError, match=r"(?i)backend does not support pytorch 2\.0 compile"):
        DistributedShampoo([_param()], shampoo_pt2_compile_config=ShampooPT2CompileConfig())


def test_pt2_off_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        DistributedShampoo([_param()], use_pytorch_compile=False, start_preconditioning_step=1)
        DistributedShampoo([_param()], use_pytorch_compile=None, start_preconditioning_step=1)
    assert _warnings(caplog) == ""


def test_preconditioner_dtype_deprecation_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        optimizer = DistributedShampoo(
            [_param()], preconditioner_dtype=torch.float64, start_preconditioning_step=1
        )
    assert re.search(r"(?i)preconditioner_dtype.*deprecated.*precision_config", _warnings(caplog))
    # Maps onto PrecisionConfig(factor_matrix_dtype=...) (SPEC §1.3 step 19, A.3.4).
    assert optimizer.param_groups[0]["precision_config"].factor_matrix_dtype == torch.float64


def test_start_preconditioning_step_minus_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        DistributedShampoo([_param()], precondition_frequency=7, start_preconditioning_step=-1)
    assert re.search(
        r"(?i)start_preconditioning_step.*-1.*precondition.?frequency.*7", _warnings(caplog)
    )


def test_nesterov_with_zero_momentum_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        DistributedShampoo(
            [_param()], use_nesterov=True, momentum=0.0, start_preconditioning_step=1
        )
    assert re.search(r"(?i)nesterov.*momentum.*zero|nesterov.*zero.*momentum", _warnings(caplog))


def test_valid_configuration_logs_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        DistributedShampoo(
            [_param()],
            use_nesterov=True,
            momentum=0.5,
            start_preconditioning_step=1,
            grafting_config=AdamGraftingConfig(),
        )
    assert _warnings(caplog) == ""
