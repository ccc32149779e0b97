"""CUDA's step-failure flag (SPEC A.3.12): a failed check on the device is recorded in a
two-element device tensor (step, block) instead of making the host wait; the host raises once
the copy of it has arrived. Also the factor-update overflow check (shampoo_overflow.py), which
on CUDA records into the same flag. A mixin of ShampooGroupEngine."""

from typing import Any

import torch

from distributed_shampoo import _backend


class DeviceFailureFlag:
    """The overflow check and the deferred raise of a failure recorded on the device."""

    # set by ShampooGroupEngine.__init__
    layout: Any
    overflow: Any
    factors: torch.Tensor
    active: torch.Tensor
    shampoo_dtype: torch.dtype
    step_count: torch.Tensor
    on_cuda: bool
    fail: Any

    def _init_failure_flag(self) -> None:
        # CUDA: the step's failure flag stays on the device (a step that computes no root
        # inverse must not wait for the GPU); a pinned copy is read once it has arrived.
        self.fail = _backend.new_failure_flag(self.device) if self.on_cuda else None
        self._fail_seen = (
            torch.full((2,), _backend.FAIL_NONE, dtype=torch.int64).pin_memory() if self.on_cuda else None
        )
        # marks the last copy into _fail_seen (recorded each step; None before the first)
        self._fail_copied = torch.cuda.Event() if self.on_cuda else None
        self._fail_recorded = False

    def _record_failure_copy(self) -> None:
        """Starts the copy of the flag to the host (no wait)."""
        self._fail_seen.copy_(self.fail, non_blocking=True)
        # on the stream the copy above ran on (the parameters' device), not the current
        # device's: in a multi-GPU process they differ
        self._fail_copied.record(torch.cuda.current_stream(self.device))
        self._fail_recorded = True

    def _check_overflow(self, step: int) -> torch.Tensor:
        """Raises (CPU) or records in the failure flag (CUDA, no host wait) when the coming
        factor update could overflow (shampoo_overflow.py), before anything is written.
        Returns the per-factor bound of the new factors' entries."""
        assert self.overflow is not None
        first, bound = self.overflow.first_overflow(self.factors, self.active)
        if self.on_cuda:
            # as gather does: only if no earlier failure is recorded; the block field holds
            # -2 - factor so that _raise_device_failure can tell this cause apart
            record = (first >= 0) & (self.fail[0] > step)
            self.fail[1] = torch.where(record, -2 - first, self.fail[1])
            self.fail[0] = torch.where(record, step, self.fail[0])
            return bound
        factor = int(first)
        if factor >= 0:
            raise ValueError(self._overflow_message(factor))
        return bound

    def _overflow_message(self, factor: int, step: int | None = None) -> str:
        layout = self.layout
        block = int(layout.factor_block[factor])
        at = "" if step is None else f" at step {step}"
        limit = self.overflow.limit if self.overflow is not None else float("nan")
        return (
            f"The gradient of {self.describe_block(block)}{at} is too large: the update of factor "
            f"matrix {layout.factor_label(factor)} could exceed the largest finite value "
            f"({limit:.4g}) of its dtype ({self.factors.dtype}, computed in {self.shampoo_dtype}). "
            "The step was not taken; parameters and optimizer state are unchanged. To mitigate, "
            "scale or clip the gradients, or use a float64 factor_matrix_dtype."
        )

    def _raise_device_failure(self, wait: bool) -> None:
        """CUDA: raises for a step whose gradient held NaN/Inf, once the host knows of it
        (at once when `wait`). The device skipped that step and every later one (the flag is
        sticky), so rolling the step count back leaves the optimizer exactly as after the
        last good step."""
        event = self._fail_copied
        if not self._fail_recorded:
            return
        if not event.query():
            if not wait:
                return
            event.synchronize()
        step, block = (int(v) for v in self._fail_seen.tolist())
        if step == _backend.FAIL_NONE:
            return
        skipped = int(self.step_count) + 1 - step
        self.fail.fill_(_backend.FAIL_NONE)
        self._fail_seen.fill_(_backend.FAIL_NONE)
        self.step_count.fill_(step - 1)
        if block <= -2:  # recorded by _check_overflow
            raise ValueError(self._overflow_message(-2 - block, step))
        where = (
            f"the gradient of {self.describe_block(block)}"
            if block != _backend.FAIL_NONE
            else "a gradient on another rank of the trainer group"
        )
        raise ValueError(
            f"Encountered nan or inf values in {where} at step {step}. On CUDA this is found "
            f"without waiting for the GPU, so it is reported now; that step and the "
            f"{max(skipped - 1, 0)} after it were not taken: parameters and optimizer state "
            f"are unchanged since step {step - 1}."
        )
