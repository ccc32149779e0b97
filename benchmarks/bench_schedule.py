"""Per-step times over whole periods, default root schedule against the staggered one (issue 13).

For the models of bench_step.py and the MLP 1024-1024-1024-10 (max_preconditioner_dim=1024,
precondition_frequency=10), times every optimizer.step() (gradients fixed) over --periods
whole periods after start_preconditioning_step, with and without
StaggeredRootScheduleConfig, and prints per model and schedule the median, max and mean step
and max/median; then the largest single factor's root time (one root_inverse call on that
factor alone, as a root step computes it from packed storage: unpack, root_inverse, pack;
timed once after each period, so under the same load as the steps, median of those) divided
by the schedule's own median step, and the issue's target:
max/median <= 1.5 when that ratio is below 0.5, else <= 1 + ratio; mean within 5% of the
default's. The two schedules alternate period by period so that load from other processes on
a shared machine hits both alike, and each step's CPU time (time.process_time; one thread) is
recorded beside its wall time: on a machine shared with other jobs the CPU time is the steadier
measure of the step's own work, so the table reports it, with the wall-clock max/median and
mean ratio in the last columns. The speed of a shared machine also drifts from period to
period, which the whole run's max picks up: so the table also says in how many periods the
target held (each period's max/median against 1 + that period's root / median, or 1.5) and the
median over periods of the period's mean ratio. The step a schedule makes expensive is the same
step of every period, so the table also gives max/median with each step of the period taken as
its median over the periods ("per-step medians"): the schedule's own spike, without the single
slowest sample of a noisy machine; both are checked against the target. The last column
gives the machine's own noise: max/median over the default schedule's steps without roots,
which all do the same work. No assertions: this prints a table.

    python benchmarks/bench_schedule.py [--periods 4] [--threads 1] [--models mlp,...]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import print_table  # noqa: E402
from bench_step import MODELS  # noqa: E402

from distributed_shampoo import _backend  # noqa: E402
from distributed_shampoo.distributed_shampoo import DistributedShampoo  # noqa: E402
from distributed_shampoo.shampoo_types import AdamGraftingConfig, StaggeredRootScheduleConfig  # noqa: E402

FREQUENCY = 10


def mlp_1024() -> Tuple[nn.Module, torch.Tensor]:
    layers = [nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)]
    return nn.Sequential(*layers), torch.randn(64, 1024)


ALL_MODELS: Dict[str, Callable[[], Tuple[nn.Module, torch.Tensor]]] = {**MODELS, "mlp 1024-1024-1024-10": mlp_1024}


def make(model: nn.Module, staggered: bool) -> DistributedShampoo:
    return DistributedShampoo(
        model.parameters(), lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, max_preconditioner_dim=1024,
        precondition_frequency=FREQUENCY, start_preconditioning_step=FREQUENCY,
        grafting_config=AdamGraftingConfig(beta2=0.999, epsilon=1e-8),
        root_schedule_config=StaggeredRootScheduleConfig() if staggered else None,
    )


def largest_root_seconds(optimizer: DistributedShampoo, repeats: int = 7) -> float:
    """The group's largest factor's root alone, as a root step computes it from packed storage
    (after training, so the factor is dense): unpacked into scratch, root_inverse with the
    step's bias correction, packed (symmetric part) into a copy of the roots; median of a few."""
    from distributed_shampoo.utils.shampoo_root_schedule import _chunk_rows, _factor_rows
    from distributed_shampoo.utils.shampoo_scalars import float32_bias_correction

    engine = optimizer._engines[0]
    dims = engine.schedule.factor_dims if engine.schedule is not None else None
    layout = engine.layout
    if dims is None:
        dims = [d for shape in layout.block_shapes for d in shape]
    f = max(range(len(dims)), key=lambda i: (dims[i], -i))
    b = int(layout.factor_block[f])
    chunk = next(c for c in engine.packing.chunks if c.block_start <= b < c.block_stop)
    k = f - int(layout.table.numpy()[b, _backend.BF_FACTOR_INDEX])
    rows = _factor_rows(_chunk_rows(layout, chunk), [(b - chunk.block_start, k)])
    table = _backend.KernelTable(rows, engine.device)
    n = int(dims[f])
    start = int(sum(int(d) * (int(d) + 1) // 2 for d in dims[:f]))  # the factor's packed place
    packed = engine.factors[start : start + n * (n + 1) // 2]
    roots = engine.inv_factors[start : start + n * (n + 1) // 2].clone()
    full, out = engine.packing.scratch(), engine.packing.scratch()
    one = torch.ones(1, dtype=torch.uint8)
    status = torch.zeros(chunk.factor_stop - chunk.factor_start, dtype=torch.int32)
    diagonal = torch.zeros(chunk.factor_stop - chunk.factor_start, dtype=torch.bool)
    bias_correction = float32_bias_correction(engine.beta2, int(engine.step_count) + 1)
    times = []
    for _ in range(repeats):
        begin = time.process_time()
        with _backend.single_threaded_blas():
            _backend.sym_unpack(full, packed, table, one)
            _backend.root_inverse(
                out, full, table, one, epsilon=engine.epsilon,
                exponent_multiplier=engine.exponent_multiplier, bias_correction=bias_correction,
                is_diagonal=diagonal, status_out=status, num_threads=engine.num_threads, **engine.root_kwargs,
            )
            _backend.sym_pack(roots, out, table, average=True)
        times.append(time.process_time() - begin)
    return statistics.median(times)


def target_for(root: float, median: float) -> float:
    """The issue's bound on max/median: 1.5 when the largest root is under half a median step,
    else 1 + root / median."""
    ratio = root / median
    return 1.5 if ratio < 0.5 else 1.0 + ratio


def position_medians(ts: List[float], periods: int) -> List[float]:
    """For each step of the period (0 .. FREQUENCY-1), its median time over the periods."""
    return [statistics.median(ts[p * FREQUENCY + i] for p in range(periods)) for i in range(FREQUENCY)]


def identical_step_spread(ts: List[float], periods: int) -> float:
    """The machine's own noise: max/median over the default schedule's steps that carry no
    root (every step of the period but the root step, the slowest by per-step median), which
    all do the same work."""
    medians = position_medians(ts, periods)
    root_position = max(range(FREQUENCY), key=lambda i: medians[i])
    plain = [ts[p * FREQUENCY + i] for p in range(periods) for i in range(FREQUENCY) if i != root_position]
    return max(plain) / statistics.median(plain)


def schedule_rows(name: str, cpu: Dict[str, List[float]], wall: Dict[str, List[float]],
                  roots: List[float], periods: int) -> List[List[str]]:
    root = statistics.median(roots)
    base_mean = statistics.mean(cpu["default"])
    base_wall = statistics.mean(wall["default"])
    rows = []
    for key, ts in cpu.items():
        med, top, mean = statistics.median(ts), max(ts), statistics.mean(ts)
        target = target_for(root, med)  # against this schedule's own median step
        typical_top = max(position_medians(ts, periods))
        mean_ok = mean <= 1.05 * base_mean
        ws = wall[key]
        # period by period (each with the root timed after it): the machine's speed drifts
        # between periods on a shared machine, which the whole-run max picks up
        within, mean_ratios = 0, []
        for p in range(periods):
            part, part_default = ts[p * FREQUENCY : (p + 1) * FREQUENCY], cpu["default"][p * FREQUENCY : (p + 1) * FREQUENCY]
            part_med = statistics.median(part)
            within += max(part) / part_med <= target_for(roots[p], part_med)
            mean_ratios.append(statistics.mean(part) / statistics.mean(part_default))
        staggered = key != "default"
        rows.append([name, key, f"{med * 1e3:.1f}", f"{top * 1e3:.1f}", f"{mean * 1e3:.1f}",
                     f"{top / med:.2f}", f"{typical_top / med:.2f}", f"{mean / base_mean:.3f}",
                     f"{root * 1e3:.0f}", f"{root / med:.2f}", f"{target:.2f}",
                     ("yes" if typical_top / med <= target and mean_ok else "NO") if staggered else "-",
                     ("yes" if top / med <= target and mean_ok else "NO") if staggered else "-",
                     f"{within}/{periods}" if staggered else "-",
                     f"{statistics.median(mean_ratios):.3f}" if staggered else "-",
                     f"{max(ws) / statistics.median(ws):.2f}", f"{statistics.mean(ws) / base_wall:.3f}",
                     f"{identical_step_spread(ts, periods):.2f}" if not staggered else "-"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--periods", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(ALL_MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model, batch = ALL_MODELS[name]()
        model(batch).float().pow(2).mean().backward()
        optimizers = {"default": make(model, False), "staggered": make(model, True)}
        for opt in optimizers.values():  # up to and including the start step (every root)
            for _ in range(FREQUENCY):
                opt.step()
        cpu: Dict[str, List[float]] = {k: [] for k in optimizers}
        wall: Dict[str, List[float]] = {k: [] for k in optimizers}
        roots: List[float] = []
        for period in range(args.periods):
            # alternate which schedule goes first, so that neither always follows the other
            order = list(optimizers.items())[:: 1 if period % 2 == 0 else -1]
            for key, opt in order:
                for _ in range(FREQUENCY):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    opt.step()
                    cpu[key].append(time.process_time() - start_cpu)
                    wall[key].append(time.perf_counter() - start)
            # the root alone between periods: under the same load of the machine as the steps
            roots.append(largest_root_seconds(optimizers["default"], repeats=1))
        rows += schedule_rows(name, cpu, wall, roots, args.periods)
    print(f"precondition_frequency={FREQUENCY}, {args.periods} periods, {args.threads} thread(s); "
          "CPU ms per step; root = the largest factor's root alone, from packed storage to packed storage")
    print_table(["model", "schedule", "median", "max", "mean", "max/median",
                 "max/median (per-step medians)", "mean/default", "root", "root/median",
                 "target max/median", "met (per-step medians)", "met (raw max)", "periods within target",
                 "per-period mean/default (median)", "wall max/median", "wall mean/default",
                 "noise: max/median of identical steps"], rows)


if __name__ == "__main__":
    main()
