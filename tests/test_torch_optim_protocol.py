"""torch.optim behaviours users rely on: LR schedulers (lr read every step), step hooks,
closures."""

import torch
from torch import nn

from distributed_shampoo.distributed_shampoo import DistributedShampoo
from distributed_shampoo.shampoo_types import SGDGraftingConfig


def test_lr_scheduler_changes_the_step_size() -> None:
    """In the SGD-grafting phase with beta1 = 0 and no momentum the update is exactly
    -fl32(lr) * g (SPEC B §4.8, §4.11), so each step shows the scheduler's current lr."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(3, 2))
    optimizer = DistributedShampoo(
        [weight], lr=0.1, betas=(0.0, 1.0), start_preconditioning_step=1000,
        precondition_frequency=1000, grafting_config=SGDGraftingConfig(),
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for lr in (0.1, 0.05, 0.025):
        grad = torch.randn(3, 2)
        before = weight.detach().clone()
        weight.grad = grad.clone()
        optimizer.step()
        scheduler.step()
        expected = before + (-torch.tensor(lr, dtype=torch.float32)) * grad
        torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=0)


def test_step_hooks_and_closure() -> None:
    model = nn.Linear(2, 1)
    optimizer = DistributedShampoo(model.parameters(), lr=0.01)
    calls = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(torch.ones(1, 2)).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
    assert optimizer.step() is None
