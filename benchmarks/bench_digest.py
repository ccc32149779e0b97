"""Cost of the optimizer-state integrity digests (distributed_shampoo/utils/shampoo_digest.py)
against a torch.distributed.checkpoint save and load of the same state.

Builds an MLP with DistributedShampoo (Adam grafting, momentum), takes steps so every state
tensor exists, then times (median of --repeats): dcp.save of model + optimizer state,
state_digests of the optimizer state, dcp.load with ShampooLoadPlanner plus
load_distributed_state_dict, and verify_digests. Prints the digest's share of each. No
assertions: this prints a table.

    python benchmarks/bench_digest.py [--width 1024] [--layers 4] [--repeats 5]
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import print_table  # noqa: E402

from distributed_shampoo.distributed_shampoo import DistributedShampoo  # noqa: E402
from distributed_shampoo.shampoo_types import AdamGraftingConfig  # noqa: E402
from distributed_shampoo.utils.shampoo_dcp import ShampooLoadPlanner  # noqa: E402
from distributed_shampoo.utils.shampoo_digest import state_digests, verify_digests  # noqa: E402


def _median(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    opt = DistributedShampoo(net.parameters(), lr=1e-3, momentum=0.9, precondition_frequency=100,
                             max_preconditioner_dim=args.width, grafting_config=AdamGraftingConfig())
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(8, args.width)).square().sum().backward()
        opt.step()
    root = Path(tempfile.mkdtemp())
    names = lambda: net.named_parameters()  # noqa: E731
    optim = opt.distributed_state_dict(key_to_param=names())
    nbytes = sum(t.numel() * t.element_size() for v in optim["state"].values() for t in v.values())
    counter = iter(range(10**6))

    def save():
        state = {"model": net.state_dict(), "optim": opt.distributed_state_dict(key_to_param=names())}
        dcp.save(state, checkpoint_id=str(root / f"c{next(counter)}"))

    digest_text = state_digests(optim)
    save()
    path = str(root / "c0")

    def load():
        state = {"model": net.state_dict(), "optim": opt.distributed_state_dict(key_to_param=names())}
        dcp.load(state, checkpoint_id=path, planner=ShampooLoadPlanner())
        opt.load_distributed_state_dict(state["optim"], key_to_param=names())
        net.load_state_dict(state["model"])

    t_save = _median(save, args.repeats)
    t_digest = _median(lambda: state_digests(optim), args.repeats)
    t_load = _median(load, args.repeats)
    t_verify = _median(lambda: verify_digests(optim, digest_text), args.repeats)
    shutil.rmtree(root, ignore_errors=True)
    print(f"optimizer state: {nbytes / 2**20:.0f} MiB in {sum(len(v) for v in optim['state'].values())} "
          f"tensors; torch threads {torch.get_num_threads()}")
    print_table(
        ["phase", "checkpoint (s)", "digest (s)", "digest / checkpoint"],
        [
            ["save", f"{t_save:.3f}", f"{t_digest:.3f}", f"{100 * t_digest / t_save:.1f} %"],
            ["load", f"{t_load:.3f}", f"{t_verify:.3f}", f"{100 * t_verify / t_load:.1f} %"],
        ],
    )


if __name__ == "__main__":
    main()
