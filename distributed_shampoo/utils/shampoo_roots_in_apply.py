"""Root steps without staging (issue 11 item 1): the inverse roots computed in apply(), chunk
by chunk, right after the chunk's factors are updated in place, and committed factor by factor.

A root step must leave parameters and state bitwise unchanged when it fails, so by default
it stages: prepare() computes the new factors and roots into buffers of the packed factors'
size and apply() commits them once every check of every group has passed. That staging is
a root step's extra peak (twice the packed factors: 3.5x the parameters on an MLP). It is
only needed for what can make the step raise. With `use_protected_eigh=True` a failed
eigendecomposition keeps the previous root and raises nothing; what is left are the checks
that raise ValueError: a non-finite bias-corrected factor or a non-finite root. Both are
excluded before anything is written when these hold (Shampoo's conditions; the engine's hooks,
ShampooRootsInApply, say what a preconditioner needs; the engine's prepare() asks them):

* the factors are finite now and their diagonals are >= 0 (checked in one pass, or known:
  see certify()), and (bias_corrected_fits) the bound of the no-overflow
  proof (shampoo_overflow.py: every entry of the new factor is at most its trace), divided
  by the bias correction and widened by its rounding, stays below the Shampoo dtype's
  largest value: the bias-corrected factor is finite;
* (roots_fit_dtypes, once per engine) the eigen method (the CPU kernels' root_eigen, its 1 x 1 and diagonal shortcuts) with
  make_positive_semidefinite: every spectrum value is lambda' + epsilon with lambda' >= 0,
  so with alpha = -exponent_multiplier / root < 0 each (lambda' + epsilon)^alpha is at most
  epsilon^alpha, and every entry of Q diag(.) Q^T (Q orthonormal) is at most that; when
  epsilon^alpha (alpha the most negative of the group, epsilon as the Shampoo dtype holds
  it) stays below a quarter of the largest value of both the Shampoo and the roots' storage
  dtype, no root can be non-finite. (A root below 1 is a failed factor: kept, not raised.)

Then apply() computes the roots where the pipeline holds the chunk (shampoo_step_pipeline.py)
and no model-sized buffer exists at any point of the step (apply() cannot fail, short of
running out of memory, as for the rest of the pipeline); a status the proof excludes is
still never committed (the previous root is kept, with a warning). On CUDA the commit masks
are formed on the device and the statuses read once, after the pipeline. Eigenvalue-corrected
Shampoo (soap_group_engine.py) does the same with its eigenbases, whose only requirement
besides sound factors is the protected fallback (an orthonormal basis is finite). Otherwise
(unprotected, Newton or higher-order roots, an epsilon too small for the root's power, a
corrupted state) the staged path runs unchanged. Both give the same bits.
"""

import logging
from typing import Any

import numpy as np
import torch

from distributed_shampoo import _backend
from distributed_shampoo.utils.shampoo_root_schedule import unpack_due
from distributed_shampoo.utils.shampoo_root_status import log_non_diagonal, report_root_statuses

logger = logging.getLogger(__name__)

# statuses whose roots are committed (the staged path's _ROOT_OK)
_COMMIT = (_backend.ROOT_OK, _backend.ROOT_MAX_ITERS, _backend.ROOT_RETRIED_DOUBLE)
_EXCLUDED = (_backend.ROOT_FACTOR_NAN, _backend.ROOT_FACTOR_INF, _backend.ROOT_NONFINITE)


def certify(engine: Any, certified: bool) -> None:
    """After a step: remember the factors' version when they were known finite with
    diagonals >= 0 at its start (`certified`). The step's own writes keep that (an in-place
    update runs only under the no-overflow proof, and keeps diagonals >= 0); any other
    in-place write through torch (a loaded checkpoint, an edit of optimizer.state) bumps the
    version, and the next root step checks again. A write that bypasses the version counter
    (through .data or a NumPy view) is not seen: a non-finite entry written so reaches the
    root kernel, whose status then keeps the previous root, with a warning, instead of
    raising."""
    engine._certified_version = engine.factors._version if certified else -1


def factors_known_sound(engine: Any) -> bool:
    """Whether the factors are known finite with diagonals >= 0: unchanged since a step
    that knew it."""
    return engine._certified_version == engine.factors._version


def check_factors(engine: Any) -> bool:
    """One pass: every factor entry finite and every diagonal entry >= 0."""
    factors = engine.factors
    if not bool(torch.isfinite(factors).all()):
        return False
    diagonal = factors[engine.overflow.diag_index]
    return not (diagonal.numel() and bool((diagonal < 0).any()))


def roots_fit_dtypes(engine: Any) -> bool:
    """Shampoo's configuration half of the proof (eigen method, protected, epsilon^alpha
    within the dtypes): fixed at construction, where the engine evaluates it once."""
    kwargs = engine.root_kwargs
    if not (engine.use_protected_eigh and kwargs["method"] == "eigen" and kwargs["make_positive_semidefinite"]
            and engine.overflow is not None and 0.0 < engine.exponent_multiplier < float("inf")):
        return False
    epsilon = float(torch.tensor(engine.epsilon, dtype=engine.shampoo_dtype))
    if not epsilon > 0.0:
        return False
    roots = engine.layout.table.numpy()[:, _backend.BF_ROOT]
    roots = roots[roots >= 1]
    if not roots.size:
        return True
    limit = min(float(torch.finfo(engine.shampoo_dtype).max), float(torch.finfo(engine.inv_factors.dtype).max))
    alpha = -engine.exponent_multiplier / float(roots.min())
    with np.errstate(over="ignore"):
        largest = float(np.float64(epsilon) ** np.float64(alpha))
    return largest <= limit / 4


def bias_corrected_fits(engine: Any, bound: torch.Tensor, bias_correction: float) -> bool:
    """The step's half of the proof: the no-overflow bound of the new factors (this step's,
    from _check_overflow) over the bias correction, widened by a few ulps for that division,
    fits the Shampoo dtype."""
    if bound.numel() == 0:
        return True
    eps = float(torch.finfo(engine.shampoo_dtype).eps)
    return float(bound.max()) / bias_correction * (1.0 + 4 * eps) <= float(torch.finfo(engine.shampoo_dtype).max)


class RootsInApply:
    """One root step's roots, computed and committed chunk by chunk inside the pipeline.

    `due` is the staggered schedule's plan (shampoo_root_schedule.PhasePlan), or None for
    every factor."""

    def __init__(self, engine: Any, bias_correction: float, due: Any) -> None:
        self.engine = engine
        self.bias_correction = bias_correction
        self.due = due
        self.work = {} if due is None else {w.chunk.block_start: w for w in due.work}
        engine.root_status.fill_(_backend.ROOT_INACTIVE)
        engine.diagonal_work.copy_(engine.diagonal)
        self._out: torch.Tensor | None = None
        self._compact: torch.Tensor | None = None  # staggered, CPU: the due factors, packed

    def run(self, chunk: Any, scratch: torch.Tensor) -> None:
        """The chunk's due roots from its (already updated) factors, committed where their
        status allows; the chunk's other roots are left as they are. `scratch`: a full-matrix
        chunk scratch free until this returns (the pipeline's)."""
        engine = self.engine
        packing = engine.packing
        if self.due is None:
            table, active, blocks = chunk.table, engine.active[chunk.block_start : chunk.block_stop], engine.active
        else:
            w = self.work.get(chunk.block_start)
            if w is None:
                return
            table, active, blocks = w.roots_table, engine.active[w.root_blocks], engine.active & self.due.block_mask
        if self._out is None:
            self._out = packing.scratch()
        if self.due is not None and not engine.on_cuda and engine.factors.dtype == engine.shampoo_dtype:
            # CPU: the due factors alone, through a compact copy (not their blocks' others)
            if self._compact is None:
                self._compact = torch.empty(self.due.root_numel, dtype=engine.shampoo_dtype)
            full = scratch[: chunk.full_numel]
            unpack_due(w, engine.factors[chunk.packed_start : chunk.packed_stop],
                       self._compact[w.root_range[0] : w.root_range[1]], full, engine.active)
        else:
            full = packing.unpack(scratch, engine.factors, chunk, blocks)
        engine._chunk_roots_in_apply(chunk, None if self.due is None else w, table, active, full,
                                     self._out[: chunk.full_numel], self.bias_correction)

    def finish(self) -> None:
        """After the pipeline: scratch dropped, diagonal flags and statuses reported (as the
        staged path reports them in prepare(), nothing raised: the proof held)."""
        engine = self.engine
        self._out = self._compact = None
        log_non_diagonal(engine.layout, engine.diagonal, engine.diagonal_work)
        engine.diagonal.copy_(engine.diagonal_work)
        status = engine.root_status.cpu().numpy()  # CUDA: the step's one wait for its roots
        if not ((status != _backend.ROOT_OK) & (status != _backend.ROOT_INACTIVE)).any():
            return  # nothing to report (the usual case)
        engine._report_roots_in_apply(status)


def commit_mask(engine: Any, factors: slice) -> None:
    """root_commit over `factors` from their statuses (on the device on CUDA: no host wait)."""
    status = engine.root_status[factors]
    if engine.on_cuda:
        commit = status == _COMMIT[0]
        for code in _COMMIT[1:]:
            commit |= status == code
        engine.root_commit[factors] = commit.to(torch.uint8)
    else:
        engine.root_commit[factors].numpy()[:] = np.isin(status.numpy(), _COMMIT)


def warn_excluded(status: np.ndarray, where: Any) -> None:
    """A status the proof excludes (never committed): said, not raised."""
    for factor in np.flatnonzero(np.isin(status, _EXCLUDED)):
        logger.warning(f"Root of factor matrix {where(int(factor))} was not finite although the "
                       "step proved it would be; the previous one was kept.")


class ShampooRootsInApply:
    """The engine's side of an unstaged root step (a mixin of ShampooGroupEngine): what the
    proof requires of the configuration, the chunk's roots and their commit, the report."""

    def _roots_in_apply_config_ok(self) -> bool:
        return roots_fit_dtypes(self)

    def _chunk_roots_in_apply(self, chunk: Any, w: Any, table: Any, active: torch.Tensor, full: torch.Tensor,
                              out: torch.Tensor, bias_correction: float) -> None:
        """The inverse roots of the factors of `table` (chunk scratch `full`) into `out`,
        committed (packed) where their status allows."""
        factors = slice(chunk.factor_start, chunk.factor_stop)
        _backend.root_inverse(
            out, full, table, active,
            epsilon=self.epsilon, exponent_multiplier=self.exponent_multiplier,  # type: ignore[attr-defined]
            bias_correction=bias_correction,
            is_diagonal=self.diagonal_work[factors], status_out=self.root_status[factors],  # type: ignore[attr-defined]
            num_threads=self.num_threads, **self.root_kwargs,  # type: ignore[attr-defined]
        )
        commit_mask(self, factors)
        self.packing.pack(self.inv_factors, out, chunk, self.root_commit, average=True)  # type: ignore[attr-defined]

    def _report_roots_in_apply(self, status: np.ndarray) -> None:
        where = self._factor_where()  # type: ignore[attr-defined]
        warn_excluded(status, where)
        report_root_statuses(status, where, self.root_kwargs, self.shampoo_dtype, True)  # type: ignore[attr-defined]
