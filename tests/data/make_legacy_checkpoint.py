"""Writes tests/data/legacy_checkpoint/: a checkpoint made by the code of Dec 2026, before
issue 11 changed how factor matrices and inverse roots are stored (full d x d tensors then).

Kept so that tests/test_legacy_checkpoint.py can prove such checkpoints still load and resume
bit for bit. Do NOT rerun it with newer code (the files would then test nothing); it is here
to say exactly how the files were made.

    python tests/data/make_legacy_checkpoint.py
"""

import shutil
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_legacy_checkpoint import DATA, make, snapshot, train  # noqa: E402


def main() -> None:
    if DATA.exists():
        shutil.rmtree(DATA)
    DATA.mkdir(parents=True)
    model, optimizer = make()
    train(model, optimizer, range(1, 6))  # inverse roots at steps 2 and 4
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, DATA / "standard.pt")
    dcp.save(
        {"model": model.state_dict(),
         "optim": optimizer.distributed_state_dict(key_to_param=model.named_parameters())},
        checkpoint_id=str(DATA / "dcp"),
    )
    at_save = snapshot(model, optimizer)
    train(model, optimizer, range(6, 10))  # roots at steps 6 and 8
    torch.save({"at_save": at_save, "after": snapshot(model, optimizer),
                "params": [p.detach().clone() for p in model.parameters()]}, DATA / "expected.pt")


if __name__ == "__main__":
    main()
