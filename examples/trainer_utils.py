"""Shared by the CIFAR-10 examples: command line, CIFAR-10 data, the convnet, the optimizer
factory, and a training loop with a progress bar, metrics and resumable checkpoints.

Each example script only decides how the model is wrapped (nothing, DDP, FSDP, HSDP, FSDP2)
and which ``distributed_config`` DistributedShampoo gets; everything else lives here, so the
five scripts train the same model on the same data in the same order.
"""

import argparse
import csv
import enum
import logging
import os
import pickle
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
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


# -------------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(args: argparse.Namespace, distributed: bool) -> Runtime:
    """Picks the device, and for the multi-process examples joins torchrun's process group
    (nccl on CUDA, gloo on CPU)."""
    script = Path(sys.argv[0]).name
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # The optimizer's per-block INFO lines are noise here (its warnings still show), and so
    # is torch.distributed's deprecation chatter about its own internals.
    logging.getLogger("distributed_shampoo").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    for message in (
        "`_get_pg_default_device` will be deprecated",
        "Multiple backends are registered",
        "torch.distributed is disabled",
    ):
        warnings.filterwarnings("ignore", message=message)
    device_type = args.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if distributed:
        if "RANK" not in os.environ:
            raise SystemExit(
                f"{script} runs several processes: start it with\n"
                f"  torchrun --standalone --nproc_per_node=N {script} ..."
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, device_id=device if device.type == "cuda" else None
        )
    elif world > 1:
        raise SystemExit(
            f"{script} is the single-process example but was started with WORLD_SIZE={world}; "
            "use --nproc_per_node=1, or ddp_cifar10_example.py for several processes."
        )
    logger.info(
        "device %s, %d process(es)%s",
        device,
        world,
        f", backend {dist.get_backend()}" if dist.is_initialized() else "",
    )
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, device=device)


def set_seed(seed: int) -> None:
    """The same seed on every rank: FSDP and FSDP2 keep each rank's shard of its own init."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- data
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
# Per-channel statistics of the CIFAR-10 training set, for input normalisation.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class ImageData:
    images: torch.Tensor  # (N, 3, 32, 32) uint8, normalised per batch on the device
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


def read_cifar10_batch(path: Union[str, Path]) -> ImageData:
    """One file of the python version of CIFAR-10: a pickled dict with b"data", uint8 of shape
    (N, 3072) (the 1024 red, then green, then blue values of each 32x32 image, row-major),
    and b"labels", N ints in [0, 10)."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{path}: not a CIFAR-10 batch (data {data.shape}, labels {labels.shape})")
    return ImageData(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels))


def find_cifar10_folder(root: Union[str, Path]) -> Optional[Path]:
    for folder in (Path(root) / CIFAR10_FOLDER, Path(root)):
        if all((folder / name).is_file() for name in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES):
            return folder
    return None


def read_cifar10(root: Union[str, Path], train: bool) -> ImageData:
    folder = find_cifar10_folder(root)
    if folder is None:
        raise FileNotFoundError(missing_cifar10_message(root))
    parts = [
        read_cifar10_batch(folder / name)
        for name in (CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES)
    ]
    return ImageData(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def missing_cifar10_message(root: Union[str, Path]) -> str:
    try:
        import torchvision  # noqa: F401

        download = "  * add --download (torchvision downloads it into --data-path)\n"
    except ImportError:
        download = "  * --download, after `pip install torchvision`\n"
    return (
        f"CIFAR-10 not found: expected {Path(root) / CIFAR10_FOLDER}/ holding "
        f"{', '.join(CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES)} (the python version).\n"
        "Get it with one of:\n"
        f"  * mkdir -p {root} && curl -L {CIFAR10_URL} | tar -xz -C {root}\n"
        f"{download}"
        "  * --synthetic: a random CIFAR-10-shaped dataset, for smoke runs"
    )


def synthetic_cifar10(num_train: int, seed: int) -> Tuple[ImageData, ImageData]:
    """CIFAR-10-shaped noise around one smooth random prototype image per class (a 4x4 image
    upsampled: colour and layout a convnet can pick up), so that the loss falls as on real
    data; the same on every rank (seeded by --seed only)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(10, 3, 4, 4, generator=g) * 255
    prototypes = nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear")

    def make(n: int) -> ImageData:
        labels = torch.randint(0, 10, (n,), generator=g)
        noise = torch.randn(n, 3, 32, 32, generator=g) * 80
        images = (0.5 * prototypes[labels] + 64 + noise).clamp_(0, 255).to(torch.uint8)
        return ImageData(images, labels)

    return make(num_train), make(max(num_train // 4, 1))


def load_cifar10(args: argparse.Namespace, runtime: Runtime) -> Tuple[ImageData, ImageData]:
    """(train, test). torchvision reads (and with --download fetches) the data when it is
    installed; otherwise the built-in reader of the python-version batches does."""
    if args.synthetic:
        return synthetic_cifar10(args.synthetic_size, args.seed)
    try:
        import torchvision
    except ImportError:
        torchvision = None
    if torchvision is not None and args.download:
        if runtime.is_main:  # one rank downloads, the others wait for it
            torchvision.datasets.CIFAR10(args.data_path, train=True, download=True)
            torchvision.datasets.CIFAR10(args.data_path, train=False, download=True)
        if dist.is_initialized():
            dist.barrier()
    elif args.download:
        raise SystemExit(missing_cifar10_message(args.data_path))
    folder = find_cifar10_folder(args.data_path)
    if folder is None:
        raise SystemExit(missing_cifar10_message(args.data_path))
    # torchvision only reads (and checksums) DATA_PATH/cifar-10-batches-py/.
    if torchvision is None or folder != Path(args.data_path) / CIFAR10_FOLDER:
        return read_cifar10(args.data_path, train=True), read_cifar10(args.data_path, train=False)
    splits = []
    for train in (True, False):
        ds = torchvision.datasets.CIFAR10(args.data_path, train=train, download=False)
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        splits.append(ImageData(images, torch.tensor(ds.targets, dtype=torch.int64)))
    return splits[0], splits[1]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) uint8 -> float32, standardised per channel."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


class DataOrder:
    """Which examples each rank sees at each step. The global batch of step s is a slice of a
    permutation seeded by (seed, epoch), split evenly over the ranks: the order depends only
    on the step, so a resumed run continues exactly where it stopped, and N ranks see the
    same global batches as one process."""

    def __init__(self, num_examples: int, global_batch: int, seed: int, rank: int, world: int):
        if global_batch % world:
            raise SystemExit(f"--batch-size {global_batch} must be divisible by the {world} ranks")
        self.steps_per_epoch = num_examples // global_batch
        if self.steps_per_epoch == 0:
            raise SystemExit(f"--batch-size {global_batch} exceeds the {num_examples} examples")
        self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
        self.local_batch = global_batch // world
        self.offset = rank * self.local_batch
        self._epoch, self._permutation = -1, torch.empty(0, dtype=torch.int64)

    def indices(self, step: int) -> torch.Tensor:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._permutation = epoch, torch.randperm(self.num_examples, generator=g)
        start = index * self.global_batch + self.offset
        return self._permutation[start : start + self.local_batch]


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


# ---------------------------------------------------------------------------- checkpoints
# Wrapper prefixes that named_parameters() shows but the model's state-dict keys do not:
# stripping them keys the optimizer state like get_model_state_dict() keys the weights.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def named_parameters(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """model.named_parameters() with DDP's module. and FSDP's wrapper prefixes removed."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    for name, param in model.named_parameters():
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        yield name, param


class Checkpointer:
    """torch.distributed.checkpoint checkpoints in DIR/step_XXXXXXXX/: the model (sharded as
    the model is), the optimizer (DistributedShampoo.distributed_state_dict, or torch's
    optimizer state dict), the step, and each rank's RNG state. A checkpoint counts once its
    .metadata exists: DCP writes that last, after every rank has written its data.
    torch.distributed.checkpoint is imported only here: it pulls in DTensor (~1.5 s)."""

    def __init__(
        self,
        directory: str,
        runtime: Runtime,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        keep: int,
    ):
        self.directory, self.runtime, self.keep = Path(directory), runtime, keep
        self.model, self.optimizer = model, optimizer

    def _state(self, step: int, args: argparse.Namespace) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        if isinstance(self.optimizer, DistributedShampoo):
            optim = self.optimizer.distributed_state_dict(key_to_param=named_parameters(self.model))
        else:
            optim = get_optimizer_state_dict(self.model, self.optimizer)
        progress = {
            "step": torch.tensor(step),
            "seed": torch.tensor(args.seed),
            "batch_size": torch.tensor(args.batch_size),
        }
        return {"model": get_model_state_dict(self.model), "optim": optim, "progress": progress}

    def latest(self) -> Optional[Path]:
        found = sorted(self.directory.glob("step_*/.metadata")) if self.directory.is_dir() else []
        choice = [str(found[-1].parent) if found else None]
        if dist.is_initialized():  # rank 0 decides, so every rank loads the same one
            dist.broadcast_object_list(choice, src=0)
        return None if choice[0] is None else Path(choice[0])

    def save(self, step: int, args: argparse.Namespace) -> None:
        import torch.distributed.checkpoint as dcp

        path = self.directory / f"step_{step:08d}"
        (path / "rng").mkdir(parents=True, exist_ok=True)
        rng = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }
        if self.runtime.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.runtime.device)
        torch.save(rng, path / "rng" / f"rank_{self.runtime.rank}.pt")
        dcp.save(self._state(step, args), checkpoint_id=str(path))
        if self.runtime.is_main and self.keep > 0:
            for old in sorted(self.directory.glob("step_*/.metadata"))[: -self.keep]:
                shutil.rmtree(old.parent, ignore_errors=True)
        logger.info("saved checkpoint %s", path)

    def load(self, path: Path, args: argparse.Namespace) -> int:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = self._state(0, args)
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(self.model, state["model"])
        if isinstance(self.optimizer, DistributedShampoo):
            self.optimizer.load_distributed_state_dict(
                state["optim"], key_to_param=named_parameters(self.model)
            )
        else:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        progress = state["progress"]
        if int(progress["seed"]) != args.seed or int(progress["batch_size"]) != args.batch_size:
            logger.warning(
                "the checkpoint was written with --seed %d --batch-size %d: the data "
                "order from here on differs from that run's",
                int(progress["seed"]),
                int(progress["batch_size"]),
            )
        rng_file = path / "rng" / f"rank_{self.runtime.rank}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            if "cuda" in rng and self.runtime.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.runtime.device)
        else:
            logger.warning(
                "%s has no RNG state for rank %d (another world size?)", path, self.runtime.rank
            )
        step = int(progress["step"])
        logger.info("resumed from %s at step %d", path, step)
        return step


# -------------------------------------------------------------------- progress and metrics
class Progress:
    """tqdm bar on rank 0 (step, loss, throughput); plain lines when tqdm is missing."""

    def __init__(self, total: int, initial: int, enabled: bool, use_tqdm: bool, log_every: int):
        self.total, self.enabled, self.log_every, self.bar = total, enabled, log_every, None
        if enabled and use_tqdm:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, samples_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:.0f}")
        elif self.enabled and (step % self.log_every == 0 or step == self.total):
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  {samples_per_s:.0f} samples/s",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLogger:
    """One CSV row per step (rank 0), mirrored to TensorBoard when it is available. On resume
    the rows after the checkpoint's step are dropped, so the file reads as one run."""

    FIELDS = (
        "step",
        "epoch",
        "loss",
        "accuracy",
        "lr",
        "samples_per_s",
        "step_time_s",
        "test_loss",
        "test_accuracy",
    )

    def __init__(
        self,
        csv_path: Optional[str],
        tensorboard_dir: Optional[str],
        enabled: bool,
        start_step: int,
    ):
        self.file, self.writer, self.tensorboard = None, None, None
        if not enabled:
            return
        if csv_path is not None:
            path = Path(csv_path)
            kept: List[Dict[str, str]] = []
            if start_step > 0 and path.is_file():
                with open(path, newline="") as f:
                    kept = [row for row in csv.DictReader(f) if int(row["step"]) <= start_step]
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "w", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=self.FIELDS)
            self.writer.writeheader()
            self.writer.writerows(kept)
            self.file.flush()
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(tensorboard_dir, purge_step=start_step + 1)
            except ImportError:
                logger.info("tensorboard is not installed: --tensorboard-dir is ignored")

    def log(self, row: Dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.writerow({k: row.get(k, "") for k in self.FIELDS})
            self.file.flush()
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self.tensorboard.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


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
