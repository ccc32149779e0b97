"""CIFAR-10 for the examples: the python-version batch reader, the torchvision path, a
synthetic stand-in, the message saying how to get the data, normalisation, and the
step-indexed data order that makes runs resumable and rank-count independent."""

import argparse
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from runtime_setup import Runtime
from torch import nn

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
