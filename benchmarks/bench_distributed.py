"""DDP Shampoo on CPU with gloo: step time, optimizer state per rank, bytes communicated.

For 1, 2 and 4 ranks (spawned here) training the same MLP with DistributedDataParallel and
DDPShampooConfig, prints the median optimizer step time, the optimizer state bytes held by
each rank (max over ranks), and the bytes each rank receives in the optimizer's all-gather per
step (DDP's own gradient all-reduce is the same for any optimizer and is not counted).
Timings on a 2-core machine with 4 ranks are oversubscribed; the state and communication
columns are exact.

    python benchmarks/bench_distributed.py [--steps 10] [--frequency 10]
"""

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import print_table  # noqa: E402

from distributed_shampoo.distributed_shampoo import DistributedShampoo  # noqa: E402
from distributed_shampoo.shampoo_types import (  # noqa: E402
    AdamGraftingConfig,
    CommunicationDType,
    DDPShampooConfig,
)


def state_bytes(optimizer: DistributedShampoo) -> int:
    def walk(value: object) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        return 0

    return sum(walk(state) for state in optimizer.state.values())


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    ddp_model = nn.parallel.DistributedDataParallel(model)
    rows = []
    for dtype in (CommunicationDType.FP32, CommunicationDType.BF16):
        optimizer = DistributedShampoo(
            model.parameters(), lr=1e-3, betas=(0.9, 0.999), epsilon=1e-8,
            max_preconditioner_dim=256, precondition_frequency=args.frequency,
            start_preconditioning_step=args.frequency, grafting_config=AdamGraftingConfig(),
            distributed_config=DDPShampooConfig(communication_dtype=dtype),
        )
        inputs = torch.randn(64, 256)
        targets = torch.randint(0, 10, (64,))
        times = []
        for step in range(args.frequency + args.steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(ddp_model(inputs), targets).backward()
            dist.barrier()
            start = time.perf_counter()
            optimizer.step()
            if step >= args.frequency:
                times.append(time.perf_counter() - start)
        exchanges = [e.exchange for e in optimizer._engines if e.exchange is not None]
        received = sum((world - 1) * e.chunk * e.buffer.element_size() for e in exchanges)
        rows.append((dtype.name, statistics.median(times), state_bytes(optimizer), received))
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--frequency", type=int, default=10)
    args = parser.parse_args()
    table = []
    for world in (1, 2, 4):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.pt")
            mp.spawn(worker, args=(world, port, args, out), nprocs=world, join=True)
            per_rank = torch.load(out, weights_only=False)
        for i, (dtype, _, _, received) in enumerate(per_rank[0]):
            step_ms = 1e3 * max(r[i][1] for r in per_rank)
            state_mb = max(r[i][2] for r in per_rank) / 2**20
            table.append([world, dtype, step_ms, state_mb, received / 2**20])
    print_table(
        ["ranks", "comm dtype", "step ms (slowest rank)", "state MiB / rank", "all-gather MiB / rank / step"],
        table,
        title=f"DDP Shampoo, MLP 256-512-512-10, gloo on CPU, median of {args.steps} steps "
        f"(precondition_frequency={args.frequency})",
    )


if __name__ == "__main__":
    main()
