"""Eigenvalue-corrected Shampoo (SOAP, arXiv 2409.11321) for one parameter group: the Shampoo
engine with its inverse roots replaced by eigenbases and a second moment kept in them
(issue 14). Only what differs is overridden; blocking, gathering, factor updates, the
overflow proof, grafting, momentum, the parameter update, DDP and FSDP placement are the
Shampoo engine's.

State per block (csrc/core/soap.h): the Kronecker factors (packed, as for Shampoo), the
eigenbases Q_k (whole d x d matrices in factor layout: they are not symmetric) and the
corrected eigenvalues D (block layout). A step:
  prepare (fallible): Shampoo's, and on an amortized ("root") step the new factors and the
    new eigenbases are staged in scratch; a NaN/Inf factor or eigenbasis, or an
    eigendecomposition failure with use_protected_eigh=False, raises before anything changes;
  apply (infallible): commits factors and the eigenbases that succeeded, then
    D <- beta2 D + (1 - beta2) R(G)^2 with the raw gradient, and the direction
    R^T(R(G_hat) / (D / bc2 + epsilon)^(1/r)) in place of Shampoo's, where r is
    inv_root_override's root (default 2) and bc2 = 1 - beta2^t (use_bias_correction).
Which factors recompute their eigenbasis on a step is decided in one place,
`_eigenbasis_mask` (all active factors, on Shampoo's root schedule).
"""

import logging
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from distributed_shampoo import _backend, _soap_backend
from distributed_shampoo.matrix_functions_types import QRConfig
from distributed_shampoo.utils.shampoo_engine_setup import StepPlan
from distributed_shampoo.utils.shampoo_group_engine import ShampooGroupEngine
from distributed_shampoo.utils.shampoo_root_schedule import ChunkWork, RootSchedule
from distributed_shampoo.utils.shampoo_step_pipeline import PipeChunk, rebased_rows
from distributed_shampoo.utils.shampoo_root_status import RootInverseError, raise_non_finite
from distributed_shampoo.utils.shampoo_roots_in_apply import warn_excluded
from distributed_shampoo.utils.shampoo_scalars import float32_bias_correction

# the reference's exception text for a failed eigendecomposition
_EIGH_FAILURE = "ArithmeticError('the symmetric eigendecomposition (LAPACK syevd) did not converge')"

logger = logging.getLogger("distributed_shampoo.distributed_shampoo")
preconditioner_logger = logging.getLogger("distributed_shampoo.utils.shampoo_preconditioner_list")
_COMMIT = (_backend.ROOT_OK, _backend.ROOT_RETRIED_DOUBLE)


def soap_root(inv_root_override: Any, order: int) -> int:
    """The root of the corrected eigenvalues for a block of `order`: inv_root_override's
    (per order for a list, an entry 0 meaning the default), default 2, as the reference."""
    if isinstance(inv_root_override, Sequence) and not isinstance(inv_root_override, str):
        root = inv_root_override[order] if order < len(inv_root_override) else 0
    else:
        root = inv_root_override
    return int(root) if root != 0 else 2


class EigenbasisSchedule(RootSchedule):
    """The staggered schedule's root step for eigenvalue-corrected Shampoo: the due factors'
    eigenbases (whole d x d matrices, not symmetric) computed from their new factors, staged
    compact (the due factors' d * d each, in due order) and committed per factor."""

    @staticmethod
    def _spans(w: ChunkWork) -> list[tuple[int, int, int]]:
        """(chunk-local full offset, d * d, chunk-local factor index) of each due factor."""
        return [(int(r[_backend.BF_FACTOR_OFFSET]), int(r[_backend.BF_DIMS]) ** 2, int(r[_backend.BF_FACTOR_INDEX]))
                for r in w.root_rows]

    @staticmethod
    def staged_root_numel(rows: np.ndarray) -> int:
        """Whole eigenbases: d * d per due factor."""
        return int((rows[:, _backend.BF_DIMS].astype(np.int64) ** 2).sum())

    def compute_roots(self, engine: Any, w: ChunkWork, full: torch.Tensor, out: torch.Tensor,
                      bias_correction: float) -> None:
        c = w.chunk
        start = engine.basis_start(c)
        previous = engine.bases[start : start + c.full_numel]
        if previous.dtype != engine.shampoo_dtype:
            previous = previous.to(engine.shampoo_dtype)  # bounded by the chunk
        _soap_backend.eigenbasis(
            out, full, previous, w.roots_table, engine.active[w.root_blocks],
            is_diagonal=engine.diagonal_work[c.factor_start : c.factor_stop],
            status_out=engine.root_status[c.factor_start : c.factor_stop],
            num_threads=engine.num_threads, **engine.eigen_kwargs,
        )

    # No kernel copies whole d x d matrices between layouts (the packed ones are for
    # symmetric matrices): one copy per due factor of a root step.
    def stash_roots(self, w: ChunkWork, out: torch.Tensor, root_stage: torch.Tensor) -> None:
        at = w.root_range[0]
        for offset, n, _ in self._spans(w):
            root_stage[at : at + n].copy_(out[offset : offset + n])
            at += n

    def commit_roots(self, engine: Any, w: ChunkWork, root_stage: torch.Tensor, full: torch.Tensor | None) -> None:
        at = w.root_range[0]
        start = engine.basis_start(w.chunk)
        commit = engine.root_commit_host
        for offset, n, factor in self._spans(w):
            if commit[w.chunk.factor_start + factor]:
                engine.bases[start + offset : start + offset + n].copy_(root_stage[at : at + n])
            at += n


class SOAPGroupEngine(ShampooGroupEngine):
    """ShampooGroupEngine with eigenvalue-corrected Shampoo's preconditioner."""

    _schedule_class = EigenbasisSchedule

    def __init__(self, params: Sequence[torch.Tensor], group: dict[str, Any], group_index: int,
                 shampoo_dtype: torch.dtype | None, use_protected_eigh: bool, **kwargs: Any) -> None:
        super().__init__(params, group, group_index, shampoo_dtype, use_protected_eigh, **kwargs)
        precision = group["precision_config"]
        layout = self.layout
        # No inverse roots: their packed buffer is dropped (block_states lists no such key).
        self.inv_factors = self.inv_factors.new_zeros(0)
        self.bases = torch.zeros(
            layout.factor_numel, dtype=precision.factor_matrix_eigenvectors_dtype, device=self.device
        )
        self.corrected = torch.zeros(
            layout.numel, dtype=precision.corrected_eigenvalues_dtype, device=self.device
        )
        # The table the SOAP kernels read: Shampoo's, with SOAP's roots (default 2, not 2 * order).
        table = layout.table.clone()
        override = group["inv_root_override"]
        for b, shape in enumerate(layout.block_shapes):
            table[b, _backend.BF_ROOT] = soap_root(override, len(shape))
        # each factor's eigenbasis in factor layout: (offset, d * d)
        self._factor_spans: list[tuple[int, int]] = []
        for b, shape in enumerate(layout.block_shapes):
            at = int(layout.table[b, _backend.BF_FACTOR_OFFSET])
            for d in shape:
                self._factor_spans.append((at, d * d))
                at += d * d
        roots = table[:, _backend.BF_ROOT].numpy()
        # per pipeline chunk: its rebased table (chunk scratch) with SOAP's roots, and where
        # its eigenbases start in factor layout
        self.soap_tables = {}
        for pc in self.pipe:
            c = pc.chunk
            rows = rebased_rows(layout.table.numpy()[c.block_start : c.block_stop])
            rows[:, _backend.BF_ROOT] = roots[c.block_start : c.block_stop]
            start = int(layout.table[c.block_start, _backend.BF_FACTOR_OFFSET]) if c.block_stop > c.block_start else 0
            self.soap_tables[c.block_start] = (_backend.KernelTable(torch.from_numpy(rows), self.device), start)
        config = group["preconditioner_config"].amortized_computation_config
        qr = type(config) is QRConfig
        self.eigen_kwargs = dict(
            method="qr" if qr else "eigh",
            retry_double_precision=True if qr else bool(config.retry_double_precision),
            max_iterations=int(config.max_iterations) if qr else 0,
            tolerance=float(config.tolerance) if qr else 0.0,
        )
        self._fused = False
        self._bc2 = 1.0

    # ------------------------------------------------------------------ fallible half
    def _prepare_live(self, group: dict[str, Any], grads: list[torch.Tensor | None]) -> StepPlan:
        plan = super()._prepare_live(group, grads)
        # the reference's bias_correction2, every step (float32 as torch computes it)
        corrected = plan.scalars.shampoo_bias_correction
        self._bc2 = float32_bias_correction(self.beta2, plan.step) if corrected else 1.0
        return plan

    def basis_start(self, chunk: Any) -> int:
        """Where the chunk's eigenbases start in factor layout."""
        return self.soap_tables[chunk.block_start][1]

    def _new_root_work(self, factor_work: torch.Tensor) -> torch.Tensor:
        return torch.empty(self.layout.factor_numel, dtype=self.shampoo_dtype, device=self.device)

    def _eigenbasis_mask(self, chunk: Any) -> torch.Tensor:
        """The blocks of `chunk` whose factors recompute their eigenbases this root step: the
        active ones (the one place a staggered schedule would narrow)."""
        return self.active[chunk.block_start : chunk.block_stop]

    def _stage_root_step(
        self, factor_work: torch.Tensor, root_work: torch.Tensor, bias_correction: float
    ) -> None:
        """New factors into factor_work (packed) and their eigenbases into root_work (whole,
        factor layout), chunk by chunk; statuses and diagonal flags in root_status and
        diagonal_work. Live state is not touched."""
        factor_work.copy_(self.factors)
        previous = self._working("bases", self.bases, self.shampoo_dtype)
        scratch = self.packing.scratch()
        offsets = self.layout.table[:, _backend.BF_FACTOR_OFFSET]
        for c in self.packing.chunks:
            active = self.active[c.block_start : c.block_stop]
            full = self.packing.unpack(scratch, factor_work, c, self.active)
            grads, grads_table = self._root_step_grads(c)  # G of the chunk (chunk scratch)
            _backend.factor_update(
                full, full, grads, grads_table, active, self.beta2, num_threads=self.num_threads, fail=self.fail
            )
            self.packing.pack(factor_work, full, c, self.factor_active)
            start = int(offsets[c.block_start])
            span = slice(start, start + c.full_numel)
            _soap_backend.eigenbasis(
                root_work[span], full[: c.full_numel], previous[span], c.table, self._eigenbasis_mask(c),
                is_diagonal=self.diagonal_work[c.factor_start : c.factor_stop],
                status_out=self.root_status[c.factor_start : c.factor_stop],
                num_threads=self.num_threads, **self.eigen_kwargs,
            )

    def _check_roots(self) -> None:
        """Raises for non-finite factors or eigenbases and, unprotected, for a failed
        eigendecomposition; logs the rest; decides which eigenbases to commit."""
        status = self.root_status.numpy()
        where = self._factor_where()
        raise_non_finite(status, where, (
            "Encountered nan values in factor matrix",
            "Encountered inf values in factor matrix",
            "Encountered nan or inf values in eigenvectors of factor matrix",
        ))
        failed = np.flatnonzero(status == _backend.ROOT_FAILED)
        if failed.size and not self.use_protected_eigh:
            raise RootInverseError(
                f"Matrix computation failed for factor matrix {where(int(failed[0]))} with "
                f"exception={_EIGH_FAILURE}. The step was not taken; parameters and optimizer state are "
                "unchanged (use_protected_eigh=True keeps the previous eigenvectors instead)."
            )
        self._warn_eigen_statuses(status, where)
        # kept on the host too: the commits read it there without a device sync
        self.root_commit_host = np.isin(status, _COMMIT).astype(np.uint8)
        self.root_commit.copy_(torch.from_numpy(self.root_commit_host))

    def _warn_eigen_statuses(self, status: np.ndarray, where: Any) -> None:
        """The protected fallbacks and double-precision retries, logged as the reference does."""
        for factor in np.flatnonzero(status == _backend.ROOT_FAILED):
            preconditioner_logger.warning(
                f"Matrix computation failed for factor matrix {where(int(factor))} with "
                f"exception={_EIGH_FAILURE}. Using previous factor matrix eigenvectors and continuing..."
            )
        for factor in np.flatnonzero(status == _backend.ROOT_RETRIED_DOUBLE):
            logger.warning(
                f"Failed to compute eigendecomposition in {self.shampoo_dtype} precision for factor "
                f"matrix {where(int(factor))}! Retried in double precision, which succeeded."
            )

    # ------------------------------------------------------------------ unstaged root steps
    # (shampoo_roots_in_apply.py). The eigenbasis of a finite PSD factor is orthonormal, so
    # finite: besides the factors' soundness (checked by the engine) the proof needs only the
    # protected fallback. The eigenbases are committed whole, per chunk.
    def _roots_in_apply_config_ok(self) -> bool:
        return self.use_protected_eigh and self.overflow is not None

    def _chunk_roots_in_apply(self, chunk: Any, w: Any, table: Any, active: torch.Tensor, full: torch.Tensor,
                              out: torch.Tensor, bias_correction: float) -> None:
        start = self.basis_start(chunk)
        span = slice(start, start + chunk.full_numel)
        previous = self.bases[span]
        if previous.dtype != self.shampoo_dtype:
            previous = previous.to(self.shampoo_dtype)  # bounded by the chunk
        factors = slice(chunk.factor_start, chunk.factor_stop)
        _soap_backend.eigenbasis(
            out, full, previous, table, active if w is not None else self._eigenbasis_mask(chunk),
            is_diagonal=self.diagonal_work[factors], status_out=self.root_status[factors],
            num_threads=self.num_threads, **self.eigen_kwargs,
        )
        commit = np.isin(self.root_status[factors].cpu().numpy(), _COMMIT)  # CUDA: one wait per chunk
        if w is not None:  # the due factors' bases, one copy each
            for offset, n, factor in EigenbasisSchedule._spans(w):
                if commit[factor]:
                    self.bases[start + offset : start + offset + n].copy_(out[offset : offset + n])
            return
        for f in np.flatnonzero(~commit):  # not committed (inactive, failed): the previous basis
            at, n = self._factor_spans[chunk.factor_start + f]
            out[at - start : at - start + n].copy_(self.bases[at : at + n])
        self.bases[span].copy_(out)

    def _report_roots_in_apply(self, status: np.ndarray) -> None:
        where = self._factor_where()
        warn_excluded(status, where)
        self._warn_eigen_statuses(status, where)

    # ------------------------------------------------------------------ infallible half
    def _commit_roots(self, factor_work: torch.Tensor, root_work: torch.Tensor) -> torch.Tensor:
        """The new eigenbases where they succeeded (root_commit), the previous ones elsewhere.
        Failures are rare (protected fallbacks): their previous bases are copied into the
        staging first, then the staging is written over the live bases in one pass."""
        for f in np.flatnonzero(self.root_commit_host == 0):
            at, n = self._factor_spans[f]
            root_work[at : at + n].copy_(self.bases[at : at + n])
        self.bases.copy_(root_work)
        return root_work

    # the direction reads the eigenbases, not full inverse roots
    _direction_needs_full = False

    def _chunk_soap(self, pc: PipeChunk, out: Optional[torch.Tensor], g_hat: Optional[torch.Tensor],
                    moment_grads: Optional[torch.Tensor], active: torch.Tensor) -> None:
        """soap_direction over one pipeline chunk: the direction of g_hat into `out` (when
        given) and the second-moment update from moment_grads (when given)."""
        table, start = self.soap_tables[pc.chunk.block_start]
        shampoo = self.shampoo_dtype
        bases = self.bases[start : start + pc.chunk.full_numel]
        if bases.dtype != shampoo:
            bases = bases.to(shampoo)  # bounded by the chunk
        corrected = pc.rows(self.corrected)
        work = corrected if corrected.dtype == shampoo else corrected.to(shampoo)
        _soap_backend.soap_direction(
            out, g_hat, moment_grads, bases, work, table, active,
            beta2=self.beta2, bias_correction=self._bc2, epsilon=self.epsilon,
            num_threads=self.num_threads,
        )
        if moment_grads is not None and work is not corrected:
            corrected.copy_(work)

    def _chunk_before_moments(self, pc: PipeChunk, g: torch.Tensor, active: torch.Tensor, scalars: Any) -> None:
        """The second moment from the raw gradient (before it becomes G_hat). Without a
        filtered gradient and outside the grafting phase it is fused into the direction,
        which then rotates G once for both."""
        self._fused = scalars.beta1 == 0.0 and not scalars.grafting_phase
        if not self._fused:
            self._chunk_soap(pc, None, None, self._in_dtype("g_s", g, self.shampoo_dtype), active)

    def _chunk_direction(self, pc: PipeChunk, out: torch.Tensor, g_hat: torch.Tensor, inv_roots: torch.Tensor,
                         active: torch.Tensor) -> None:
        """The SOAP direction of the chunk's G_hat (inv_roots unused: no inverse roots)."""
        self._chunk_soap(pc, out, g_hat, g_hat if self._fused else None, active)

    # ------------------------------------------------------------------ state
    def block_states(self) -> dict[int, dict[str, dict[str, Any]]]:
        """Shampoo's per-block state with the inverse roots replaced by the reference's
        eigenvalue-corrected keys: factor_matrices_eigenvectors (whole d x d) and
        corrected_eigenvalues (the block's shape)."""
        states = super().block_states()
        layout = self.layout
        table = layout.table.numpy()
        for b, key in enumerate(layout.block_keys):
            row = table[b]
            shape = layout.block_shapes[b]
            offset, numel = int(row[_backend.BF_BLOCK_OFFSET]), int(row[_backend.BF_NUMEL])
            at = int(row[_backend.BF_FACTOR_OFFSET])
            eigenvectors: dict[int, Any] = {}
            for k, d in enumerate(shape):
                eigenvectors[k] = {"quantized_values": self.bases[at : at + d * d].view(d, d)}
                at += d * d
            shampoo = states[int(layout.block_param[b])][key]["shampoo"]
            del shampoo["inv_factor_matrices"]
            shampoo["factor_matrices_eigenvectors"] = eigenvectors
            moment = self.corrected[offset : offset + numel].view(shape)
            shampoo["corrected_eigenvalues"] = {"quantized_values": moment}
        return states
