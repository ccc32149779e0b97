"""Convergence on scikit-learn's bundled 8x8 digits (offline): the same small convnet trained
with SGD (momentum 0.9), AdamW, DistributedShampoo (Adam grafting) and eigenvalue-corrected
Shampoo (SOAP) for the same number of steps, over 3 seeds.

Prints, per optimizer: the steps it needs to reach AdamW's final training loss, the final
training loss, train and test accuracy, and the time per step (forward, backward and
optimizer step; wall clock, and CPU time, which a busy machine disturbs less); writes a PNG
of the training loss against the step (mean over seeds, min-max band).

Fairness: every optimizer uses standard settings (below) and gets the same tiny learning-rate
sweep: 4 values, each trained once on a separate sweep seed, the lowest final training loss
wins. The reported runs then use other seeds. Nothing else is tuned.

    pip install -e ".[benchmarks]"
    python benchmarks/convergence.py [--steps 200] [--output benchmarks/convergence.png]

With --staggered-roots, also trains Shampoo with StaggeredRootScheduleConfig (issue 13) at the
learning rate the default-schedule Shampoo chose (the schedule is the only difference), and
reports it beside the others; the figure then goes to --output (default
convergence_staggered.png, so the committed convergence.png stays the default figure).
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import print_table  # noqa: E402

from distributed_shampoo.distributed_shampoo import DistributedShampoo  # noqa: E402
from distributed_shampoo.shampoo_types import AdamGraftingConfig, DefaultSOAPConfig, StaggeredRootScheduleConfig  # noqa: E402

BATCH = 64
WEIGHT_DECAY = 1e-4  # decoupled for AdamW and Shampoo, L2 for SGD
SWEEP_SEED = 100  # the learning-rate sweep never sees the reported seeds 0, 1, 2


def sgd(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY)


def adamw(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)


def shampoo(params, lr: float, schedule: Optional[StaggeredRootScheduleConfig] = None) -> torch.optim.Optimizer:
    # README's AdamW replacement: Adam grafting, same betas and epsilon, inverse roots every
    # 10 steps from step 10 (one root computation per 10 steps keeps the cost moderate).
    return DistributedShampoo(
        params,
        lr=lr,
        betas=(0.9, 0.999),
        epsilon=1e-12,
        weight_decay=WEIGHT_DECAY,
        use_decoupled_weight_decay=True,
        precondition_frequency=10,
        start_preconditioning_step=10,
        grafting_config=AdamGraftingConfig(beta2=0.999, epsilon=1e-8),
        root_schedule_config=schedule,
    )


def soap(params, lr: float) -> torch.optim.Optimizer:
    # Eigenvalue-corrected Shampoo with the QR warm start (SOAP, arXiv 2409.11321), as the
    # reference's README suggests: AdamW's betas and weight decay, no grafting; eigenbases
    # every 10 steps from step 10 (Adam in the original coordinates until then).
    return DistributedShampoo(
        params,
        lr=lr,
        betas=(0.9, 0.999),
        epsilon=1e-12,
        weight_decay=WEIGHT_DECAY,
        use_decoupled_weight_decay=True,
        precondition_frequency=10,
        start_preconditioning_step=10,
        preconditioner_config=DefaultSOAPConfig,
    )


def shampoo_staggered(params, lr: float) -> torch.optim.Optimizer:
    return shampoo(params, lr, StaggeredRootScheduleConfig())


SHAMPOO = "Shampoo (Adam grafting)"
STAGGERED = "Shampoo, staggered roots"


# name: (factory, learning rates swept); the grids are each optimizer's usual range.
OPTIMIZERS: Dict[str, Tuple[Callable, Sequence[float]]] = {
    "SGD (momentum 0.9)": (sgd, (0.01, 0.03, 0.1, 0.3)),
    "AdamW": (adamw, (1e-3, 3e-3, 1e-2, 3e-2)),
    "Shampoo (Adam grafting)": (shampoo, (1e-3, 3e-3, 1e-2, 3e-2)),
    "SOAP (eigenvalue-corrected)": (soap, (1e-3, 3e-3, 1e-2, 3e-2)),
}
BASELINE = "AdamW"


class DigitsNet(nn.Module):
    """(B, 1, 8, 8) -> 10 logits: two 3x3 convs (16, 32 channels), 2x2 max-pool, an MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_data() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised digits, a fixed stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    x_train = torch.tensor(x_train, dtype=torch.float32).unsqueeze(1)
    x_test = torch.tensor(x_test, dtype=torch.float32).unsqueeze(1)
    mean, std = x_train.mean(), x_train.std()
    return (
        (x_train - mean) / std,
        torch.tensor(y_train),
        (x_test - mean) / std,
        torch.tensor(y_test),
    )


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
    logits = model(x)
    return nn.functional.cross_entropy(logits, y).item(), (
        logits.argmax(1) == y
    ).float().mean().item()


def train(
    factory: Callable,
    lr: float,
    seed: int,
    steps: int,
    eval_every: int,
    data: Tuple[torch.Tensor, ...],
) -> Dict[str, object]:
    """Full-training-set loss every eval_every steps, final accuracies, time per step."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = DigitsNet()
    optimizer = factory(model.parameters(), lr)
    order = torch.Generator().manual_seed(seed)
    permutation, position = torch.randperm(len(y_train), generator=order), 0
    curve: List[Tuple[int, float]] = [(0, loss_and_accuracy(model, x_train, y_train)[0])]
    wall = cpu = 0.0
    for step in range(1, steps + 1):
        if position + BATCH > len(permutation):
            permutation, position = torch.randperm(len(y_train), generator=order), 0
        batch = permutation[position : position + BATCH]
        position += BATCH
        began, began_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
        optimizer.step()
        wall += time.perf_counter() - began
        cpu += time.process_time() - began_cpu
        if step % eval_every == 0 or step == steps:
            curve.append((step, loss_and_accuracy(model, x_train, y_train)[0]))
    return {
        "curve": curve,
        "train_accuracy": loss_and_accuracy(model, x_train, y_train)[1],
        "test_accuracy": loss_and_accuracy(model, x_test, y_test)[1],
        "ms_per_step": 1000 * wall / steps,
        "cpu_ms_per_step": 1000 * cpu / steps,
    }


def mean_curve(
    runs: List[Dict[str, object]],
) -> Tuple[List[int], List[float], List[float], List[float]]:
    steps = [s for s, _ in runs[0]["curve"]]
    values = [[v for _, v in run["curve"]] for run in runs]
    columns = list(zip(*values))
    return (
        steps,
        [statistics.fmean(c) for c in columns],
        [min(c) for c in columns],
        [max(c) for c in columns],
    )


def steps_to_reach(steps: List[int], losses: List[float], target: float) -> str:
    for step, loss in zip(steps, losses):
        if loss <= target:
            return str(step)
    return f"> {steps[-1]}"


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    values = [scale * v for v in values]
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def plot(
    curves: Dict[str, Tuple[List[int], List[float], List[float], List[float]]],
    output: str,
    steps: int,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.8), dpi=90)
    for name, (x, mean, low, high) in curves.items():
        (line,) = ax.plot(x, mean, label=name, linewidth=1.6)
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_yscale("log")
    ax.set_xlabel("step (batch 64)")
    ax.set_ylabel("training loss (full training set)")
    ax.set_title(f"8x8 digits convnet, {steps} steps, mean of 3 seeds (band: min-max)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sweep-steps", type=int, default=None, help="default: --steps")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: steadier timings on a shared machine)",
    )
    parser.add_argument("--output", default=None, help="default: benchmarks/convergence.png")
    parser.add_argument(
        "--staggered-roots", action="store_true",
        help="also train Shampoo with the staggered root schedule (StaggeredRootScheduleConfig)",
    )
    args = parser.parse_args(argv)
    if args.output is None:
        figure = "convergence_staggered.png" if args.staggered_roots else "convergence.png"
        args.output = str(Path(__file__).resolve().parent / figure)
    optimizers = dict(OPTIMIZERS)
    if args.staggered_roots:
        optimizers[STAGGERED] = (shampoo_staggered, ())
    torch.set_num_threads(args.threads)
    data = load_data()
    print(
        f"digits: {len(data[1])} train / {len(data[3])} test images, batch {BATCH}, "
        f"{args.steps} steps, seeds 0..{args.seeds - 1}, torch threads {torch.get_num_threads()}"
    )

    chosen: Dict[str, float] = {}
    sweep_rows = []
    for name, (factory, lrs) in OPTIMIZERS.items():
        finals = {
            lr: train(
                factory, lr, SWEEP_SEED, args.sweep_steps or args.steps, args.eval_every, data
            )["curve"][-1][1]
            for lr in lrs
        }
        finals = {lr: (loss if math.isfinite(loss) else math.inf) for lr, loss in finals.items()}
        chosen[name] = min(finals, key=finals.get)
        sweep_rows.append(
            [name] + [f"{lr:g}: {loss:.4f}" for lr, loss in finals.items()] + [f"{chosen[name]:g}"]
        )
    print_table(
        ["optimizer"] + [f"lr {i + 1}" for i in range(len(sweep_rows[0]) - 2)] + ["chosen"],
        sweep_rows,
        title=f"learning-rate sweep (seed {SWEEP_SEED}; final training loss)",
    )

    if args.staggered_roots:
        chosen[STAGGERED] = chosen[SHAMPOO]  # the same learning rate: only the schedule differs
    results = {
        name: [
            train(optimizers[name][0], chosen[name], seed, args.steps, args.eval_every, data)
            for seed in range(args.seeds)
        ]
        for name in optimizers
    }
    curves = {name: mean_curve(runs) for name, runs in results.items()}
    target = curves[BASELINE][1][-1]
    rows = []
    for name, runs in results.items():
        steps, mean, _, _ = curves[name]
        rows.append(
            [
                name,
                f"{chosen[name]:g}",
                steps_to_reach(steps, mean, target),
                mean_std([run["curve"][-1][1] for run in runs], digits=4),
                mean_std([run["train_accuracy"] for run in runs], 100, 1),
                mean_std([run["test_accuracy"] for run in runs], 100, 1),
                mean_std([run["ms_per_step"] for run in runs], digits=2),
                mean_std([run["cpu_ms_per_step"] for run in runs], digits=2),
            ]
        )
    print_table(
        [
            "optimizer",
            "lr",
            f"steps to AdamW's final loss ({target:.4f})",
            "final train loss",
            "train acc %",
            "test acc %",
            "wall ms / step",
            "CPU ms / step",
        ],
        rows,
        title=f"{args.steps} steps, mean ± std over {args.seeds} seeds (loss on the full "
        f"training set, checked every {args.eval_every} steps)",
    )
    if args.staggered_roots:
        # the schedule's effect against the default schedule's seed-to-seed spread
        per_seed = [
            [name]
            + [f"{run['curve'][-1][1]:.4f}" for run in results[name]]
            + [steps_to_reach([s for s, _ in run["curve"]], [v for _, v in run["curve"]], target)
               for run in results[name]]
            for name in (SHAMPOO, STAGGERED)
        ]
        print_table(
            ["optimizer"] + [f"final loss seed {i}" for i in range(args.seeds)]
            + [f"steps to target seed {i}" for i in range(args.seeds)],
            per_seed,
            title="default against staggered root schedule, per seed",
        )
    plot(curves, args.output, args.steps)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
