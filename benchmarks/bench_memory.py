"""Optimizer memory on CPU: bytes held in state ÷ parameter bytes, and the peak of a root step.

"State" is every tensor (and NumPy array) reachable from the optimizer object after its first
root steps, scratch included, parameters and gradients excluded, each storage counted once:
what a user pays to keep the optimizer alive between steps. Printed for DistributedShampoo
(several configs), its eigenvalue-corrected variant (SOAP: DefaultSOAPConfig, no grafting),
torch.optim.AdamW, and, when a clone of the well-known implementation is
given (`--reference-git DIR`, a git directory of facebookresearch/optimizers), its Sept-2024
and newest versions measured in the same run with the same walk. Each measurement runs in its
own subprocess, so the versions never meet (they share the package name) and allocations of
one case never inflate another. Then per-rank state under DDP (gloo, 1, 2 and 4 ranks) and
the peak extra resident memory during a root step (VmHWM reset through /proc/self/clear_refs
after glibc's malloc_trim, so that every page the step touches counts; page granularity, CPU
only; the same figure within 0.2 MiB from run to run).

    python benchmarks/bench_memory.py [--reference-git /path/to/optimizers/repo] [--quick]
"""

import argparse
import ctypes
import json
import os
import socket
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import print_table  # noqa: E402

# The Sept-2024 version this package mirrors, and "newest" = the clone's HEAD.
REFERENCE_VERSIONS = {"ref Sept-2024": "b854998", "ref newest": "HEAD"}


# ------------------------------------------------------------------------------- models
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(4096, 256), nn.ReLU(), nn.Linear(256, 10),
    )


MODELS = {
    "MLP 1024-1024-1024-10": (mlp, (16, 1024), 1024),
    "conv 3-64-64 + 4096-256-10": (convnet, (4, 3, 16, 16), 256),
}

# Our configs: keyword overrides on the base (Adam grafting, betas (0.9, 0.999), float32).
CONFIGS: dict[str, dict[str, Any]] = {
    "base": {},
    "momentum 0.9": {"momentum": 0.9},
    "weight decay 1e-2": {"weight_decay": 1e-2},
    "bf16 params": {"param_dtype": "bfloat16"},
    "bf16 factors + roots": {"precision": {"factor_matrix_dtype": "bfloat16", "inv_factor_matrix_dtype": "bfloat16"}},
    "float64 factors": {"precision": {"factor_matrix_dtype": "float64"}},
    # a failed root must raise: root steps stage their new factors and roots (the peak)
    "use_protected_eigh=False": {"use_protected_eigh": False},
}


# ------------------------------------------------------------------------- measurement
def held_bytes(root: object, exclude: set[int]) -> int:
    """Bytes of the distinct tensor storages and NumPy buffers reachable from `root`."""
    seen_objects: set[int] = set()
    storages: dict[int, int] = {}
    stack = [root]
    skip = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type, nn.Module)
    while stack:
        value = stack.pop()
        if id(value) in seen_objects or isinstance(value, skip):
            continue
        seen_objects.add(id(value))
        if isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            storage = local.untyped_storage()
            if storage.data_ptr() not in exclude:
                storages[storage.data_ptr()] = storage.nbytes()
            continue
        if isinstance(value, np.ndarray):
            base = value if value.base is None else value.base
            if isinstance(base, np.ndarray):
                storages[base.__array_interface__["data"][0]] = base.nbytes
            continue
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(value)
        elif hasattr(value, "__dict__") or hasattr(type(value), "__slots__"):
            stack.extend(vars(value).values() if hasattr(value, "__dict__") else ())
            for slot in getattr(type(value), "__slots__", ()):
                if hasattr(value, slot):
                    stack.append(getattr(value, slot))
    return sum(storages.values())


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_free_heap() -> None:
    """glibc's malloc_trim(0): free heap pages go back to the system, so that the root step's
    peak counts every page it touches (without it, pages freed by earlier steps and kept by
    the allocator hide part of the peak, differently from run to run)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may read low
        pass


def build_optimizer(impl: str, model: nn.Module, mpd: int, config: dict[str, Any]) -> torch.optim.Optimizer:
    common = dict(lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, weight_decay=config.get("weight_decay", 0.0),
                  max_preconditioner_dim=mpd, precondition_frequency=1, start_preconditioning_step=1)
    if impl == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=common["weight_decay"])
    from distributed_shampoo.distributed_shampoo import DistributedShampoo

    if impl == "ref newest":
        from distributed_shampoo import AdamPreconditionerConfig

        return DistributedShampoo(model.parameters(), grafting_config=AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8),
                                  **common)
    from distributed_shampoo.shampoo_types import AdamGraftingConfig

    kwargs: dict[str, Any] = dict(common, momentum=config.get("momentum", 0.0),
                                  grafting_config=AdamGraftingConfig(beta2=0.999, epsilon=1e-8))
    if "precision" in config:
        from distributed_shampoo.shampoo_types import PrecisionConfig

        kwargs["precision_config"] = PrecisionConfig(**{k: getattr(torch, v) for k, v in config["precision"].items()})
    if "use_protected_eigh" in config:
        kwargs["use_protected_eigh"] = config["use_protected_eigh"]
    if "distributed" in config:
        from distributed_shampoo.shampoo_types import DDPShampooConfig

        kwargs["distributed_config"] = DDPShampooConfig()
    if impl == "soap":  # eigenvalue-corrected Shampoo (QR warm start), no grafting (issue 14)
        from distributed_shampoo.shampoo_types import DefaultSOAPConfig

        kwargs.update(grafting_config=None, preconditioner_config=DefaultSOAPConfig)
    return DistributedShampoo(model.parameters(), **kwargs)


def measure(impl: str, model_name: str, config: dict[str, Any]) -> dict[str, float]:
    """State ÷ parameter bytes after two root steps, and the third root step's extra peak."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    factory, input_shape, mpd = MODELS[model_name]
    model = factory().to(getattr(torch, config.get("param_dtype", "float32")))
    dtype = next(model.parameters()).dtype
    inputs = torch.randn(input_shape, dtype=dtype)
    optimizer = build_optimizer(impl, model, mpd, config)

    def step() -> None:
        optimizer.zero_grad()
        model(inputs).float().square().mean().backward()
        optimizer.step()

    step()
    step()
    params = list(model.parameters())
    exclude = {p.untyped_storage().data_ptr() for p in params}
    exclude |= {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    state = held_bytes(optimizer, exclude)
    optimizer.zero_grad()
    model(inputs).float().square().mean().backward()
    release_free_heap()  # so the step's allocations are fresh pages, whatever came before
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = resident_kib("VmRSS")
    optimizer.step()
    peak = resident_kib("VmHWM") - before
    return {"ratio": state / param_bytes, "state_mib": state / 2**20, "params_mib": param_bytes / 2**20,
            "peak_mib": peak / 1024}


def ddp_worker(rank: int, world: int, port: int, model_name: str, out: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = measure("ours", model_name, {"distributed": True})
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ driver
def run_case(args: argparse.Namespace, impl: str, model_name: str, config: str, env: dict[str, str]) -> dict[str, float] | None:
    command = [sys.executable, __file__, "--worker", json.dumps([impl, model_name, config])]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    if done.returncode != 0:
        print(f"[{impl} / {model_name} / {config}] failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference_trees(git_dir: str | None, tmp: str) -> dict[str, str]:
    """Each reference version's package extracted from the clone (never vendored here)."""
    if git_dir is None:
        return {}
    trees = {}
    for name, commit in REFERENCE_VERSIONS.items():
        target = Path(tmp) / commit
        target.mkdir()
        archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", commit],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        trees[name] = str(target)
    return trees


def ddp_rows(model_name: str, worlds: list[int]) -> list[list[Any]]:
    import torch.multiprocessing as mp

    rows = []
    for world in worlds:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            mp.spawn(ddp_worker, args=(world, port, model_name, out), nprocs=world, join=True)
            per_rank = json.loads(Path(out).read_text())
        rows.append([model_name, world, max(r["ratio"] for r in per_rank), max(r["state_mib"] for r in per_rank),
                     max(r["peak_mib"] for r in per_rank)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-git", default=os.environ.get("SHAMPOO_REFERENCE_GIT"),
                        help="git directory of facebookresearch/optimizers (optional)")
    parser.add_argument("--quick", action="store_true", help="base config only, DDP with 2 ranks")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, model_name, config = json.loads(args.worker)
        print(json.dumps(measure(impl, model_name, CONFIGS[config])))
        return
    configs = ["base"] if args.quick else list(CONFIGS)
    with tempfile.TemporaryDirectory() as tmp:
        trees = reference_trees(args.reference_git, tmp)
        rows = []
        for model_name in MODELS:
            for config in configs:
                ours = run_case(args, "ours", model_name, config, dict(os.environ))
                soap = run_case(args, "soap", model_name, config, dict(os.environ))
                adamw = run_case(args, "adamw", model_name, config, dict(os.environ))
                row = [model_name, config, ours and ours["ratio"], soap and soap["ratio"], adamw and adamw["ratio"]]
                ref_peaks = []
                for name, tree in trees.items():
                    # Only the configs both versions express the same way.
                    ref = (run_case(args, name, model_name, config, dict(os.environ, PYTHONPATH=tree))
                           if config in ("base", "weight decay 1e-2") else None)
                    row.append(ref["ratio"] if ref else "-")
                    row.append(ours["ratio"] / ref["ratio"] if ref and ours else "-")
                    ref_peaks.append(ref["peak_mib"] if ref else "-")
                row += [ours and ours["peak_mib"], soap and soap["peak_mib"], *ref_peaks, ours and ours["params_mib"]]
                rows.append(row)
    headers = ["model", "config", "this package", "SOAP (ours)", "AdamW"]
    for name in trees:
        headers += [name, f"ours ÷ {name}"]
    headers += ["root-step peak MiB (ours)", "SOAP root-step peak MiB", *[f"{name} root-step peak MiB" for name in trees],
                "param MiB"]
    print_table(headers, rows, title="Optimizer state ÷ parameter bytes after the first root steps "
                "(Adam grafting, betas (0.9, 0.999); scratch included)")
    worlds = [2] if args.quick else [1, 2, 4]
    ddp = [row for model_name in MODELS for row in ddp_rows(model_name, worlds)]
    print_table(["model", "ranks", "state ÷ all param bytes (max rank)", "state MiB (max rank)", "root-step peak MiB"],
                ddp, title="DDP (gloo, DDPShampooConfig): per-rank state")


if __name__ == "__main__":
    main()
