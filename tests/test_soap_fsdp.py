"""Eigenvalue-corrected Shampoo (SOAP, issue 14) under FSDP (v1) and FSDP2 on CPU with gloo:
tests/test_fsdp.py's scenarios with a SOAP config. Sharded SOAP preconditions each rank's shard
pieces on their own, so it must equal a single-process SOAP run on every piece as its own
parameter (whose own correctness tests/test_soap.py checks against the oracle)."""

import os
import socket
import tempfile
from typing import List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_shampoo import DefaultEigenvalueCorrectedShampooConfig, DefaultSOAPConfig
from tests import test_fsdp
from tests.dist_teardown import shutdown_process_group

SOAP_KWARGS = {
    **test_fsdp.KWARGS,
    "betas": (0.9, 0.95),
    "grafting_config": None,
    "preconditioner_config": DefaultEigenvalueCorrectedShampooConfig,
    # eigh every step: an eigenbasis computed while D has seen only gradients in the factor's
    # span (repeated eigenvalues then carry D ~ 0; see tests/test_soap.py's docstring)
    "precondition_frequency": 1,
    "start_preconditioning_step": 1,
}
NAMES = ["fsdp-aligned", "fsdp2-aligned", "fsdp-unaligned"]


def _kwargs(name: str) -> dict:
    # QR (warm-started) where every block is a bias-free 2 x 2 block, full rank from step 2 on:
    # elsewhere a repeated eigenvalue would let float32 rounding pick another eigenbasis
    qr = {"preconditioner_config": DefaultSOAPConfig, "precondition_frequency": 2, "start_preconditioning_step": 2}
    return {**SOAP_KWARGS, **qr} if name == "fsdp-aligned" else SOAP_KWARGS


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for name in NAMES:
        test_fsdp.KWARGS = _kwargs(name)  # the scenario runners read it at call time
        run, build, max_dim, hybrid = test_fsdp.SCENARIOS[name]
        results[name] = run(rank, world, build, max_dim, hybrid)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown_process_group()


@pytest.fixture(scope="module")
def two_ranks() -> List[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(2, port, out_dir), nprocs=2, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", NAMES)
def test_soap_sharded_equals_piecewise(two_ranks: List[dict], name: str, monkeypatch) -> None:
    monkeypatch.setattr(test_fsdp, "KWARGS", _kwargs(name))
    test_fsdp.check(two_ranks, name)
    keys = {k for r in two_ranks for _, k in r[name]["keys"]}
    assert keys, "every rank reports its blocks"
