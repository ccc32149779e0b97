"""Checkpointing across processes and world sizes (SPEC A.3.11, B §8; DESIGN "Checkpoints").

Three runs of gloo ranks, one after the other; each later one reads what the earlier ones
wrote, so every load happens in processes that never held the saved optimizer:

1. "save", 2 ranks: DDP, FSDP, FSDP2 and HSDP (a 1x2 mesh) each train K steps, save with
   torch.distributed.checkpoint (dcp.save, and the older save_state_dict + FileSystemWriter;
   DDP also its per-rank torch.optim state_dict() with torch.save), then train K more: the
   uninterrupted run. A copy of the DDP checkpoint with a NaN in a factor matrix that rank 1
   owns is the corrupt checkpoint.
2. "four", 4 ranks: the 2-rank DDP checkpoint loads into DDP with 4 ranks (blocks spread over
   all 4, and over 2 trainer groups of 2); the 1x2 HSDP one into a 2x2 mesh (same shard size:
   blocks only move between replicas); the 2-rank FSDP and FSDP2 ones must fail with a clear
   error and leave the optimizer unchanged. A 2x2 HSDP run saves a checkpoint at step K.
3. "resume", 2 ranks: every checkpoint of run 1 (both DCP APIs, and torch.optim's
   state_dict) is loaded, must restore the saved state bitwise, and the K steps after it must
   reach the uninterrupted run's parameters bitwise; the serial checkpoint (written by this
   process) loads into DDP, which saves again for the way back; the 2x2 HSDP checkpoint loads
   into 1x2; the corrupt checkpoint fails on every rank with nothing changed.

The serial parts (DDP -> 1 process, serial -> DDP -> serial, FSDP -> serial) run here.
"""

import copy
import os
import socket
import tempfile
import warnings
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import (
    AdamGraftingConfig,
    CommunicationDType,
    DDPShampooConfig,
    FSDPShampooConfig,
    FullyShardShampooConfig,
    HSDPShampooConfig,
)
from distributed_shampoo.utils.shampoo_dcp import ShampooLoadPlanner
from distributed_shampoo.utils.shampoo_fsdp_utils import compile_fsdp_parameter_metadata
from tests.dist_teardown import shutdown_process_group

K = 3  # steps before the checkpoint, and after it
BATCH = 8
# Well conditioned (epsilon 1e-3, as tests/test_ddp.py) so that float32 rounding differences
# between world sizes stay at the 1e-6 level instead of being amplified by tiny eigenvalues.
# Roots at steps 2, 4, 6: after the checkpoint at step 3, the schedule needs the restored step.
KWARGS = dict(
    lr=0.02, betas=(0.9, 0.99), epsilon=1e-3, momentum=0.5, weight_decay=0.01,
    max_preconditioner_dim=4, precondition_frequency=2, start_preconditioning_step=2,
    grafting_config=AdamGraftingConfig(beta2=0.99, epsilon=1e-8),
)
# Across world sizes (DDP 2 -> 1 or 4 ranks, HSDP 1x2 <-> 2x2) the gradients are averaged in
# another order, so parameters agree to float32 rounding, as DDP and serial do in test_ddp.py.
TOL = dict(rtol=1e-5, atol=1e-5)
MODES = ("ddp", "fsdp", "fsdp2", "hsdp")
APIS = ("dcp", "legacy")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # 8x6 and 3x8 weights in 4x4 blocks; FSDP's flat shards cut through them.
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def data() -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)


class Run:
    """A model wrapped for one mode, its optimizer, and this rank's part of the batch."""

    def __init__(
        self, mode: str, rank: int = 0, world: int = 1, ddp_config: Any = None, **overrides: Any
    ) -> None:
        model = make_model()
        self.mode, self.module, self.forward = mode, model, model
        kwargs = {**KWARGS, **overrides}
        if mode == "serial":
            config = None
        elif mode == "ddp":
            self.forward = nn.parallel.DistributedDataParallel(model)
            config = DDPShampooConfig(
                communication_dtype=CommunicationDType.FP32, **(ddp_config or {})
            )
        elif mode in ("fsdp", "hsdp"):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

            options: Dict[str, Any] = dict(use_orig_params=True, device_id=torch.device("cpu"))
            if mode == "hsdp":
                mesh = init_device_mesh(
                    "cpu", (world // 2, 2), mesh_dim_names=("replicate", "shard")
                )
                options.update(device_mesh=mesh, sharding_strategy=ShardingStrategy.HYBRID_SHARD)
            for i in (0, 2):
                model[i] = FSDP(model[i], **options)
            self.module = self.forward = FSDP(model, **options)
            metadata = compile_fsdp_parameter_metadata(self.module)
            config = (
                HSDPShampooConfig(device_mesh=mesh, param_to_metadata=metadata)
                if mode == "hsdp"
                else FSDPShampooConfig(param_to_metadata=metadata)
            )
        elif mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for i in (0, 2):
                fully_shard(model[i], mesh=mesh)
            fully_shard(model, mesh=mesh)
            config = FullyShardShampooConfig()
        self.optimizer = DistributedShampoo(
            self.module.parameters(), distributed_config=config, **kwargs
        )
        x, y = data()
        local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        self.x, self.y = x[local], y[local]

    def train(self, steps: int) -> None:
        for _ in range(steps):
            self.optimizer.zero_grad()
            nn.functional.mse_loss(self.forward(self.x), self.y).backward()
            self.optimizer.step()

    def named(self) -> List[Tuple[str, torch.Tensor]]:
        # FSDP1 names nested units "_fsdp_wrapped_module.0._fsdp_wrapped_module.weight"; the
        # plain names make the checkpoint's keys the same in every mode.
        return [
            (n.replace("_fsdp_wrapped_module.", ""), p) for n, p in self.module.named_parameters()
        ]

    def params(self) -> List[torch.Tensor]:
        """This rank's parameter values (a local shard under FSDP/HSDP/FSDP2)."""
        return [
            (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
            for p in self.module.parameters()
        ]

    def model_state(self) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        if self.mode == "serial":
            return self.module.state_dict()
        return get_model_state_dict(self.module)

    def set_model_state(self, state: Dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        if self.mode == "serial":
            self.module.load_state_dict(state)
        else:
            set_model_state_dict(self.module, state)

    def optim_state(self) -> Dict[str, Any]:
        """The optimizer's own state, deep-copied: for bitwise before/after comparisons."""
        groups = [
            {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        ]
        return {"state": flat_state(self), "param_groups": copy.deepcopy(groups)}

    def save(self, path: str, api: str = "dcp") -> None:
        state = {
            "model": self.model_state(),
            "optim": self.optimizer.distributed_state_dict(key_to_param=self.named()),
        }
        if api == "dcp":
            dcp.save(state, checkpoint_id=path)
        else:
            dcp.save_state_dict(state_dict=state, storage_writer=dcp.FileSystemWriter(path))

    def load(self, path: str, api: str = "dcp") -> None:
        """The documented flow: read into the planner's fresh tensors, then validate+copy."""
        state = {
            "model": self.model_state(),
            "optim": self.optimizer.distributed_state_dict(key_to_param=self.named()),
        }
        if api == "dcp":
            dcp.load(state, checkpoint_id=path, planner=ShampooLoadPlanner())
        else:
            reader, planner = dcp.FileSystemReader(path), ShampooLoadPlanner()
            dcp.load_state_dict(state_dict=state, storage_reader=reader, planner=planner)
        self.optimizer.load_distributed_state_dict(state["optim"], key_to_param=self.named())
        self.set_model_state(state["model"])


def flat_state(run: Run) -> Dict[str, Dict[str, torch.Tensor]]:
    return {
        name: {k: v.clone() for k, v in flat.items()}
        for name, flat in run.optimizer.distributed_state_dict(
            key_to_param=run.named(), save_param_groups=False
        )["state"].items()
    }


def same(a: Any, b: Any) -> bool:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and (a.dtype, a.shape) == (b.dtype, b.shape)
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def attempt(action: Callable[[], None]) -> Tuple[str, str]:
    try:
        action()
    except BaseException as error:  # CheckpointException is a BaseException
        return type(error).__name__, str(error)
    return "", ""


# ------------------------------------------------------------------------------- phases
def phase_save(rank: int, world: int, root: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for mode in MODES:
        run = Run(mode, rank, world)
        run.train(K)
        out[f"{mode}/at_checkpoint"] = flat_state(run)
        for api in APIS:
            run.save(os.path.join(root, mode, api), api)
        if mode == "ddp":
            # torch.optim protocol per rank: agrees with the distributed form, block by block.
            standard = run.optimizer.state_dict()
            names = [n for n, _ in run.named()]
            distributed = flat_state(run)
            by_name = {names[i]: dict(flat) for i, flat in standard["state"].items()}
            out["ddp/state_dict_agrees"] = same(by_name, distributed)
            out["ddp/own_blocks"] = sorted(
                (name, key)
                for name, flat in distributed.items()
                for key in flat
                if key != '["step"]'
            )
            torch.save(
                {"model": run.module.state_dict(), "optim": standard},
                os.path.join(root, f"ddp-state_dict-rank{rank}.pt"),
            )
            # A corrupt copy: NaN in a factor matrix that only rank 1 owns.
            bad = copy.deepcopy(run.optimizer.distributed_state_dict(key_to_param=run.named()))
            if rank == 1:
                flat = bad["state"]["0.weight"]
                key = next(k for k in sorted(flat) if "factor_matrices" in k and "inv" not in k)
                flat[key][0] = float("nan")  # packed: entry (0, 0)
                out["ddp/nan_key"] = key
            bad_state = {"model": run.model_state(), "optim": bad}
            dcp.save(bad_state, checkpoint_id=os.path.join(root, "ddp-nan"))
        run.train(K)
        out[f"{mode}/uninterrupted"] = run.params()
    return out


def phase_four(rank: int, world: int, root: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name, mode, config in (
        ("ddp", "ddp", {}),
        ("ddp-trainers2", "ddp", {"num_trainers_per_group": 2}),
        ("hsdp", "hsdp", {}),
    ):
        run = Run(mode, rank, world, ddp_config=config)
        run.load(os.path.join(root, mode, "dcp"))
        first = next(run.module.parameters())
        out[f"{name}/restored_step"] = int(run.optimizer.state[first]["step"])
        run.train(K)
        out[f"{name}/resumed"] = run.params()
    for mode in ("fsdp", "fsdp2"):
        run = Run(mode, rank, world)
        run.train(1)
        before = run.optim_state()
        out[f"{mode}/error"] = attempt(lambda: run.load(os.path.join(root, mode, "dcp")))
        out[f"{mode}/unchanged"] = same(run.optim_state(), before)
    run = Run("hsdp", rank, world)
    run.train(K)
    run.save(os.path.join(root, "hsdp-2x2"))
    return out


def phase_resume(rank: int, world: int, root: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for mode in MODES:
        for api in APIS:
            run = Run(mode, rank, world)
            run.load(os.path.join(root, mode, api), api)
            out[f"{mode}/{api}/restored"] = flat_state(run)
            run.train(K)
            out[f"{mode}/{api}/resumed"] = run.params()
    # torch.optim protocol, per rank (same world size).
    run = Run("ddp", rank, world)
    saved = torch.load(os.path.join(root, f"ddp-state_dict-rank{rank}.pt"), weights_only=False)
    run.module.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optim"])
    run.train(K)
    out["ddp/state_dict/resumed"] = run.params()
    # Serial -> DDP, and DDP -> (later, in the test process) serial.
    run = Run("ddp", rank, world)
    run.load(os.path.join(root, "serial"))
    run.train(K)
    out["ddp/from_serial"] = run.params()
    run.save(os.path.join(root, "ddp-from-serial"))
    # HSDP 2x2 -> 1x2.
    run = Run("hsdp", rank, world)
    run.load(os.path.join(root, "hsdp-2x2"))
    run.train(K)
    out["hsdp/from_2x2"] = run.params()
    # The corrupt checkpoint: rank 1 finds the NaN, both ranks raise, neither changes.
    run = Run("ddp", rank, world)
    run.train(1)
    before = run.optim_state()
    out["ddp/nan_error"] = attempt(lambda: run.load(os.path.join(root, "ddp-nan")))
    out["ddp/nan_unchanged"] = same(run.optim_state(), before)
    return out


PHASES = {"save": phase_save, "four": phase_four, "resume": phase_resume}


def worker(rank: int, world: int, port: int, phase: str, root: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # deprecated DCP APIs, FSDP1 state-dict notices
    out = PHASES[phase](rank, world, root)
    torch.save(out, os.path.join(root, f"{phase}-rank{rank}.pt"))
    shutdown_process_group()


def spawn(world: int, phase: str, root: str) -> List[Dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the ranks inherit the imports this process already paid for (torch, dynamo,
    # FSDP, DCP: ~8 s per rank on 2 cores). This process never initializes torch.distributed
    # nor builds any distributed optimizer, so every rank still starts from nothing but the
    # checkpoint files; each rank runs single-threaded (worker), as DataLoader workers do.
    mp.start_processes(
        worker, args=(world, port, phase, root), nprocs=world, join=True, start_method="fork"
    )
    return [
        torch.load(os.path.join(root, f"{phase}-rank{r}.pt"), weights_only=False)
        for r in range(world)
    ]


def serial_params(steps: int) -> List[torch.Tensor]:
    run = Run("serial")
    run.train(steps)
    return run.params()


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.distributed.fsdp  # noqa: F401  (imported once, before the forks)

        serial = Run("serial")
        serial.train(K)
        serial.save(os.path.join(root, "serial"))
        saved = spawn(2, "save", root)
        four = spawn(4, "four", root)
        resumed = spawn(2, "resume", root)
        # Back in one process: DDP (2 ranks) -> serial, and serial -> DDP -> serial.
        back: Dict[str, Any] = {}
        for source, name in (("ddp/dcp", "from_ddp"), ("ddp-from-serial", "from_ddp_from_serial")):
            run = Run("serial")
            run.load(os.path.join(root, source))
            run.train(K)
            back[name] = run.params()
        run = Run("serial")
        run.train(1)
        before = run.optim_state()
        back["fsdp_error"] = attempt(lambda: run.load(os.path.join(root, "fsdp", "dcp")))
        back["fsdp_unchanged"] = same(run.optim_state(), before)
        yield dict(saved=saved, four=four, resumed=resumed, back=back)


def close(got: List[torch.Tensor], want: List[torch.Tensor]) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_resume_in_fresh_processes_is_bitwise(results, mode: str) -> None:
    # Same world size and config: every rank holds the same blocks and runs the same
    # operations in the same order as the uninterrupted run, so nothing may differ. This
    # holds for FSDP, FSDP2 and HSDP too: with the same world size and wrapping, their
    # reduce-scatters and gloo's all-reduces sum in the same order as before the checkpoint.
    for rank in range(2):
        saved, resumed = results["saved"][rank], results["resumed"][rank]
        for api in APIS:
            where = (mode, api, rank)
            assert same(resumed[f"{mode}/{api}/restored"], saved[f"{mode}/at_checkpoint"]), where
            assert same(resumed[f"{mode}/{api}/resumed"], saved[f"{mode}/uninterrupted"]), where


def test_ddp_torch_optim_state_dict(results) -> None:
    for rank in range(2):
        saved, resumed = results["saved"][rank], results["resumed"][rank]
        assert saved["ddp/state_dict_agrees"]
        assert same(resumed["ddp/state_dict/resumed"], saved["ddp/uninterrupted"])
    # Each rank saved its own blocks only, and together they are all the blocks.
    own = [set(results["saved"][r]["ddp/own_blocks"]) for r in range(2)]
    assert own[0] and own[1] and not own[0] & own[1]


def test_ddp_two_ranks_to_one_and_four(results) -> None:
    expected = serial_params(2 * K)
    close(results["back"]["from_ddp"], expected)
    for rank in range(4):
        for mode in ("ddp", "ddp-trainers2"):  # blocks over 4 ranks, or over 2 groups of 2
            assert results["four"][rank][f"{mode}/restored_step"] == K
            close(results["four"][rank][f"{mode}/resumed"], expected)


def test_serial_to_ddp_and_back(results) -> None:
    for rank in range(2):
        close(results["resumed"][rank]["ddp/from_serial"], serial_params(2 * K))
    close(results["back"]["from_ddp_from_serial"], serial_params(3 * K))


def test_hsdp_reshards_over_replicas(results) -> None:
    # 1x2 -> 2x2 and 2x2 -> 1x2: the shard dimension keeps its size, so the block keys
    # rank_{shard}-block_{k} and their shapes are the same; only which replica holds a
    # block changes, and DCP finds each block where it was written.
    # Rank r of the 2x2 mesh [[0, 1], [2, 3]] holds shard r % 2, as rank r % 2 of the 1x2 one.
    uninterrupted = [results["saved"][rank]["hsdp/uninterrupted"] for rank in range(2)]
    for rank in range(4):
        assert results["four"][rank]["hsdp/restored_step"] == K
        close(results["four"][rank]["hsdp/resumed"], uninterrupted[rank % 2])
    for rank in range(2):
        close(results["resumed"][rank]["hsdp/from_2x2"], uninterrupted[rank])


@pytest.mark.parametrize("mode", ["fsdp", "fsdp2"])
def test_fsdp_family_other_world_size_is_a_clear_error(results, mode: str) -> None:
    for rank in range(4):
        kind, message = results["four"][rank][f"{mode}/error"]
        assert kind in ("KeyError", "ValueError"), (kind, message)
        assert "resharding FSDP-family checkpoints across world sizes is not supported" in message
        assert '-block_' in message and "rank_" in message  # names the offending key
        assert results["four"][rank][f"{mode}/unchanged"]
    kind, message = results["back"]["fsdp_error"]
    assert kind in ("KeyError", "ValueError") and "rank_0-block_" in message, message
    assert "not supported" in message
    assert results["back"]["fsdp_unchanged"]


def test_corrupt_checkpoint_fails_on_every_rank_and_changes_nothing(results) -> None:
    key = results["saved"][1]["ddp/nan_key"]
    for rank in range(2):
        kind, message = results["resumed"][rank]["ddp/nan_error"]
        assert kind == "ValueError" and "NaN" in message and key in message, message
        assert results["resumed"][rank]["ddp/nan_unchanged"]
