"""One parameter group's Shampoo state in flat buffers, and its step (SPEC B §3, §4).

All per-block arithmetic happens in `_backend` calls over the whole block table, a constant
number per step, so Python work grows with the number of parameters (gradient lists) but
never with the number of blocks. Everything that can fail (non-finite gradients, factor
matrices or inverse roots; a failed root computation with protection off) is proven
impossible or computed into scratch first, so a failed step leaves parameters and state
bitwise unchanged (SPEC A.3.12): a step without roots updates the factors in place once the
overflow proof (shampoo_overflow.py) holds; a root step stages new factors and roots in
buffers that live for that step only.
"""

import logging
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch.autograd.graph import increment_version

from distributed_shampoo import _backend
from distributed_shampoo._backend_io import gather_io, scatter_io
from distributed_shampoo.shampoo_types import PrecisionConfig, StaggeredRootScheduleConfig
from distributed_shampoo.utils.shampoo_block_layout import (
    BlockLayout,
    TensorPiece,
    build_block_layout,
    select_blocks,
    whole_tensors,
)
from distributed_shampoo.utils.shampoo_ddp_distributor import DDPExchange, DDPPlacement
from distributed_shampoo.utils.shampoo_device_failure import DeviceFailureFlag
from distributed_shampoo.utils.shampoo_engine_setup import (  # noqa: F401 (re-exported)
    GraftingSpec,
    StepPlan,
    kernel_dtype,
    local_tensor,
    root_method_kwargs,
)
from distributed_shampoo.utils.shampoo_engine_state import GroupStateLayout
from distributed_shampoo.utils.shampoo_overflow import FactorOverflowGuard
from distributed_shampoo.utils.shampoo_packed_chunks import PackedFactors
from distributed_shampoo.utils.shampoo_param_io import ParamIO, StepIO
from distributed_shampoo.utils.shampoo_residuals import log_root_inverse_residuals
from distributed_shampoo.utils.shampoo_root_schedule import RootSchedule
from distributed_shampoo.utils.shampoo_roots_in_apply import (
    RootsInApply, ShampooRootsInApply, bias_corrected_fits, certify, check_factors, factors_known_sound,
)
from distributed_shampoo.utils.shampoo_root_status import log_non_diagonal, raise_non_finite, report_root_statuses
from distributed_shampoo.utils.shampoo_scalars import float32_bias_correction
from distributed_shampoo.utils.shampoo_step_pipeline import StepPipeline
from distributed_shampoo.utils.shampoo_step_checks import (
    GroupValues,
    check_grad,
    check_params,
    read_step_scalars,
)

logger = logging.getLogger("distributed_shampoo.distributed_shampoo")
_ROOT_OK = (_backend.ROOT_OK, _backend.ROOT_MAX_ITERS, _backend.ROOT_RETRIED_DOUBLE)


class ShampooGroupEngine(GroupStateLayout, DeviceFailureFlag, ParamIO, StepPipeline, ShampooRootsInApply):
    """Flat state buffers, block table and step of one parameter group on one device."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        group: dict[str, Any],
        group_index: int,
        shampoo_dtype: torch.dtype | None,
        use_protected_eigh: bool,
        ddp: DDPPlacement | None = None,
        pieces: Sequence[TensorPiece] | None = None,
        key_prefix: str = "block_",
        root_schedule: StaggeredRootScheduleConfig | None = None,
    ) -> None:
        """`pieces` (default: every parameter whole) says how parameters are cut before
        blocking (FSDP); `ddp` spreads the blocks over a trainer group."""
        self.params = list(params)
        # The tensors the optimizer reads and writes: a DTensor parameter's local shard (FSDP2).
        self.locals = [local_tensor(p) for p in self.params]
        self.group_index = group_index
        self.use_protected_eigh = use_protected_eigh
        # The kernels spread blocks over as many threads as torch uses (BLAS stays at one
        # thread inside the step; see _backend.single_threaded_blas).
        self.num_threads = max(1, torch.get_num_threads())
        self.device = self._common_device(self.params)
        precision: PrecisionConfig = group["precision_config"]
        # A non-integer root r (eigen method only, validated) applies -exponent_multiplier / r
        # to the spectrum: the table's integer root is 1 and the multiplier is divided by r,
        # which gives the same alpha bit for bit.
        override = group["inv_root_override"]
        fractional = isinstance(override, float) and not override.is_integer()
        self.exponent_multiplier = float(group["exponent_multiplier"])
        if fractional:
            self.exponent_multiplier /= override
        # All blocks of the group; this engine keeps state for, and computes, its own blocks:
        # all of them, or under DDP the ones this rank owns.
        self.full_layout = build_block_layout(
            [t.numel() for t in self.locals],
            pieces if pieces is not None else whole_tensors([tuple(t.shape) for t in self.locals]),
            group["max_preconditioner_dim"],
            group["use_merge_dims"],
            1 if fractional else override,
            key_prefix,
        )
        owners = ddp.owners(self.full_layout) if ddp is not None else None
        self.layout: BlockLayout = (
            self.full_layout if ddp is None else select_blocks(self.full_layout, owners == ddp.group_rank)
        )
        layout = self.layout
        # Read once at construction (SPEC B §1.4).
        self.beta2 = float(group["betas"][1])
        self.epsilon = float(group["epsilon"])
        # every later step reads the group through this (validated again when edited)
        self.values = GroupValues(group, group_index)
        self.root_kwargs = root_method_kwargs(group["root_inv_config"])
        self.grafting = GraftingSpec(group["grafting_config"])
        self.working_dtype = kernel_dtype(precision.computation_dtype)
        self.shampoo_dtype = kernel_dtype(shampoo_dtype or precision.computation_dtype)

        def zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(numel, dtype=dtype, device=self.device)

        n = layout.numel
        self.table = _backend.KernelTable(layout.table, self.device)
        self.on_cuda = self.device.type == "cuda"
        if self.on_cuda and self.root_kwargs["method"] != "eigen":
            raise ValueError(
                f"param group {group_index}: root_inv_config {type(group['root_inv_config']).__name__} "
                "is not available for CUDA parameters; use EigenConfig (the default)."
            )
        self.exchange: DDPExchange | None = None
        if ddp is not None:
            self.exchange = DDPExchange(self.full_layout, owners, ddp, self.device, self.working_dtype)
            # finish() packs this rank's updates block after block: the all-gather payload
            # (DDPExchange.new_payload, for the length of a step).
            self.payload: torch.Tensor | None = None
            self.full_active = torch.zeros(self.full_layout.num_blocks, dtype=torch.uint8, device=self.device)
            self.full_active_host = self.full_active if not self.on_cuda else torch.zeros_like(self.full_active, device="cpu")
        # Live optimizer state (storage dtypes of SPEC B §3 / §6).
        # Factor matrices and inverse roots packed (upper triangles, shampoo_packed_chunks.py);
        # the kernels see them in full in a bounded scratch, chunk by chunk.
        self.packing = PackedFactors(layout, self.device, self.shampoo_dtype)
        self.factors = zeros(self.packing.numel, precision.factor_matrix_dtype)
        self.inv_factors = zeros(self.packing.numel, precision.inv_factor_matrix_dtype)
        self.factor_active = torch.zeros(layout.factor_count, dtype=torch.uint8, device=self.device)
        self.diagonal = torch.ones(layout.factor_count, dtype=torch.bool, device=self.device)
        self.grafting_state = (
            zeros(n, precision.grafting_state_dtype) if self.grafting.has_state else None
        )
        self.filtered_grad = zeros(n, precision.filtered_grad_dtype) if group["betas"][0] != 0 else None
        self.momentum = zeros(n, precision.momentum_dtype) if group["momentum"] != 0 else None
        self.step_count = torch.zeros((), dtype=torch.int64)
        certify(self, True)  # zero factors: finite, diagonals >= 0 (shampoo_roots_in_apply.py)
        # proves before each factor update that no entry can overflow (shampoo_overflow.py)
        self.overflow = (
            FactorOverflowGuard(layout, self.factors.dtype, self.shampoo_dtype, self.beta2, self.device)
            if layout.factor_numel > 0
            else None
        )
        # what an unstaged root step needs of the configuration, fixed from here on
        self._roots_config_proven = self._roots_in_apply_config_ok()
        # Scratch: gradients are read and parameters written where they are
        # (shampoo_param_io.py), and the per-block pipeline runs chunk by chunk
        # (shampoo_step_pipeline.py): its buffers are bounded by a chunk, not the model.
        self._init_param_io()
        # No persistent copy of the factors or roots: a root step stages its new factors and
        # roots in buffers allocated for that step only (StepPlan), so that a failure found
        # after computing them changes nothing; other steps update the factors in place.
        self.diagonal_work = torch.ones_like(self.diagonal)
        self.root_status = torch.zeros(layout.factor_count, dtype=torch.int32)
        self.root_commit = torch.zeros(layout.factor_count, dtype=torch.uint8, device=self.device)
        self.active = torch.zeros(layout.num_blocks, dtype=torch.uint8, device=self.device)
        # the pointer-table kernels build their tables on the host from this copy (CUDA: a
        # second, CPU copy, so that no step reads the device mask back)
        self.active_host = self.active if not self.on_cuda else torch.zeros_like(self.active, device="cpu")
        self._scratch: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._init_pipeline()
        self._step_io: StepIO | None = None
        self._active_params: tuple[bool, ...] | None = None
        self._live: list[int] = []
        # opt-in staggered inverse roots (shampoo_root_schedule.py); None: all at once
        self.schedule = (
            None if root_schedule is None else self._schedule_class(root_schedule, layout, self.packing, self.device)
        )
        self._init_failure_flag()

    @staticmethod
    def _common_device(params: Sequence[torch.Tensor]) -> torch.device:
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                f"All parameters of a param group must be on one device; got {sorted(map(str, devices))}."
            )
        device = devices.pop() if devices else torch.device("cpu")
        _backend.check_device_supported(device, "params")
        return device

    # ------------------------------------------------------------------------------ step
    def _set_active(self, active_params: tuple[bool, ...]) -> None:
        if self._active_params is not None and int(self.step_count) >= 1:
            # The reference's text, verbatim (users filter on it), although no PT2 graph is
            # recompiled here: blocks of parameters without gradients are left untouched.
            logger.warning(
                "PT2 will recompile because the gradient selction of model parameters have "
                "changed from the previous step. Possible reasons include some gradients are "
                "None. If this is not intended, please check the data and/or model."
            )
        self._active_params = active_params
        per_param = np.asarray(active_params, dtype=np.uint8)
        self.active.copy_(torch.from_numpy(per_param[self.layout.block_param]))
        if self.active_host is not self.active:
            self.active_host.copy_(torch.from_numpy(per_param[self.layout.block_param]))
        self.factor_active.copy_(torch.from_numpy(per_param[self.layout.block_param[self.layout.factor_block]]))
        if self.exchange is not None:
            self.full_active.copy_(torch.from_numpy(per_param[self.full_layout.block_param]))
            if self.full_active_host is not self.full_active:
                self.full_active_host.copy_(torch.from_numpy(per_param[self.full_layout.block_param]))
        self._live = [i for i, a in enumerate(active_params) if a]
        self._live_params = [self.locals[i] for i in self._live]

    def prepare(self, group: dict[str, Any]) -> Optional["StepPlan"]:
        """The fallible half of a step (SPEC B §4.1-§4.6): gathers and checks the gradients
        and, on a root step, computes new factors and inverse roots into scratch. Raises
        before any parameter or state changes; returns None when no gradient exists.
        (Group edits are expected to be the same on every rank: they are checked here.)"""
        try:
            return self._prepare(group)
        except BaseException:
            self._scratch.clear()  # the step's scratch is transient (see apply)
            raise

    def _prepare(self, group: dict[str, Any]) -> Optional["StepPlan"]:
        where = f"param group {self.group_index}: "
        values = self.values.current(group)
        check_params(group, self.params, where)
        grads = [None if p.grad is None else local_tensor(p.grad) for p in self.params]
        for i, g in enumerate(grads):
            if g is not None:
                check_grad(self.locals[i], g, self._describe_param(i))
        active_params = tuple(g is not None for g in grads)
        if active_params != self._active_params:
            self._set_active(active_params)
        if not self._live:
            return None
        if self.exchange is None or (self.on_cuda and not self._may_root_step(values)):
            # CUDA non-root steps agree through the device flag (agree_on_device_failure)
            return self._prepare_live(values, grads)
        # Under DDP every rank learns whether any rank failed, so that all raise together
        # rather than some waiting forever in the all-gather (SPEC A.3.6).
        try:
            plan = self._prepare_live(values, grads)
        except Exception:
            self.exchange.agree_on_failure(True)
            raise
        if self.exchange.agree_on_failure(False):
            raise RuntimeError(
                f"The optimizer step failed on another rank of the trainer group (param group "
                f"{self.group_index}; that rank raised the cause). The step was not taken; "
                "parameters and optimizer state are unchanged."
            )
        return plan
    def _prepare_live(self, group: dict[str, Any], grads: list[torch.Tensor | None]) -> "StepPlan":
        """`group`: the validated values (GroupValues.current)."""
        self.num_threads = max(1, torch.get_num_threads())  # follows torch.set_num_threads
        live_grads = [grads[i] for i in self._live]
        t = int(self.step_count) + 1
        scalars = read_step_scalars(
            group, t, self.grafting.bias_corrected, self.grafting.beta2, self.beta2,
            f"param group {self.group_index}: ",
        )
        beta1, momentum = scalars.beta1, scalars.momentum
        if beta1 != 0.0 and self.filtered_grad is None:
            raise ValueError(
                f"param group {self.group_index}: betas[0]={beta1} but it was 0 at construction, "
                "so no filtered-gradient state exists; set betas[0] before constructing."
            )
        if momentum != 0.0 and self.momentum is None:
            raise ValueError(
                f"param group {self.group_index}: momentum={momentum} but it was 0 at "
                "construction, so no momentum state exists; set momentum before constructing."
            )

        weight_decay, decoupled = scalars.weight_decay, scalars.decoupled
        if self.on_cuda and self.exchange is None:
            # an earlier step's failure, if already known. Under DDP only root steps look
            # (all ranks at the same step), so that no rank raises while others all-gather.
            self._raise_device_failure(wait=False)
        root_step = self._is_root_step(group)
        sound = factors_known_sound(self)
        l2 = 0.0 if decoupled else weight_decay
        sq_norms = None if self.overflow is None else self.overflow.sq_norms
        communicate_params = self.exchange is not None and self.exchange.communicate_params
        io = self._step_io = StepIO(l2=l2)
        if self._direct_io(grads):
            live = self._live_mask()
            io.grads = self._io_list(grads, live)
            io.params_all = self._io_list(self.locals, live)
            # the parameters in block layout only where finish() cannot read them in place:
            # DDP's payload (decoupled weight decay, or the parameters it all-gathers)
            io.param_blocks_wanted = self.exchange is not None and (
                communicate_params or (decoupled and weight_decay != 0.0)
            )
            io.params = io.params_all if (l2 != 0.0 or io.param_blocks_wanted) else None
            # read only: the gradients are read again, chunk by chunk, when they are used
            bad = gather_io(
                None, None, io.grads, io.params, self.locator, self.table, self.active_host, l2,
                sq_norms=sq_norms, step=t, fail=self.fail,
            )
        else:
            # staged (odd dtypes): param-layout copies and G in block layout,
            # for this step only
            grad_flat, grad_views = self._staged_flat()
            torch._foreach_copy_(grad_views, live_grads)
            param_flat = None
            io.grad_blocks = self._block_scratch()
            if weight_decay != 0.0 or communicate_params:
                param_flat, param_views = self._staged_flat()
                io.param_blocks = self._block_scratch()
                torch._foreach_copy_(param_views, self._live_params)
            bad = _backend.gather(
                io.grad_blocks, io.param_blocks, grad_flat, param_flat, self.table, self.active,
                l2, step=t, fail=self.fail, sq_norms=sq_norms,
            )
            del grad_flat, grad_views, param_flat
        if bad >= 0:
            raise ValueError(
                f"Encountered nan or inf values in the gradient of {self.describe_block(bad)}. "
                "The step was not taken; parameters and optimizer state are unchanged."
            )
        bound = None if self.overflow is None else self._check_overflow(t)
        if self.on_cuda:
            if self.exchange is not None:
                self.exchange.agree_on_device_failure(self.fail)
            self._record_failure_copy()
            if root_step:  # a root step waits for the device anyway: report at once
                self._raise_device_failure(wait=True)

        bias_correction = 1.0
        factor_work = root_work = None
        due = self._due_roots(group) if root_step and self.schedule is not None else None
        in_apply = False
        if root_step:
            if scalars.shampoo_bias_correction:
                bias_correction = float32_bias_correction(self.beta2, t)
            # unstaged when the step provably cannot raise (shampoo_roots_in_apply.py)
            if self._roots_config_proven and bound is not None:
                sound = sound or check_factors(self)
                in_apply = sound and bias_corrected_fits(self, bound, bias_correction)
        self._sound_at_start = sound
        if in_apply:
            pass  # nothing to stage: apply() computes and commits the roots chunk by chunk
        elif due is not None:
            # staggered (shampoo_root_schedule.py): staging bounded by the phase's blocks
            self.diagonal_work.copy_(self.diagonal)
            factor_work, root_work = self.schedule.stage(self, due, bias_correction)
            log_non_diagonal(self.layout, self.diagonal, self.diagonal_work)
            self._check_roots()
        elif root_step:
            # transient (freed when the step ends): twice the packed factors, Shampoo dtype
            factor_work = torch.empty(self.packing.numel, dtype=self.shampoo_dtype, device=self.device)
            root_work = self._new_root_work(factor_work)
            self.diagonal_work.copy_(self.diagonal)
            self._stage_root_step(factor_work, root_work, bias_correction)
            log_non_diagonal(self.layout, self.diagonal, self.diagonal_work)
            self._check_roots()
        self._step_io = None
        return StepPlan(t, root_step, bias_correction, scalars, factor_work, root_work, io=io, due=due,
                        roots_in_apply=in_apply)

    def _is_root_step(self, group: dict[str, Any]) -> bool:
        """Whether the coming step computes inverse roots (SPEC B §4.6). `group`: validated
        values."""
        if self.schedule is not None:
            return self._due_roots(group) is not None
        t = int(self.step_count) + 1
        frequency, start = group["precondition_frequency"], group["start_preconditioning_step"]
        return self.layout.factor_numel > 0 and ((t % frequency == 0 and t > start) or t == start)

    def _may_root_step(self, group: dict[str, Any]) -> bool:
        """Whether any rank may compute roots at the coming step: with the staggered schedule
        every step from start on (a phase may be empty on one rank only), so that all ranks
        take the same collective path in prepare()."""
        if self.schedule is None:
            return self._is_root_step(group)
        return self.layout.factor_numel > 0 and int(self.step_count) + 1 >= group["start_preconditioning_step"]

    def _due_roots(self, group: dict[str, Any]) -> Any:
        """The staggered schedule's plan of the coming step (None: no root due here)."""
        assert self.schedule is not None
        frequency = group["precondition_frequency"]
        key = self.schedule.due(int(self.step_count) + 1, frequency, group["start_preconditioning_step"])
        return None if key is None else self.schedule.plan(frequency, key)

    def _stage_root_step(self, factor_work: torch.Tensor, root_work: torch.Tensor, bias_correction: float) -> None:
        """A root step's new factors and inverse roots into the packed staging buffers, each
        chunk's roots computed while its new factors are in scratch; statuses and diagonal
        flags land in root_status and diagonal_work. Live state is not touched."""
        factor_work.copy_(self.factors)  # inactive factors keep their values
        scratch, roots = self.packing.scratch(), self.packing.scratch()
        for c in self.packing.chunks:
            active = self.active[c.block_start : c.block_stop]
            full = self.packing.unpack(scratch, factor_work, c, self.active)
            grads, grads_table = self._root_step_grads(c)  # G of the chunk (chunk scratch)
            _backend.factor_update(
                full, full, grads, grads_table, active, self.beta2, num_threads=self.num_threads, fail=self.fail
            )
            self.packing.pack(factor_work, full, c, self.factor_active)
            out = roots[: c.full_numel]
            _backend.root_inverse(
                out, full, c.table, active,
                epsilon=self.epsilon, exponent_multiplier=self.exponent_multiplier,
                bias_correction=bias_correction,
                is_diagonal=self.diagonal_work[c.factor_start : c.factor_stop],
                status_out=self.root_status[c.factor_start : c.factor_stop],
                num_threads=self.num_threads, **self.root_kwargs,
            )
            # every factor: the uncommitted ones are restored by the commit (packed_commit)
            self.packing.pack(root_work, out, c, None, average=True)

    # Hooks where eigenvalue-corrected Shampoo (soap_group_engine.py) differs; the Shampoo
    # versions are these.
    _schedule_class = RootSchedule  # the staggered schedule's root-step half

    def _new_root_work(self, factor_work: torch.Tensor) -> torch.Tensor:
        """A root step's staging buffer for what it computes (packed inverse roots)."""
        return torch.empty_like(factor_work)

    def _commit_roots(self, factor_work: torch.Tensor, root_work: torch.Tensor) -> torch.Tensor:
        """Commits the staged roots that succeeded (root_commit); returns the roots this step
        preconditions with. factor_work (committed already) may serve as scratch."""
        if self.inv_factors.dtype == self.shampoo_dtype:
            _backend.packed_commit(self.inv_factors, root_work, self.table, self.root_commit)
            return root_work
        staged = factor_work.copy_(self.inv_factors)
        _backend.packed_commit(staged, root_work, self.table, self.root_commit)
        self.inv_factors.copy_(staged)
        # the stored roots, rounded to their dtype, as every later step (and the reference,
        # which preconditions with its stored inverse factor matrices) reads them
        return self.inv_factors

    def apply(self, group: dict[str, Any], plan: "StepPlan", track_residuals: bool = False) -> None:
        """The infallible half of a step (SPEC B §4.4-§4.11): commits factors and roots,
        then moments, preconditioning, grafting, momentum and the parameter update."""
        t = plan.step
        roots = None
        if plan.roots_in_apply:
            # computed and committed chunk by chunk in the pipeline below (nothing staged)
            roots = RootsInApply(self, plan.bias_correction, plan.due)
            inv_roots = self.inv_factors
        elif plan.due is not None:
            # staggered: the staged factors and roots written over the live ones; the
            # pipeline below updates the other blocks' factors in place
            assert self.schedule is not None and plan.factor_work is not None and plan.root_work is not None
            factor_work, root_work = plan.factor_work, plan.root_work
            plan.factor_work = plan.root_work = None
            self.schedule.commit(self, plan.due, factor_work, root_work)
            self.diagonal.copy_(self.diagonal_work)
            del factor_work, root_work
            inv_roots = self.inv_factors
        elif plan.root_step:
            factor_work, root_work = plan.factor_work, plan.root_work
            assert factor_work is not None and root_work is not None
            plan.factor_work = plan.root_work = None  # freed once this step is done
            self.factors.copy_(factor_work)
            self.diagonal.copy_(self.diagonal_work)
            inv_roots = self._commit_roots(factor_work, root_work)
            del factor_work
        else:
            inv_roots = self.inv_factors
        self.step_count.fill_(t)

        # every value was read and checked in prepare(): nothing below can fail. Steps
        # without roots update the factors in place here (the overflow proof held).
        io: StepIO = plan.io
        if self.exchange is None and io.grad_blocks is not None:
            io.update_flat = torch.zeros(self.layout.param_numel, dtype=self.working_dtype, device=self.device)
        # which blocks' factors the pipeline updates in place: all (no roots), none (a default
        # root step committed them all), or those without a due factor (staggered)
        factor_blocks, factor_mask = None, None
        if self.layout.factor_numel > 0 and (roots is not None or not (plan.root_step and plan.due is None)):
            factor_blocks = self.active
            if plan.due is not None and roots is None:
                factor_blocks = self.active & (1 - plan.due.block_mask)
                factor_mask = self.factor_active & (1 - plan.due.factor_mask)
        if self.exchange is not None:
            self.payload = self.exchange.new_payload()
        self._run_pipeline(plan, None if plan.scalars.grafting_phase else inv_roots, factor_blocks, factor_mask,
                           roots=roots)
        plan.factor_work = plan.root_work = None
        if roots is not None:
            roots.finish()
        certify(self, self._sound_at_start)
        if track_residuals and plan.root_step:
            log_root_inverse_residuals(self, plan.bias_correction, computed=None if plan.due is None else plan.due.due)
        if self.exchange is not None:
            self._apply_exchanged(plan)
        elif io.grad_blocks is None:
            # written by C behind autograd's back: bump their versions as add_ would, so a
            # tensor saved for backward that was overwritten is still caught
            increment_version(self._live_params)
        else:
            # staged: the updates (param layout, this step only) added by torch
            torch._foreach_add_(self._live_params, self._live_views(io.update_flat))
        plan.io = None
        # The step's chunk scratch and working copies are freed, not held between steps:
        # between steps the memory belongs to the model's activations (the optimizer step
        # runs after backward has freed them). Reallocating costs ~1% of a step.
        self._scratch.clear()

    def _apply_exchanged(self, plan: "StepPlan") -> None:
        """DDP (SPEC B §7.2.5): all-gather every rank's updates (or, with communicate_params,
        its updated parameters) and apply all of them, each rank the same way."""
        assert self.exchange is not None
        communicate_params = self.exchange.communicate_params
        assert self.payload is not None
        gathered = self.exchange.exchange(self.payload)
        self.payload = None
        try:
            self._apply_gathered(plan, gathered, communicate_params)
        finally:
            self.exchange.release()

    def _apply_gathered(self, plan: "StepPlan", gathered: torch.Tensor, communicate_params: bool) -> None:
        assert self.exchange is not None
        if plan.io.grad_blocks is None:
            # every rank's blocks into the parameters in place (updates added, or parameters)
            scatter_io(
                self._io_list(self.locals, self._live_mask()), self.full_locator, gathered,
                self.exchange.receive_table, self.full_active_host, accumulate=not communicate_params,
            )
            increment_version(self._live_params)  # as add_ / copy_ would
            return
        flat, views = self._staged_flat()  # transient (this step)
        _backend.scatter(flat, gathered, self.exchange.receive_table, self.full_active)
        if communicate_params:
            torch._foreach_copy_(self._live_params, views)
        else:
            torch._foreach_add_(self._live_params, views)

    def _factor_where(self) -> Any:
        """where(f): factor f's label and its block, for messages."""
        layout = self.layout

        def where(factor: int) -> str:
            return f"{layout.factor_label(factor)} ({self.describe_block(int(layout.factor_block[factor]))})"

        return where

    def _check_roots(self) -> None:
        """Raises for non-finite factors or roots; decides which roots to commit."""
        status = self.root_status.numpy()
        where = self._factor_where()
        raise_non_finite(status, where, (
            "Encountered nan values in bias-corrected factor matrix",
            "Encountered inf values in bias-corrected factor matrix",
            "Encountered nan or inf values in inverse factor matrix",
        ))
        report_root_statuses(status, where, self.root_kwargs, self.shampoo_dtype, self.use_protected_eigh)
        # kept on the host too: the commits read it there without a device sync
        self.root_commit_host = np.isin(status, _ROOT_OK).astype(np.uint8)
        self.root_commit.copy_(torch.from_numpy(self.root_commit_host))
