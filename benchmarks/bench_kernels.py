"""Parallelism across blocks in the C kernels: factor update, inverse root (eigen) and
preconditioning, each over a few block mixes, with num_threads = 1, 2, ... (the first two
share out single factors, preconditioning whole blocks; SciPy's BLAS is held to one thread,
as in the optimizer step).

Prints the median ms per call (--rounds samples, each the mean over --sample-seconds of
calls) and the speed-up over one thread; a second table sweeps small tables to show where
threads stop paying (csrc/core/parallel.h's SHAMPOO_PARALLEL_MIN_COST). Samples during which
another process used the CPU are taken again (Linux). No assertions: this prints tables.

    python benchmarks/bench_kernels.py [--rounds 5] [--threads 1 2 3] [--dtype float32]
"""

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _table import print_table  # noqa: E402
from block_tables import Layout, make_layout  # noqa: E402

from distributed_shampoo import _backend  # noqa: E402

# Block mixes: parameter shapes and max_preconditioner_dim.
MIXES: Dict[str, Tuple[List[Tuple[int, ...]], int]] = {
    # an MLP's matrices cut at 128: 100 equal 128 x 128 blocks plus small edges
    "mlp 512-1024-1024-10 @128": ([(1024, 512), (1024,), (1024, 1024), (1024,), (10, 1024), (10,)], 128),
    # a convnet: 4-d kernels, biases, a linear head; blocks of very different cost
    "convnet mixed @256": ([(32, 3, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 64, 3, 3), (128,),
                            (256, 1024), (256,), (10, 256), (10,)], 256),
    # one large block among many small ones: balance depends on taking the large one first
    "1 x 512 + 60 x 32": ([(512, 512)] + [(32, 32)] * 60, 512),
    # two large blocks: at most 2x, from 2 threads
    "2 x 768": ([(768, 768), (768, 768)], 768),
}

ROOT_CONFIG = {
    "method": "eigen", "epsilon": 1e-12, "exponent_multiplier": 1.0, "bias_correction": 1.0,
    "make_positive_semidefinite": True, "retry_double_precision": True, "max_iterations": 100,
    "tolerance": 1e-6, "rel_epsilon": 0.0, "order": 3,
}


class Problem:
    """Inputs and outputs of the three kernels for one layout."""

    def __init__(self, lay: Layout, dtype: type) -> None:
        rng = np.random.default_rng(0)
        self.lay = lay
        self.table = lay.table
        self.active = np.ones(len(lay.blocks), np.uint8)
        self.grads = rng.standard_normal(lay.block_numel).astype(dtype)
        self.factors = np.zeros(lay.factor_numel, dtype)
        _backend.factor_update(self.factors, self.factors, self.grads, self.table, self.active, 1.0)
        for b in range(len(lay.blocks)):  # full-rank, well-conditioned factors
            for F in lay.factor_views(self.factors, b):
                F += np.eye(len(F), dtype=dtype) * (1.0 + np.trace(F) / max(len(F), 1))
        self.work = self.factors.copy()
        self.roots = np.zeros_like(self.factors)
        self.is_diagonal = np.zeros(lay.factor_count, np.uint8)
        self.status = np.zeros(lay.factor_count, np.int32)
        self.out = np.zeros_like(self.grads)

    def kernels(self) -> Dict[str, Callable[[int], None]]:
        def factor_update(t: int) -> None:
            _backend.factor_update(self.work, self.factors, self.grads, self.table, self.active,
                                   0.999, num_threads=t)

        def root_inverse(t: int) -> None:
            _backend.root_inverse(self.roots, self.factors, self.table, self.active,
                                  **ROOT_CONFIG, is_diagonal=self.is_diagonal,
                                  status_out=self.status, num_threads=t)

        def precondition(t: int) -> None:
            _backend.precondition(self.out, self.grads, self.roots, self.table, self.active,
                                  num_threads=t)

        return {"factor_update": factor_update, "root_inverse": root_inverse,
                "precondition": precondition}


def _busy_seconds() -> Optional[float]:
    """CPU seconds all processes have used (Linux /proc/stat), or None where unavailable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:8]]
    except OSError:
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def _own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Sampler:
    """One sample = the mean time per call over >= min_seconds of calls. On a shared machine
    a sample during which other processes used more than MAX_OTHER_CPU seconds of CPU is
    thrown away and taken again (counted in `discarded`), so the figures are for an idle
    machine; /proc/stat counts in clock ticks, hence the tolerance."""

    MAX_OTHER_CPU = 0.04

    def __init__(self, min_seconds: float) -> None:
        self.min_seconds = min_seconds
        self.discarded = 0

    def sample(self, fn: Callable[[], None]) -> float:
        while True:
            busy0, own0, start = _busy_seconds(), _own_seconds(), time.perf_counter()
            calls = 0
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= self.min_seconds:
                    break
            busy1 = _busy_seconds()
            if busy0 is None or busy1 is None:
                return elapsed / calls
            if (busy1 - busy0) - (_own_seconds() - own0) <= self.MAX_OTHER_CPU:
                return elapsed / calls
            self.discarded += 1
            time.sleep(0.5)

    def medians(self, fn: Callable[[int], None], threads: Sequence[int], rounds: int) -> Dict[int, float]:
        """Median ms per call for each thread count, the counts taken in turn each round so
        that a change on the machine hits all of them alike."""
        for t in threads:
            fn(t)  # warm-up: first touch of the outputs, BLAS buffers
        samples: Dict[int, List[float]] = {t: [] for t in threads}
        for _ in range(rounds):
            for t in threads:
                samples[t].append(1e3 * self.sample(lambda t=t: fn(t)))
        return {t: statistics.median(v) for t, v in samples.items()}


def mixes_table(sampler: Sampler, threads: Sequence[int], rounds: int, dtype: type) -> None:
    rows = []
    for mix, (shapes, max_dim) in MIXES.items():
        problem = Problem(make_layout(shapes, max_dim), dtype)
        for name, fn in problem.kernels().items():
            ms = sampler.medians(fn, threads, rounds)
            base = ms[threads[0]]
            rows.append([name, mix, len(problem.lay.blocks),
                         *[v for t in threads for v in (ms[t], base / ms[t])]])
    print_table(
        ["kernel", "block mix", "blocks", *[h for t in threads for h in (f"{t} thr ms", f"x{t}")]],
        rows, title=f"Kernel time, {np.dtype(dtype).name}, median ms (speed-up vs {threads[0]} thread)",
    )


def estimated_us(kernel: str, n: int, count: int) -> float:
    """The kernels' own cost estimate (csrc/core/*.inc, *_cost) of count n x n blocks, in us."""
    per_factor = {
        "factor_update": 500 + 0.03 * n**3 + n * n,
        "root_inverse": 4000 + 100 * n * n + 0.07 * n**3,
        "precondition": 500 + 0.04 * n**3,
    }[kernel]
    return 2 * count * per_factor / 1e3


def threshold_table(sampler: Sampler, rounds: int, dtype: type) -> None:
    """Small tables of n x n blocks around SHAMPOO_PARALLEL_MIN_COST: the estimate against the
    time taken, and whether 2 threads pay."""
    rows = []
    sizes = [(4, 8), (8, 8), (16, 8), (24, 8), (32, 8), (48, 8), (64, 8), (96, 8), (128, 8)]
    for kernel in ("factor_update", "root_inverse", "precondition"):
        for n, count in sizes:
            fn = Problem(make_layout([(n, n)] * count, n), dtype).kernels()[kernel]
            ms = sampler.medians(fn, (1, 2), rounds)
            rows.append([kernel, f"{count} x {n}x{n}", estimated_us(kernel, n, count),
                         1e3 * ms[1], 1e3 * ms[2], ms[1] / ms[2]])
    print_table(["kernel", "blocks", "estimate us", "1 thr us", "2 thr us", "x2"], rows,
                title=f"Small tables: one thread per {_backend.PARALLEL_MIN_COST / 1e3:.0f} us of "
                      "estimated work (PARALLEL_MIN_COST)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="samples per median")
    parser.add_argument("--sample-seconds", type=float, default=0.2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--skip-small", action="store_true", help="skip the small-table sweep")
    args = parser.parse_args()
    dtype = np.float32 if args.dtype == "float32" else np.float64
    sampler = Sampler(args.sample_seconds)
    with _backend.single_threaded_blas():
        mixes_table(sampler, args.threads, args.rounds, dtype)
        if not args.skip_small:
            threshold_table(sampler, args.rounds, dtype)
    print(f"\n{sampler.discarded} samples taken again: other processes were using the CPU")


if __name__ == "__main__":
    main()
