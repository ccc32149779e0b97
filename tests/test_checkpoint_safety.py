"""Issue 16 item 5: state dicts load with weights_only=True; digests catch corrupted data; the
examples' Checkpointer publishes a checkpoint only when complete and loads atomically."""

import argparse
import io
import pathlib
import random
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
from test_atomicity import assert_bitwise_equal

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.matrix_functions_types import CoupledHigherOrderConfig
from distributed_shampoo.shampoo_types import AdamGraftingConfig, PrecisionConfig
from distributed_shampoo.utils.shampoo_digest import (
    state_digests,
    tensor_digest,
    verify_digests,
    weighted_digest,
)


def _trained(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    opt = DistributedShampoo(net.parameters(), precondition_frequency=2, max_preconditioner_dim=4,
                             grafting_config=AdamGraftingConfig(), **kwargs)
    for step in range(3):
        opt.zero_grad()
        net(torch.randn(4, 6)).square().sum().backward()
        opt.step()
    return net, opt


def test_state_dict_loads_with_weights_only() -> None:
    _, opt = _trained(precision_config=PrecisionConfig(factor_matrix_dtype=torch.float64),
                      root_inv_config=CoupledHigherOrderConfig(rel_epsilon=0.0))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    group = loaded["param_groups"][0]
    assert group["grafting_config"] == AdamGraftingConfig()
    assert group["precision_config"].factor_matrix_dtype == torch.float64
    _, other = _trained(seed=1, precision_config=PrecisionConfig(factor_matrix_dtype=torch.float64),
                        root_inv_config=CoupledHigherOrderConfig(rel_epsilon=0.0))
    other.load_state_dict(loaded)
    assert_bitwise_equal(opt.state_dict()["state"], other.state_dict()["state"])


@pytest.mark.parametrize("digest", [tensor_digest, lambda t: weighted_digest(t.view(torch.uint8))])
def test_every_single_bit_flip_changes_the_digest(digest) -> None:
    """CRC-32 (CPU) and the weighted sum (used on other devices, run here on CPU)."""
    t = torch.randn(33)  # 132 bytes: a partial last word too
    reference = digest(t)
    words = t.view(torch.int32)
    for i in range(words.numel()):
        for bit in range(32):
            flipped = words.clone()
            flipped[i] ^= (1 << bit) if bit < 31 else -(1 << 31)
            assert digest(flipped.view(torch.float32)) != reference, (i, bit)
    swapped = t.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert digest(swapped) != reference


def test_verify_digests_names_the_corrupted_key() -> None:
    net, opt = _trained()
    state = opt.distributed_state_dict(key_to_param=net.named_parameters())
    digests = state_digests(state)
    verify_digests(state, digests)  # intact
    key = sorted(k for k in state["state"]["0.weight"] if "factor_matrices" in k)[0]
    original = state["state"]["0.weight"][key].clone()
    corrupted = {"state": {fqn: dict(v) for fqn, v in state["state"].items()}}
    bad = original.clone()
    bad.view(-1).view(torch.int32)[3] ^= 1 << 7
    corrupted["state"]["0.weight"][key] = bad
    with pytest.raises(ValueError, match="integrity") as raised:
        verify_digests(corrupted, digests)
    assert f"'0.weight.{key}'" in str(raised.value)
    with pytest.raises(ValueError, match="missing or unreadable"):
        verify_digests(state, "")


class _Runtime:
    rank, world_size, local_rank, device, is_main = 0, 1, 0, torch.device("cpu"), True


def _checkpointer(tmp_path, seed=0):
    from checkpointing import Checkpointer

    net, opt = _trained(seed)
    return net, opt, Checkpointer(str(tmp_path), _Runtime(), net, opt, keep=2)


ARGS = argparse.Namespace(seed=0, batch_size=4)


def _snapshot(net, opt):
    return {"model": {k: v.clone() for k, v in net.state_dict().items()},
            "optim": {k: v.clone() for k, v in opt.distributed_state_dict(
                key_to_param=net.named_parameters())["state"]["0.weight"].items()}}


def test_checkpointer_publishes_only_complete_checkpoints(tmp_path, monkeypatch) -> None:
    import torch.distributed.checkpoint as dcp

    net, opt, ckpt = _checkpointer(tmp_path)
    ckpt.save(3, ARGS)
    assert ckpt.latest() == tmp_path / "step_00000003"
    assert not list(tmp_path.glob(".tmp_*"))
    real_save = dcp.save

    def killed(state, checkpoint_id):  # writes part of the data, then the process "dies"
        real_save(state, checkpoint_id=checkpoint_id)
        (pathlib.Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(dcp, "save", killed)
    for step in (3, 5):  # re-saving an existing step, and a new one
        with pytest.raises(KeyboardInterrupt):
            ckpt.save(step, ARGS)
    monkeypatch.setattr(dcp, "save", real_save)
    assert ckpt.latest() == tmp_path / "step_00000003"
    other_net, other_opt, other = _checkpointer(tmp_path, seed=1)
    assert other.load(ckpt.latest(), ARGS) == 3  # the old checkpoint is intact
    assert_bitwise_equal(_snapshot(net, opt), _snapshot(other_net, other_opt))


def test_checkpointer_refuses_flipped_bits_and_changes_nothing(tmp_path) -> None:
    net, opt, ckpt = _checkpointer(tmp_path)
    ckpt.save(3, ARGS)
    data = tmp_path / "step_00000003" / "__0_0.distcp"
    clean = data.read_bytes()
    other_net, other_opt, other = _checkpointer(tmp_path, seed=1)
    rng = random.Random(0)
    outcomes = {"refused": 0, "identical": 0}
    for _ in range(12):
        raw = bytearray(clean)
        position = rng.randrange(len(raw))
        raw[position] ^= 1 << rng.randrange(8)
        data.write_bytes(bytes(raw))
        before = _snapshot(other_net, other_opt)
        try:
            other.load(tmp_path / "step_00000003", ARGS)
        except BaseException:  # CheckpointException is a BaseException
            outcomes["refused"] += 1
            assert_bitwise_equal(before, _snapshot(other_net, other_opt))
            continue
        # loaded: the optimizer state must be exactly what was saved (the flip hit metadata
        # padding or the model weights, which the digests do not cover)
        outcomes["identical"] += 1
        assert_bitwise_equal(_snapshot(net, opt)["optim"], _snapshot(other_net, other_opt)["optim"])
    assert outcomes["refused"] >= 1
