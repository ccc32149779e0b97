"""What the examples report while they train: the rank-0 progress bar (or plain lines) and
the per-step metrics CSV, mirrored to TensorBoard when it is installed."""

import csv
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

logger = logging.getLogger("examples")


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
