"""Language modelling on text that ships with CPython (offline, no download): a small
decoder-only byte-level transformer trained with AdamW and with DistributedShampoo (Adam
grafting), the same protocol for both.

Data: the standard library's own .py sources (full protocol) or pydoc_data.topics (--quick,
--smoke), as bytes; split into train and validation BY FILE (by topic): the sorted list of
names, shuffled with a fixed seed, 10% validate. Validation loss is measured on a fixed set of
windows of the validation files, in bits per byte.

Model: 4 layers, d=128, 4 heads, context 128 (full protocol): square q/k/v/o projections, 4x
MLP matrices, learned token and position embeddings (the token embedding tied to the output
layer), LayerNorm vectors and biases. Every parameter goes to the one optimizer under test, as
a user replacing AdamW would do it: Shampoo preconditions the matrices and the embeddings
(the vocabulary is 256 bytes, so their factors are small) and also the 1-D parameters (one
factor each); weight decay (decoupled, 0.1) on the matrices and embeddings only, none on the
1-D parameters (the usual GPT recipe), for both optimizers.

Protocol (fairness): both optimizers get the same learning-rate sweep, the same warm-up (10%
of the steps, linear) and cosine decay to 10% of the peak, the same betas (0.9, 0.99: the
second-moment decay of Adam, of Shampoo's grafting and of Shampoo's factors), the same seeds
and, for a given seed, the same model initialisation and the same sequence of batches. The
learning rate is picked on a separate sweep seed (lowest final validation loss); the reported
runs use seeds 0, 1, 2. Nothing else is tuned. Shampoo recomputes its inverse roots every 20
steps (a cost setting, not tuned).

Reports: validation bits per byte against steps and against training time (PNG), the steps
(and time) each optimizer needs to reach AdamW's final validation loss, the final validation
loss (mean ± std over seeds), and the time per step split into forward+backward and optimizer
step. Finished runs are cached in OUT_DIR/runs.json, so an interrupted protocol resumes.

    python benchmarks/lm_convergence.py --quick          # about a minute or two on a laptop CPU
    python benchmarks/lm_convergence.py --jobs 2         # full protocol: 12 runs, 2 at a time
    python benchmarks/lm_convergence.py --device cuda    # the same on a GPU
"""

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lm import CORPORA, ByteLM, batch_starts, param_groups, windows  # noqa: E402
from _table import print_table  # noqa: E402

from distributed_shampoo.distributed_shampoo import DistributedShampoo  # noqa: E402
from distributed_shampoo.shampoo_types import AdamGraftingConfig  # noqa: E402

SWEEP_SEED = 100  # the learning-rate sweep never sees the reported seeds 0, 1, 2
VALIDATION_SEED = 12345  # which validation windows are scored; fixed for every run
BETAS = (0.9, 0.99)
WEIGHT_DECAY = 0.1
BASELINE = "AdamW"

# The three settings. full: the protocol; quick: README's first command; smoke: the test's.
SETTINGS: Dict[str, Dict[str, object]] = {
    "full": dict(
        corpus="stdlib",
        layers=4,
        d=128,
        heads=4,
        context=128,
        batch=16,
        steps=1000,
        eval_every=50,
        eval_windows=256,
        seeds=3,
        lrs=[1e-3, 3e-3, 1e-2],
    ),
    "quick": dict(
        corpus="topics",
        layers=2,
        d=64,
        heads=4,
        context=64,
        batch=16,
        steps=300,
        eval_every=25,
        eval_windows=128,
        seeds=1,
        lrs=[3e-3],
    ),
    "smoke": dict(
        corpus="topics",
        layers=1,
        d=32,
        heads=2,
        context=32,
        batch=8,
        steps=40,
        eval_every=10,
        eval_windows=32,
        seeds=1,
        lrs=[3e-3],
    ),
}


def adamw(groups, lr: float, steps: int) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=1e-8, weight_decay=WEIGHT_DECAY)


def shampoo(groups, lr: float, steps: int) -> torch.optim.Optimizer:
    # README's AdamW replacement (Adam grafting, the same betas and epsilon); inverse roots
    # every 20 steps from step 20, or 10 on runs too short for that.
    frequency = 20 if steps >= 200 else 10
    return DistributedShampoo(
        groups,
        lr=lr,
        betas=BETAS,
        epsilon=1e-12,
        weight_decay=WEIGHT_DECAY,
        use_decoupled_weight_decay=True,
        max_preconditioner_dim=1024,
        precondition_frequency=frequency,
        start_preconditioning_step=frequency,
        grafting_config=AdamGraftingConfig(beta2=BETAS[1], epsilon=1e-8),
    )


OPTIMIZERS: Dict[str, Callable] = {"AdamW": adamw, "Shampoo (Adam grafting)": shampoo}


def schedule(steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr before step i+1: linear warm-up over 10% of the steps, then
    cosine decay to 10% of the peak at the last step."""
    warmup = max(1, steps // 10)

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = (i - warmup) / max(1, steps - 1 - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Progress:
    """One line on a terminal (redrawn), every 10% otherwise (logs)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.tty, self.began, self.last_tenth = sys.stderr.isatty(), time.perf_counter(), -1

    def advance(self, label: str, count: int = 1) -> None:
        self.done += count
        if not self.enabled:
            return
        fraction = self.done / max(1, self.total)
        elapsed = time.perf_counter() - self.began
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        bar = "#" * int(30 * fraction) + "." * (30 - int(30 * fraction))
        line = f"[{bar}] {100 * fraction:5.1f}% {elapsed:6.0f}s elapsed, ~{eta:.0f}s left  {label}"
        if self.tty:
            print("\r" + line[:150].ljust(150), end="", file=sys.stderr, flush=True)
            if self.done == self.total:
                print(file=sys.stderr)
        elif int(10 * fraction) != self.last_tenth:
            self.last_tenth = int(10 * fraction)
            print(line, file=sys.stderr, flush=True)

    def skip(self, count: int) -> None:
        self.total -= count


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def validation_bpb(
    model: nn.Module, val: torch.Tensor, starts: torch.Tensor, context: int, device
) -> float:
    total = 0.0
    for chunk in starts.split(64):
        x, y = windows(val, chunk, context)
        logits = model(x.to(device))
        total += nn.functional.cross_entropy(
            logits.flatten(0, 1), y.to(device).flatten(), reduction="sum"
        ).item()
    return total / (starts.numel() * context) / math.log(2)


def train(
    name: str, lr: float, seed: int, cfg: Dict[str, object], corpus, device, progress: Progress
) -> Dict:
    """One run. Returns the validation curve [(step, training seconds, bpb)] and timings."""
    steps, context = int(cfg["steps"]), int(cfg["context"])
    torch.manual_seed(seed)
    model = ByteLM(int(cfg["layers"]), int(cfg["d"]), int(cfg["heads"]), context).to(device)
    optimizer = OPTIMIZERS[name](param_groups(model, WEIGHT_DECAY), lr, steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(steps))
    data_order = torch.Generator().manual_seed(1000 + seed)  # batches depend on the seed only
    val_starts = batch_starts(
        len(corpus["val"]),
        context,
        int(cfg["eval_windows"]),
        torch.Generator().manual_seed(VALIDATION_SEED),
    )
    val = lambda: validation_bpb(model, corpus["val"], val_starts, context, device)  # noqa: E731
    curve, forward_backward, optimizer_step, diverged = [(0, 0.0, val())], 0.0, 0.0, False
    for step in range(1, steps + 1):
        x, y = windows(
            corpus["train"],
            batch_starts(len(corpus["train"]), context, int(cfg["batch"]), data_order),
            context,
        )
        x, y = x.to(device), y.to(device)
        sync(device)
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        sync(device)
        middle = time.perf_counter()
        optimizer.step()
        scheduler.step()
        sync(device)
        forward_backward += middle - began
        optimizer_step += time.perf_counter() - middle
        progress.advance(
            f"{name}, lr {lr:g}, seed {seed}: step {step}/{steps}, "
            f"train {loss.item() / math.log(2):.3f} bpb"
        )
        if not math.isfinite(loss.item()):
            diverged = True
            curve.append((step, forward_backward + optimizer_step, math.inf))
            progress.skip(steps - step)
            break
        if step % int(cfg["eval_every"]) == 0 or step == steps:
            curve.append((step, forward_backward + optimizer_step, val()))
    done = curve[-1][0]
    return {
        "optimizer": name,
        "lr": lr,
        "seed": seed,
        "curve": curve,
        "diverged": diverged,
        "forward_backward_ms": 1000 * forward_backward / done,
        "optimizer_ms": 1000 * optimizer_step / done,
    }


_WORKER_CORPUS: Dict[str, Dict] = {}


def _worker(job: tuple) -> Dict:
    """One run in a --jobs process (loads the corpus once per process)."""
    name, lr, seed, cfg, device, threads = job
    torch.set_num_threads(threads)
    if cfg["corpus"] not in _WORKER_CORPUS:
        _WORKER_CORPUS[cfg["corpus"]] = CORPORA[str(cfg["corpus"])]()
    corpus = _WORKER_CORPUS[cfg["corpus"]]
    return train(name, lr, seed, cfg, corpus, torch.device(device), Progress(0, False))


def run_key(name: str, lr: float, seed: int, cfg: Dict[str, object], device) -> str:
    return json.dumps([name, lr, seed, str(device), cfg], sort_keys=True)


def load_cache(path: Path) -> Dict[str, Dict]:
    return json.loads(path.read_text()) if path.exists() else {}


def save_cache(path: Path, cache: Dict[str, Dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache))
    os.replace(tmp, path)


def mean_curve(runs: List[Dict]) -> Dict[str, List[float]]:
    length = min(len(r["curve"]) for r in runs)
    steps = [r for r, _, _ in runs[0]["curve"][:length]]
    cols = lambda k: list(zip(*[[p[k] for p in r["curve"][:length]] for r in runs]))  # noqa: E731
    return {
        "steps": steps,
        "seconds": [statistics.fmean(c) for c in cols(1)],
        "mean": [statistics.fmean(c) for c in cols(2)],
        "low": [min(c) for c in cols(2)],
        "high": [max(c) for c in cols(2)],
    }


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(
    results: Dict[str, List[Dict]], chosen: Dict[str, float], cfg: Dict[str, object]
) -> Dict[str, Dict]:
    curves = {name: mean_curve(runs) for name, runs in results.items() if runs}
    target = curves[BASELINE]["mean"][-1] if BASELINE in curves else math.nan
    rows, summary = [], {}
    for name, runs in results.items():
        if not runs:
            continue
        c = curves[name]
        hit = next((i for i, v in enumerate(c["mean"]) if v <= target), None)
        reach = c["steps"][hit] if hit is not None else None
        summary[name] = {"steps_to_target": reach, "final": [r["curve"][-1][2] for r in runs]}
        # the same, seed by seed: each run against AdamW's run of the same seed
        per_seed = []
        for r in runs:
            base = next((b for b in results.get(BASELINE, []) if b["seed"] == r["seed"]), None)
            step = base and next((p[0] for p in r["curve"] if p[2] <= base["curve"][-1][2]), None)
            per_seed.append(str(step) if step is not None else "-")
        rows.append(
            [
                name,
                f"{chosen[name]:g}",
                str(reach) if reach is not None else f"> {c['steps'][-1]}",
                f"{reach / int(cfg['steps']):.2f}x" if reach is not None else "-",
                f"{c['seconds'][hit]:.0f}" if hit is not None else "-",
                " / ".join(per_seed),
                mean_std(summary[name]["final"]),
                mean_std([r["forward_backward_ms"] for r in runs], 1),
                mean_std([r["optimizer_ms"] for r in runs], 1),
            ]
        )
    seeds = min(len(r) for r in results.values() if r) if rows else 0
    print_table(
        [
            "optimizer",
            "lr",
            f"steps to AdamW's final ({target:.3f} bpb)",
            "x budget",
            "train s to it",
            "per seed",
            "final val bpb",
            "fwd+bwd ms/step",
            "opt ms/step",
        ],
        rows,
        title=f"{cfg['steps']} steps; validation bits per byte, mean ± std over {seeds} seed(s), "
        f"checked every {cfg['eval_every']} steps (steps/time to reach: first check at or below, "
        "on the mean curve; per seed: steps to that seed's AdamW final)",
    )
    return curves


def plot(curves: Dict[str, Dict[str, List[float]]], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=90, sharey=True)
    for name, c in curves.items():
        for ax, x in zip(axes, (c["steps"], c["seconds"])):
            (line,) = ax.plot(x[1:], c["mean"][1:], label=name, linewidth=1.6)
            ax.fill_between(
                x[1:], c["low"][1:], c["high"][1:], color=line.get_color(), alpha=0.15, linewidth=0
            )
    if BASELINE in curves:
        for ax in axes:
            ax.axhline(curves[BASELINE]["mean"][-1], color="grey", linestyle=":", linewidth=1)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training time, s (forward, backward, optimizer step)")
    axes[0].set_ylabel("validation bits per byte")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="small model on pydoc_data.topics, one seed, one lr"
    )
    mode.add_argument(
        "--smoke", action="store_true", help="tiny model, 40 steps (the test's setting)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--steps", type=int, help="override the setting's step budget")
    parser.add_argument("--seeds", type=int, help="override the number of reported seeds")
    parser.add_argument("--lrs", type=float, nargs="+", help="override the learning-rate sweep")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a busy 2-core machine 2 threads ran 70x slower)",
    )
    parser.add_argument(
        "--out-dir", type=Path, help="runs.json and the plot (default ./lm_convergence_<mode>)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once, one process each (default 1)"
    )
    parser.add_argument("--plot", type=Path, help="PNG path (default OUT_DIR/lm_convergence.png)")
    parser.add_argument("--report-only", action="store_true", help="only tabulate the cached runs")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    setting = "quick" if args.quick else "smoke" if args.smoke else "full"
    cfg = dict(SETTINGS[setting])
    cfg.update(
        {
            k: v
            for k, v in (("steps", args.steps), ("seeds", args.seeds), ("lrs", args.lrs))
            if v is not None
        }
    )
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = args.out_dir or Path(f"lm_convergence_{setting}")
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path, plot_path = out_dir / "runs.json", args.plot or out_dir / "lm_convergence.png"
    corpus = CORPORA[str(cfg["corpus"])]()
    print(
        f"{setting}: {corpus['name']}, {corpus['units']} -> {len(corpus['train']) / 1e6:.2f} / "
        f"{len(corpus['val']) / 1e6:.2f} MB train / validation; model {cfg['layers']} layers, "
        f"d={cfg['d']}, {cfg['heads']} heads, context {cfg['context']}, batch {cfg['batch']}; "
        f"{cfg['steps']} steps; lrs {cfg['lrs']}; seeds 0..{int(cfg['seeds']) - 1}; {device}, "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )

    cache = load_cache(cache_path)
    steps = int(cfg["steps"])
    sweep = len(cfg["lrs"]) > 1
    sweep_plan = [(n, lr, SWEEP_SEED) for n in OPTIMIZERS for lr in cfg["lrs"]] if sweep else []
    missing = [p for p in sweep_plan if run_key(*p, cfg, device) not in cache]
    progress = Progress(
        0 if args.report_only else steps * (len(missing) + len(OPTIMIZERS) * int(cfg["seeds"])),
        not args.no_progress,
    )

    def ensure(plan: List[tuple]) -> None:
        """Train the runs of plan that are not cached: here, or over --jobs processes."""
        todo = [p for p in plan if run_key(*p, cfg, device) not in cache]
        if args.report_only or not todo:
            return
        if args.jobs <= 1:
            for p in todo:
                cache[run_key(*p, cfg, device)] = train(*p, cfg, corpus, device, progress)
                save_cache(cache_path, cache)
            return
        # spawn, not fork: a forked child inherits torch's thread pools in an unknown state
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(args.jobs, len(todo)), mp_context=context) as pool:
            futures = {pool.submit(_worker, (*p, cfg, str(device), args.threads)): p for p in todo}
            for future in as_completed(futures):
                name, lr, seed = futures[future]
                cache[run_key(name, lr, seed, cfg, device)] = result = future.result()
                save_cache(cache_path, cache)
                final = result["curve"][-1][2]
                progress.advance(f"done: {name}, lr {lr:g}, seed {seed}: {final:.3f} bpb", steps)

    ensure(sweep_plan)
    chosen: Dict[str, float] = {}
    for name in OPTIMIZERS:
        if not sweep:
            chosen[name] = cfg["lrs"][0]
            continue
        keys = [run_key(name, lr, SWEEP_SEED, cfg, device) for lr in cfg["lrs"]]
        if all(k in cache for k in keys):
            finals = {lr: cache[k]["curve"][-1][2] for lr, k in zip(cfg["lrs"], keys)}
            chosen[name] = min(finals, key=lambda lr: finals[lr])
    if sweep:
        print_table(
            ["optimizer"] + [f"lr {lr:g}" for lr in cfg["lrs"]] + ["chosen"],
            [
                [n]
                + [
                    f"{cache[run_key(n, lr, SWEEP_SEED, cfg, device)]['curve'][-1][2]:.3f}"
                    if run_key(n, lr, SWEEP_SEED, cfg, device) in cache
                    else "-"
                    for lr in cfg["lrs"]
                ]
                + [f"{chosen[n]:g}" if n in chosen else "-"]
                for n in OPTIMIZERS
            ],
            title=f"\nlearning-rate sweep (seed {SWEEP_SEED}; final validation bits per byte)",
        )
    # seed by seed, so that a protocol cut short still compares like with like
    seed_plan = [
        (n, chosen[n], s) for s in range(int(cfg["seeds"])) for n in OPTIMIZERS if n in chosen
    ]
    progress.skip(steps * sum(run_key(*p, cfg, device) in cache for p in seed_plan))
    ensure(seed_plan)
    results: Dict[str, List[Dict]] = {n: [] for n in OPTIMIZERS}
    for name, lr, seed in seed_plan:
        if run_key(name, lr, seed, cfg, device) in cache:
            results[name].append(cache[run_key(name, lr, seed, cfg, device)])
    if not any(results.values()):
        print("no finished runs to report yet")
        return 1
    title = (
        f"{corpus['name'].split(' (')[0]}: {cfg['layers']}-layer d={cfg['d']} byte transformer, "
        f"{cfg['steps']} steps, mean of {min(len(r) for r in results.values() if r)} seed(s) "
        "(band: min-max)"
    )
    curves = report(results, chosen, cfg)
    plot(curves, plot_path, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
