"""Shampoo on the GPU: step time against fused AdamW, step split by phase, batched roots.

  (a) For the models of bench_step.py (and larger ones with --large), times optimizer.step()
      (gradients fixed) with CUDA events, each step on an idle GPU so that host launch
      overhead counts, after a warm-up through the first inverse root; prints the median and
      mean over --repeats steps and the ratio to torch.optim.AdamW(fused=True), same run.
  (b) The same steps with every _backend entry point wrapped by torch.cuda.synchronize()
      before and after (as bench_step.py wraps them with timers): time per phase. The syncs
      add their own cost, so these steps are slower than in (a); the split is what counts.
  (c) root_inverse on a KernelTable of `count` order-1 blocks of dim n, i.e. count n x n SPD
      factors in one call, against a Python loop (eigh, PSD shift + epsilon, pow(-1/4),
      Q diag Q^T per factor) and the same in one batched torch.linalg.eigh call; combinations
      whose buffers would exceed --memory-budget-gib are skipped.
No assertions: this prints tables. Without a GPU (or without the CUDA kernels) it says so and
exits 0.

    python benchmarks/bench_cuda.py [--repeats 20] [--large] [--parts step phases roots]
"""

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # its models and its phase timer
from _table import print_table

from distributed_shampoo import _backend
from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import AdamGraftingConfig

PHASE_COLUMNS = ("factor update", "root inverse", "preconditioning", "elementwise")


def mlp_large() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                          nn.Linear(4096, 1000))
    return model, torch.randn(256, 2048)


def transformer_large() -> tuple[nn.Module, torch.Tensor]:
    layer = nn.TransformerEncoderLayer(d_model=1024, nhead=16, dim_feedforward=4096,
                                       batch_first=True)
    return layer, torch.randn(16, 256, 1024)


LARGE_MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "mlp 2048-4096-4096-1000": mlp_large,
    "transformer block d1024": transformer_large,
}


def cuda_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if not getattr(_backend, "cuda_available", lambda: False)():
        return "the CUDA kernels (distributed_shampoo._C_cuda) are not built or not loadable"
    return None


# ---------------------------------------------------------------------------------- timing


def event_times_ms(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    """GPU time of each call, from an idle GPU (so host launch overhead counts), in ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


class CudaPhaseTimer(bench_step.PhaseTimer):
    """bench_step's phase timer, with the device drained before and after every backend call
    so that each call's GPU work is charged to its own phase."""

    def _timed(self, phase: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.synchronize()
                self.seconds[phase] += time.perf_counter() - start

        return wrapper


# ------------------------------------------------------------------ (a) and (b): the step


def bench_models(args: argparse.Namespace, device: torch.device) -> None:
    models = dict(bench_step.MODELS)
    if args.large:
        models.update(LARGE_MODELS)
    rows, phase_rows = [], []
    for name, build in models.items():
        torch.manual_seed(0)
        model, batch = build()
        model, batch = model.to(device), batch.to(device)
        model(batch).float().pow(2).mean().backward()
        params = [p for p in model.parameters() if p.grad is not None]
        n_params = sum(p.numel() for p in params)
        saved = [p.detach().clone() for p in params]
        adamw_ms = float("nan")
        if "step" in args.parts:
            adamw = torch.optim.AdamW(params, lr=1e-3, fused=True)
            adamw_ms = statistics.median(event_times_ms(adamw.step, args.repeats, args.warmup))
            del adamw
        for frequency in args.frequencies:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            shampoo = DistributedShampoo(
                params, lr=1e-3, betas=(0.9, 0.999), epsilon=1e-8,
                max_preconditioner_dim=args.max_preconditioner_dim,
                precondition_frequency=frequency, start_preconditioning_step=frequency,
                grafting_config=AdamGraftingConfig(),
            )
            # Through the first inverse root, so that timed steps precondition; the median is
            # then a step without an inverse root when frequency > 2, the mean amortises the
            # root steps among the timed ones (bench_step.py does the same).
            for _ in range(frequency):
                shampoo.step()
            if "step" in args.parts:
                times = event_times_ms(shampoo.step, args.repeats, args.warmup)
                blocks = sum(e.layout.num_blocks for e in shampoo._engines)
                median_ms, mean_ms = statistics.median(times), statistics.mean(times)
                rows.append([name, f"{n_params / 1e6:.2f}M", blocks, frequency, median_ms,
                             mean_ms, adamw_ms, median_ms / adamw_ms])
            if "phases" in args.parts:
                phase_rows.append([name, frequency, *phase_split(shampoo, args.repeats)])
            del shampoo
            torch.cuda.empty_cache()
        del model, batch, params, saved
        torch.cuda.empty_cache()
    if "step" in args.parts:
        print_table(
            ["model", "params", "blocks", "precond. freq.", "Shampoo median ms",
             "Shampoo mean ms", "AdamW fused median ms", "median ratio"],
            rows,
            title=f"(a) Optimizer step time on the GPU, median of {args.repeats} steps "
                  "(CUDA events, each step from an idle GPU)",
        )
    if phase_rows:
        print_table(
            ["model", "precond. freq.", *[f"{c} ms" for c in PHASE_COLUMNS], "other ms",
             "step ms (synced)"],
            phase_rows,
            title="(b) Shampoo step split by phase (mean ms per step, torch.cuda.synchronize "
                  "around every backend call; 'other' = Python, copies, launches between calls)",
        )


def phase_split(shampoo: DistributedShampoo, repeats: int) -> list[float]:
    torch.cuda.synchronize()
    total = 0.0
    with CudaPhaseTimer() as timer:
        for _ in range(repeats):
            start = time.perf_counter()
            shampoo.step()
            torch.cuda.synchronize()
            total += time.perf_counter() - start
    phases = [1e3 * timer.seconds[c] / repeats for c in PHASE_COLUMNS]
    step_ms = 1e3 * total / repeats
    return [*phases, max(step_ms - sum(phases), 0.0), step_ms]


# -------------------------------------------------------- (c) batched inverse roots


ROOT = 4  # every factor's inverse root is A^(-1/4), as for a matrix block's two factors
EPSILON = 1e-6


def root_table(count: int, n: int) -> np.ndarray:
    """count order-1 blocks of dim n, one after the other in every layout."""
    table = np.zeros((count, _backend.BF_COUNT), np.int64)
    b = np.arange(count, dtype=np.int64)
    table[:, _backend.BF_ORDER] = 1
    table[:, _backend.BF_NUMEL] = n
    table[:, _backend.BF_BLOCK_OFFSET] = b * n
    table[:, _backend.BF_PARAM_OFFSET] = b * n
    table[:, _backend.BF_FACTOR_OFFSET] = b * n * n
    table[:, _backend.BF_FACTOR_INDEX] = b
    table[:, _backend.BF_ROOT] = ROOT
    table[:, _backend.BF_DIMS] = n
    table[:, _backend.BF_STRIDES] = 1
    return table


def spd_factors(count: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """count SPD n x n matrices X X^T / 2n + I/2 (eigenvalues in about [0.6, 3.4]), built in
    chunks of at most ~256 MiB of temporaries."""
    out = torch.empty(count, n, n, dtype=dtype, device=device)
    chunk = max(1, (256 << 20) // (2 * n * n * torch.finfo(dtype).bits // 8))
    eye = torch.eye(n, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for i in range(0, count, chunk):
        x = torch.randn(min(chunk, count - i), n, 2 * n, generator=gen, dtype=dtype,
                        device=device)
        torch.baddbmm(0.5 * eye, x, x.transpose(1, 2), alpha=1.0 / (2 * n), out=out[i:i + len(x)])
    return out


def torch_loop(factors: torch.Tensor, out: torch.Tensor) -> None:
    """The plain-torch inverse roots, one factor at a time."""
    for a, x in zip(factors, out):
        lam, q = torch.linalg.eigh(a)
        lam = lam - torch.clamp(lam.min(), max=0.0) + EPSILON
        torch.matmul(q * lam.pow(-1.0 / ROOT), q.T, out=x)


def torch_batched(factors: torch.Tensor, out: torch.Tensor) -> None:
    """The same with one batched eigh call."""
    lam, q = torch.linalg.eigh(factors)
    lam = lam - torch.clamp(lam.min(dim=-1, keepdim=True).values, max=0.0) + EPSILON
    torch.matmul(q * lam.pow(-1.0 / ROOT).unsqueeze(-2), q.transpose(-1, -2), out=out)


def measure_roots(n: int, count: int, dtype: torch.dtype, device: torch.device,
                  repeats: int) -> list[object]:
    """One row of table (c)."""
    factors = spd_factors(count, n, dtype, device)
    ours = torch.empty_like(factors)
    reference = torch.empty_like(factors)
    kt = _backend.KernelTable(torch.from_numpy(root_table(count, n)), device)
    active = torch.ones(count, dtype=torch.uint8, device=device)
    diagonal = torch.zeros(count, dtype=torch.uint8, device=device)  # dense: eigen for all
    status = torch.empty(count, dtype=torch.int32)

    def run_ours() -> None:
        _backend.root_inverse(
            ours.view(-1), factors.view(-1), kt, active, method="eigen", epsilon=EPSILON,
            exponent_multiplier=1.0, bias_correction=1.0, make_positive_semidefinite=True,
            retry_double_precision=True, max_iterations=0, tolerance=0.0, rel_epsilon=0.0,
            order=3, is_diagonal=diagonal, status_out=status,
        )

    ours_ms = statistics.median(event_times_ms(run_ours, repeats, 1))
    statuses = Counter(status.tolist())
    loop_ms = statistics.median(
        event_times_ms(lambda: torch_loop(factors, reference), repeats, 1))
    batched_ms = statistics.median(
        event_times_ms(lambda: torch_batched(factors, reference), repeats, 1))
    rel = float((ours - reference).abs().max() / reference.abs().max())
    ok = "ok" if statuses == Counter({_backend.ROOT_OK: count}) else str(dict(statuses))
    return [n, count, ours_ms, loop_ms, loop_ms / ours_ms, batched_ms, batched_ms / ours_ms,
            f"{rel:.1e} ({ok})"]


def bench_roots(args: argparse.Namespace, device: torch.device) -> None:
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.root_dtype]
    elem = torch.finfo(dtype).bits // 8
    budget = int(args.memory_budget_gib * (1 << 30))
    rows = []
    for n in args.root_sizes:
        for count in args.root_counts:
            # factors, our output, the references' output, and ~3 factor-sized temporaries of
            # the batched solvers (eigenvectors, scaled copies, products)
            need = 6 * count * n * n * elem
            if need > budget or need > torch.cuda.mem_get_info(device)[0]:
                rows.append([n, count, f"skipped: needs ~{need / (1 << 30):.1f} GiB", "", "", "",
                             "", ""])
                continue
            rows.append(measure_roots(n, count, dtype, device, args.root_repeats))
            torch.cuda.empty_cache()
    print_table(
        ["n", "count", "ours ms", "torch loop ms", "loop / ours", "torch batched ms",
         "batched / ours", "max rel. diff (statuses)"],
        rows,
        title=f"(c) Inverse 4th roots of count n x n SPD factors ({args.root_dtype}), median of "
              f"{args.root_repeats}: _backend.root_inverse (one call) vs a Python loop of "
              "torch.linalg.eigh and vs one batched torch.linalg.eigh",
    )


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("step", "phases", "roots"),
                        default=["step", "phases", "roots"])
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--large", action="store_true", help="add larger models")
    parser.add_argument("--frequencies", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--max-preconditioner-dim", type=int, default=1024)
    parser.add_argument("--root-sizes", type=int, nargs="+",
                        default=[32, 64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--root-counts", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--root-repeats", type=int, default=3)
    parser.add_argument("--root-dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--memory-budget-gib", type=float, default=8.0,
                        help="skip root-inverse settings needing more device memory")
    args = parser.parse_args()

    reason = cuda_unavailable_reason()
    if reason is not None:
        print(f"CUDA not available ({reason}); bench_cuda.py needs an NVIDIA GPU and the "
              "CUDA kernels. Nothing to measure.")
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    print(f"Device: {torch.cuda.get_device_name(device)} ({props.total_memory / (1 << 30):.0f} "
          f"GiB), torch {torch.__version__}, CUDA {torch.version.cuda}")
    torch.backends.cuda.matmul.allow_tf32 = False  # models and references in full float32
    if "step" in args.parts or "phases" in args.parts:
        bench_models(args, device)
    if "roots" in args.parts:
        bench_roots(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
