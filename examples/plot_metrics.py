"""Plot one or more --metrics-csv files of the CIFAR-10 examples: a metric (default the
training loss) against the step, one line per run, to compare optimizers or settings.

    python examples/plot_metrics.py shampoo.csv adam.csv --labels Shampoo Adam --output loss.png

Needs matplotlib (pip install matplotlib, or the package's "examples" extra).
"""

import argparse
import csv
from pathlib import Path
from typing import List, Optional, Sequence, Tuple


def read_series(path: str, metric: str) -> Tuple[List[int], List[float]]:
    """(steps, values) of the rows of a metrics CSV where `metric` has a value."""
    steps: List[int] = []
    values: List[float] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if (
            reader.fieldnames is None
            or "step" not in reader.fieldnames
            or metric not in reader.fieldnames
        ):
            raise SystemExit(f"{path}: not a metrics CSV with the columns 'step' and {metric!r}")
        for row in reader:
            if row[metric] not in ("", None):
                steps.append(int(row["step"]))
                values.append(float(row[metric]))
    return steps, values


def smooth(values: Sequence[float], window: int) -> List[float]:
    """Trailing moving average over `window` points (the first points average what exists)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(
    paths: Sequence[str],
    output: str,
    labels: Optional[Sequence[str]] = None,
    metric: str = "loss",
    window: int = 1,
    log_y: bool = False,
    title: Optional[str] = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(paths):
        raise SystemExit(f"{len(labels)} labels for {len(paths)} files")
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for i, path in enumerate(paths):
        steps, values = read_series(path, metric)
        label = labels[i] if labels is not None else Path(path).stem
        ax.plot(steps, smooth(values, max(window, 1)), label=label, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(metric if window <= 1 else f"{metric} (moving average of {window})")
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("csv", nargs="+", help="metrics CSV files written with --metrics-csv")
    parser.add_argument(
        "--output", default="metrics.png", help="PNG to write (default metrics.png)"
    )
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per file")
    parser.add_argument(
        "--metric",
        default="loss",
        help="column to plot: loss, accuracy, test_loss, test_accuracy, ...",
    )
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window in points")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    plot(args.csv, args.output, args.labels, args.metric, args.smooth, args.log_y, args.title)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
