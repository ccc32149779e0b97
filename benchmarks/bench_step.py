"""Optimizer step time on CPU: DistributedShampoo against torch.optim.AdamW, same run.

For an MLP, a small convnet and one transformer block, times optimizer.step() (gradients
fixed) and prints the median over --repeats steps, the ratio to AdamW, and the split of
Shampoo's step by phase, measured by wrapping the backend entry points with timers (the
product code carries no instrumentation). No assertions: this prints a table.

    python benchmarks/bench_step.py [--repeats 20] [--threads 2]
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import print_table  # noqa: E402

from distributed_shampoo import _backend  # noqa: E402
from distributed_shampoo.distributed_shampoo import DistributedShampoo  # noqa: E402
from distributed_shampoo.shampoo_types import AdamGraftingConfig  # noqa: E402

PHASES = {
    "gather": "elementwise",
    "moments": "elementwise",
    "finish": "elementwise",
    "scatter": "elementwise",
    "factor_update": "factor update",
    "root_inverse": "root inverse",
    "precondition": "preconditioning",
    # packed factors and roots (issue 11): unpacked around the kernels that need full matrices
    "factor_update_packed": "factor update",
    "sym_unpack": "packing",
    "sym_pack": "packing",
    "packed_commit": "root inverse",
}


def mlp() -> Tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)), torch.randn(64, 512)


def convnet() -> Tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, 256), nn.ReLU(), nn.Linear(256, 10),
    )
    return model, torch.randn(32, 3, 32, 32)


def transformer_block() -> Tuple[nn.Module, torch.Tensor]:
    layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024, batch_first=True)
    return layer, torch.randn(8, 64, 256)


MODELS: Dict[str, Callable[[], Tuple[nn.Module, torch.Tensor]]] = {
    "mlp": mlp,
    "convnet": convnet,
    "transformer block": transformer_block,
}


class PhaseTimer:
    """Wraps the backend's entry points to add up the time spent in each phase."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = defaultdict(float)
        self._originals = {name: getattr(_backend, name) for name in PHASES}

    def __enter__(self) -> "PhaseTimer":
        for name, original in self._originals.items():
            setattr(_backend, name, self._timed(PHASES[name], original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(_backend, name, original)

    def _timed(self, phase: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start

        return wrapper


def time_steps(optimizer: torch.optim.Optimizer, repeats: int, warmup: int = 1) -> List[float]:
    for _ in range(warmup):  # allocations; for Shampoo, up to its first inverse root
        optimizer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--max-preconditioner-dim", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows, phase_rows = [], []
    for name, build in MODELS.items():
        model, batch = build()
        model(batch).float().pow(2).mean().backward()
        params = [p for p in model.parameters() if p.grad is not None]
        n_params = sum(p.numel() for p in params)
        adamw = torch.optim.AdamW(params, lr=1e-3)
        adamw_ms = 1e3 * statistics.median(time_steps(adamw, args.repeats))
        saved = [p.detach().clone() for p in params]
        for frequency in (1, 10, 100):
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            shampoo = DistributedShampoo(
                params, lr=1e-3, betas=(0.9, 0.999), epsilon=1e-8,
                max_preconditioner_dim=args.max_preconditioner_dim, precondition_frequency=frequency,
                start_preconditioning_step=frequency, grafting_config=AdamGraftingConfig(),
            )
            # Warm up through the first inverse-root step, so that the timed steps precondition
            # (the median is a step without a root inverse when frequency > 1; the mean
            # amortises the root steps that fall among the timed ones).
            for _ in range(frequency):
                shampoo.step()
            with PhaseTimer() as timer:
                times = time_steps(shampoo, args.repeats, warmup=0)
            blocks = sum(e.layout.num_blocks for e in shampoo._engines)
            median_ms = 1e3 * statistics.median(times)
            mean_ms = 1e3 * statistics.mean(times)
            rows.append([name, f"{n_params / 1e6:.2f}M", blocks, frequency, median_ms, mean_ms, adamw_ms, median_ms / adamw_ms])
            total = sum(times)
            phases = [1e3 * timer.seconds[p] / args.repeats for p in ("factor update", "root inverse", "preconditioning", "packing", "elementwise")]
            other = 1e3 * total / args.repeats - sum(phases)
            phase_rows.append([name, frequency, *phases, max(other, 0.0)])
    print_table(
        ["model", "params", "blocks", "precond. freq.", "Shampoo median ms", "Shampoo mean ms", "AdamW median ms", "median ratio"],
        rows,
        title=f"Optimizer step time on CPU ({args.threads} threads), median of {args.repeats} steps",
    )
    print_table(
        ["model", "precond. freq.", "factor update ms", "root inverse ms", "preconditioning ms", "unpack/pack ms", "elementwise ms", "other ms"],
        phase_rows,
        title="Shampoo step split by phase (mean ms per step; 'other' = Python, copies, gradient gather)",
    )


if __name__ == "__main__":
    main()
