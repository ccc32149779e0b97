"""Shared by the CIFAR-10 examples: the command line, the convnet, the optimizer factory, and
the training loop that ties together the data (cifar10_data.py), checkpoints
(checkpointing.py), metrics (metrics.py) and the process set-up (runtime_setup.py).

Each example script only decides how the model is wrapped (nothing, DDP, FSDP, HSDP, FSDP2)
and which ``distributed_config`` DistributedShampoo gets; everything else lives here and in
those modules, so the five scripts train the same model on the same data in the same order.
"""

import argparse
import enum
import logging
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from checkpointing import Checkpointer
from cifar10_data import DataOrder, ImageData, load_cifar10, normalize
from metrics import MetricsLogger, Progress
from runtime_setup import Runtime
from torch import nn

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.matrix_functions_types import (
    CoupledHigherOrderConfig,
    CoupledNewtonConfig,
    DefaultEigenConfig,
    RootInvConfig,
)
from distributed_shampoo.shampoo_types import (
    AdaGradGraftingConfig,
    AdamGraftingConfig,
    CommunicationDType,
    DistributedConfig,
    GraftingConfig,
    PrecisionConfig,
    RMSpropGraftingConfig,
    SGDGraftingConfig,
)

logger = logging.getLogger("examples")


# ----------------------------------------------------------------------------- command line
class OptimizerType(enum.Enum):
    SGD = "SGD"
    ADAM = "ADAM"
    DISTRIBUTED_SHAMPOO = "DISTRIBUTED_SHAMPOO"


class GraftingType(enum.Enum):
    NONE = "NONE"
    SGD = "SGD"
    ADAGRAD = "ADAGRAD"
    RMSPROP = "RMSPROP"
    ADAM = "ADAM"


class RootInvMethod(enum.Enum):
    EIGEN = "EIGEN"
    COUPLED_NEWTON = "COUPLED_NEWTON"
    COUPLED_HIGHER_ORDER = "COUPLED_HIGHER_ORDER"


class DType(enum.Enum):
    BF16 = torch.bfloat16
    FP16 = torch.float16
    FP32 = torch.float32
    FP64 = torch.float64


# Defaults that differ between optimizers, resolved once --optimizer-type is known: Shampoo's
# are its constructor defaults (SPEC B §1.2), the others are torch.optim's for SGD and Adam(W).
_SHAMPOO_DEFAULTS = {"lr": 1e-2, "beta2": 1.0, "epsilon": 1e-12}
_TORCH_OPTIM_DEFAULTS = {"lr": 1e-3, "beta2": 0.999, "epsilon": 1e-8}


def _enum_arg(enum_type: Any) -> Any:
    def parse(text: str) -> Any:
        try:
            return enum_type[text.upper()]
        except KeyError:
            names = ", ".join(member.name for member in enum_type)
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {names}") from None

    parse.__name__ = enum_type.__name__
    return parse


def _inv_root_override(text: str) -> Union[int, List[int]]:
    """'0' (an int) or '2,4' (a list indexed by tensor order, SPEC A.3.2)."""
    values = [int(part) for part in text.split(",") if part.strip()]
    return values if "," in text else values[0]


_DTYPE_FLAGS = [
    f"--{name}-dtype"
    for name in (
        "computation",
        "factor-matrix",
        "inv-factor-matrix",
        "filtered-grad",
        "momentum",
        "grafting-state",
    )
]
# (flag, type, default, help), by help section. A bool flag also gets --no-<flag>; an enum flag
# takes member names; a tuple type lists the choices. "default X" is added to the help.
_ARGUMENTS: Dict[str, List[Tuple[str, Any, Any, str]]] = {
    "training run": [
        ("--optimizer-type", OptimizerType, OptimizerType.DISTRIBUTED_SHAMPOO, ""),
        ("--epochs", int, 1, "passes over the training set"),
        ("--max-steps", int, None, "stop after this many steps in all, even inside an epoch"),
        ("--batch-size", int, 128, "global batch size, split evenly over the ranks"),
        ("--seed", int, 2022, "model initialisation and data order"),
        ("--model-width", int, 32, "channels of the first conv layer (~80·width² parameters)"),
        (
            "--device",
            ("auto", "cpu", "cuda"),
            "auto",
            "auto: CUDA if visible (nccl), else CPU (gloo)",
        ),
        ("--eval", bool, True, "test-set loss and accuracy after each epoch and at the end"),
        ("--eval-batch-size", int, 500, ""),
    ],
    "data": [
        ("--data-path", str, "./data", "the folder holding cifar-10-batches-py/"),
        ("--download", bool, False, "download CIFAR-10 into --data-path (needs torchvision)"),
        ("--synthetic", bool, False, "random CIFAR-10-shaped data with a class signal; no files"),
        ("--synthetic-size", int, 2048, "--synthetic training examples (test: a quarter)"),
    ],
    "metrics and checkpoints": [
        ("--metrics-csv", str, None, "write per-step metrics to this CSV file (rank 0)"),
        ("--tensorboard-dir", str, None, "also log to TensorBoard, if it is installed"),
        ("--progress", bool, True, "tqdm progress bar on rank 0 (if tqdm is installed)"),
        ("--log-every", int, 10, "print interval in steps when there is no progress bar"),
        ("--checkpoint-dir", str, None, "save checkpoints here; resume from the latest one"),
        ("--checkpoint-every", int, 0, "save every N steps (0: only at the end)"),
        ("--keep-checkpoints", int, 2, "keep the latest N checkpoints (0: all)"),
    ],
    "optimizer (DistributedShampoo's defaults; SGD and ADAM use the first ten flags)": [
        ("--lr", float, None, "default 1e-2 for Shampoo, 1e-3 for SGD and ADAM"),
        ("--beta1", float, 0.9, ""),
        ("--beta2", float, None, "default 1.0 for Shampoo (factor sums), 0.999 for ADAM"),
        ("--epsilon", float, None, "default 1e-12 for Shampoo, 1e-8 for ADAM"),
        ("--momentum", float, 0.0, ""),
        ("--dampening", float, 0.0, ""),
        ("--weight-decay", float, 0.0, ""),
        ("--use-nesterov", bool, False, ""),
        ("--use-decoupled-weight-decay", bool, True, "AdamW-style (ADAM: AdamW, else Adam)"),
        ("--beta3", float, -1.0, "-1: beta1"),
        ("--max-preconditioner-dim", int, 1024, ""),
        ("--precondition-frequency", int, 1, ""),
        ("--start-preconditioning-step", int, -1, "-1: the precondition frequency"),
        ("--inv-root-override", _inv_root_override, 0, "an int, or a list per tensor order: 2,4"),
        ("--exponent-multiplier", float, 1.0, ""),
        ("--use-bias-correction", bool, True, ""),
        ("--use-merge-dims", bool, True, ""),
        ("--use-protected-eigh", bool, True, ""),
        ("--track-root-inv-residuals", bool, False, ""),
        ("--root-inv-method", RootInvMethod, RootInvMethod.EIGEN, "EIGEN: DefaultEigenConfig"),
        ("--grafting-type", GraftingType, GraftingType.NONE, "NONE: grafting_config=None"),
        ("--grafting-beta2", float, None, "RMSPROP/ADAM; default: the config's (0.99/0.999)"),
        ("--grafting-epsilon", float, None, "default: the config's (1e-10 ADAGRAD, else 1e-8)"),
    ]
    + [(flag, DType, DType.FP32, "a PrecisionConfig field") for flag in _DTYPE_FLAGS],
    "DDP and HSDP Shampoo (DDPShampooConfig fields)": [
        ("--communication-dtype", CommunicationDType, CommunicationDType.DEFAULT, ""),
        ("--num-trainers-per-group", int, -1, "-1: all ranks of the data-parallel group"),
        ("--communicate-params", bool, False, ""),
    ],
}


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for title, arguments in _ARGUMENTS.items():
        group = parser.add_argument_group(title)
        for flag, kind, default, text in arguments:
            shown = default.name if isinstance(default, enum.Enum) else default
            if default is not None and "default" not in text:
                text = f"{text}; default {shown}" if text else f"default {shown}"
            if kind is bool:
                group.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=default, help=text
                )
            elif isinstance(kind, tuple):
                group.add_argument(flag, choices=kind, default=default, help=text)
            elif isinstance(kind, type) and issubclass(kind, enum.Enum):
                metavar = "{" + ",".join(member.name for member in kind) + "}"
                group.add_argument(
                    flag, type=_enum_arg(kind), metavar=metavar, default=default, help=text
                )
            else:
                group.add_argument(flag, type=kind, default=default, help=text)
    return parser


# --------------------------------------------------------------------------------- model
class ConvNet(nn.Module):
    """Three 3x3 conv layers (width, 2·width, 4·width channels), global average pooling and
    a linear classifier: small enough for a CPU, big enough that Shampoo blocks matter."""

    def __init__(self, width: int = 32, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.classifier(self.features(x))


# ----------------------------------------------------------------------------- optimizer
def instantiate_grafting_config(
    grafting_type: GraftingType, beta2: Optional[float], epsilon: Optional[float]
) -> Optional[GraftingConfig]:
    if grafting_type in (GraftingType.NONE, GraftingType.SGD):
        if beta2 is not None or epsilon is not None:
            logger.warning(
                "--grafting-beta2/--grafting-epsilon are ignored with %s grafting",
                grafting_type.name,
            )
        return None if grafting_type is GraftingType.NONE else SGDGraftingConfig()
    kwargs: Dict[str, float] = {} if epsilon is None else {"epsilon": epsilon}
    if grafting_type is GraftingType.ADAGRAD:
        if beta2 is not None:
            logger.warning("--grafting-beta2 is ignored with ADAGRAD grafting")
        return AdaGradGraftingConfig(**kwargs)
    if beta2 is not None:
        kwargs["beta2"] = beta2
    if grafting_type is GraftingType.RMSPROP:
        return RMSpropGraftingConfig(**kwargs)
    return AdamGraftingConfig(**kwargs)


def instantiate_root_inv_config(method: RootInvMethod) -> RootInvConfig:
    if method is RootInvMethod.COUPLED_NEWTON:
        return CoupledNewtonConfig()
    if method is RootInvMethod.COUPLED_HIGHER_ORDER:
        return CoupledHigherOrderConfig()
    return DefaultEigenConfig


def instantiate_optimizer(
    args: argparse.Namespace,
    model: nn.Module,
    distributed_config: Optional[DistributedConfig] = None,
) -> torch.optim.Optimizer:
    """torch.optim.SGD, Adam/AdamW, or DistributedShampoo over model.parameters()."""
    shampoo = args.optimizer_type is OptimizerType.DISTRIBUTED_SHAMPOO
    defaults = _SHAMPOO_DEFAULTS if shampoo else _TORCH_OPTIM_DEFAULTS
    lr, beta2, epsilon = (
        defaults[k] if getattr(args, k) is None else getattr(args, k)
        for k in ("lr", "beta2", "epsilon")
    )
    if args.optimizer_type is OptimizerType.SGD:
        return torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=args.momentum,
            dampening=args.dampening,
            weight_decay=args.weight_decay,
            nesterov=args.use_nesterov,
        )
    if args.optimizer_type is OptimizerType.ADAM:
        adam = torch.optim.AdamW if args.use_decoupled_weight_decay else torch.optim.Adam
        return adam(
            model.parameters(),
            lr=lr,
            betas=(args.beta1, beta2),
            eps=epsilon,
            weight_decay=args.weight_decay,
        )
    return DistributedShampoo(
        model.parameters(),
        lr=lr,
        betas=(args.beta1, beta2),
        beta3=args.beta3,
        epsilon=epsilon,
        momentum=args.momentum,
        dampening=args.dampening,
        weight_decay=args.weight_decay,
        max_preconditioner_dim=args.max_preconditioner_dim,
        precondition_frequency=args.precondition_frequency,
        start_preconditioning_step=args.start_preconditioning_step,
        inv_root_override=args.inv_root_override,
        exponent_multiplier=args.exponent_multiplier,
        use_nesterov=args.use_nesterov,
        use_bias_correction=args.use_bias_correction,
        use_decoupled_weight_decay=args.use_decoupled_weight_decay,
        grafting_config=instantiate_grafting_config(
            args.grafting_type, args.grafting_beta2, args.grafting_epsilon
        ),
        use_merge_dims=args.use_merge_dims,
        distributed_config=distributed_config,
        precision_config=PrecisionConfig(
            computation_dtype=args.computation_dtype.value,
            factor_matrix_dtype=args.factor_matrix_dtype.value,
            inv_factor_matrix_dtype=args.inv_factor_matrix_dtype.value,
            filtered_grad_dtype=args.filtered_grad_dtype.value,
            momentum_dtype=args.momentum_dtype.value,
            grafting_state_dtype=args.grafting_state_dtype.value,
        ),
        use_protected_eigh=args.use_protected_eigh,
        track_root_inv_residuals=args.track_root_inv_residuals,
        root_inv_config=instantiate_root_inv_config(args.root_inv_method),
    )


# ------------------------------------------------------------------------------- training
def _all_reduce_sum(values: Sequence[float], device: torch.device) -> List[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def evaluate(
    model: nn.Module, data: ImageData, runtime: Runtime, batch_size: int
) -> Tuple[float, float]:
    """(mean loss, accuracy) on the test set; each rank scores an equal contiguous share (the
    same number of forward passes on every rank, as FSDP requires)."""
    share = len(data) // runtime.world_size
    start = runtime.rank * share
    loss_sum = correct = 0.0
    model.eval()
    for begin in range(start, start + share, batch_size):
        end = min(begin + batch_size, start + share)
        images = normalize(data.images[begin:end].to(runtime.device))
        labels = data.labels[begin:end].to(runtime.device)
        logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
    model.train()
    loss_sum, correct, count = _all_reduce_sum([loss_sum, correct, share], runtime.device)
    return loss_sum / count, correct / count


def train_model(
    args: argparse.Namespace, runtime: Runtime, model: nn.Module, optimizer: torch.optim.Optimizer
) -> Dict[str, float]:
    """Loads the data, resumes from the latest checkpoint if any, trains, and returns the final
    metrics. Every rank calls it; only rank 0 prints, writes metrics and shows progress."""
    train_data, test_data = load_cifar10(args, runtime)
    order = DataOrder(len(train_data), args.batch_size, args.seed, runtime.rank, runtime.world_size)
    total = order.steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    checkpointer = None
    start = 0
    if args.checkpoint_dir is not None:
        checkpointer = Checkpointer(
            args.checkpoint_dir, runtime, model, optimizer, args.keep_checkpoints
        )
        latest = checkpointer.latest()
        if latest is not None:
            start = checkpointer.load(latest, args)
    logger.info(
        "%s: %d training examples, %d steps of %d (%d per rank), %d steps per epoch",
        type(optimizer).__name__,
        len(train_data),
        total,
        args.batch_size,
        order.local_batch,
        order.steps_per_epoch,
    )
    metrics = MetricsLogger(args.metrics_csv, args.tensorboard_dir, runtime.is_main, start)
    progress = Progress(total, start, runtime.is_main, args.progress, args.log_every)
    final: Dict[str, float] = {"step": start}
    model.train()
    try:
        for step in range(start, total):
            epoch = step // order.steps_per_epoch
            indices = order.indices(step)
            images = normalize(train_data.images[indices].to(runtime.device, non_blocking=True))
            labels = train_data.labels[indices].to(runtime.device, non_blocking=True)
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            logits = model(images)
            loss = nn.functional.cross_entropy(logits, labels)
            loss.backward()
            optimizer.step()
            correct = (logits.detach().argmax(1) == labels).sum()
            loss_sum, correct_sum = _all_reduce_sum(
                [loss.item() * len(labels), correct.item()], runtime.device
            )
            elapsed = time.perf_counter() - began
            done = step + 1
            row: Dict[str, Any] = {
                "step": done,
                "epoch": epoch,
                "loss": loss_sum / args.batch_size,
                "accuracy": correct_sum / args.batch_size,
                "lr": optimizer.param_groups[0]["lr"],
                "samples_per_s": args.batch_size / elapsed,
                "step_time_s": elapsed,
            }
            if args.eval and (done % order.steps_per_epoch == 0 or done == total):
                row["test_loss"], row["test_accuracy"] = evaluate(
                    model, test_data, runtime, args.eval_batch_size
                )
            metrics.log(row)
            progress.update(done, row["loss"], row["samples_per_s"])
            final = row
            if checkpointer is not None and (
                done == total or (args.checkpoint_every > 0 and done % args.checkpoint_every == 0)
            ):
                checkpointer.save(done, args)
    finally:
        progress.close()
        metrics.close()
    if runtime.is_main:
        summary = ", ".join(
            f"{k} {final[k]:.4g}"
            for k in ("loss", "accuracy", "test_loss", "test_accuracy")
            if k in final
        )
        logger.info("finished at step %d: %s", final["step"], summary or "nothing to do")
    return final
