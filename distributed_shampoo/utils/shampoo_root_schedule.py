"""The opt-in staggered inverse-root schedule (issue 13; StaggeredRootScheduleConfig).

By default every inverse root is recomputed at the same step, once per precondition_frequency
steps, so that step costs several normal ones. Here each factor f gets a fixed phase
phase[f] in [0, frequency), and its root is recomputed at the steps t > start with
t % frequency == phase[f]; at t == start every root is computed, as by default. Phase 0 is the
default schedule's steps, so with frequency 1 the schedule is the default one.

Phases are a pure function of the engine's layout (its own blocks: under DDP/HSDP/FSDP each
rank balances what it computes), the frequency and the device kind: nothing to checkpoint,
and a resumed or resharded run derives them again. Balancing: largest estimated cost first,
onto the least-loaded phase, ties to the lowest phase and the lowest factor index.

A scheduled root step keeps the guarantees of the default one (SPEC A.3.12) with staging
bounded by the phase, never by the model: prepare() computes, chunk by chunk, the new factors
of only the blocks that hold a due factor, and the due factors' roots through a table of the
due factors alone (one order-1 row per factor: a skipped factor costs nothing, no
eigendecomposition and no copy); the roots are staged packed and compact (the phase's size).
The phase blocks' new factors are staged compact too (on CPU from the packed update, the
kernel of a step without roots, into a chunk-sized buffer: half the flops of the full one).
apply() then updates the other blocks' factors in place, as a step without roots does, and
writes the staged factors and the committed roots over the live ones. (Recomputing the phase
blocks' factors in apply() instead would save their staging but cost a second update of
them: measured slower on the benchmark models.)
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distributed_shampoo import _backend
from distributed_shampoo.shampoo_types import StaggeredRootScheduleConfig

ALL = -1  # the key of the start step's plan: every factor

# CUDA cost model ("auto"): a batch group's launches and host wait, against n^3 flops at a
# device's rate (ns units like the CPU estimate; only their ratio matters).
_CUDA_GROUP_NS = 200_000.0
_CUDA_NS_PER_CUBE = 0.002


def cpu_root_cost(n: int) -> float:
    """Estimated ns of one n x n root on one core: the C kernels' own estimate
    (csrc/core/matrix_root.inc, root_inverse_cost); a 1 x 1 or empty factor is ~free."""
    return 4000.0 + 100.0 * n * n + 0.07 * n**3 if n > 1 else 0.0


def assign_phases(dims: np.ndarray, frequency: int, cost_model: str, on_cuda: bool) -> np.ndarray:
    """Phase of every factor of sizes `dims` (factor order): largest first onto the least
    loaded phase, ties to the lowest phase, equal costs in factor order."""
    dims = np.asarray(dims, dtype=np.int64)
    phases = np.zeros(len(dims), dtype=np.int64)
    if frequency <= 1 or len(dims) == 0:
        return phases
    batched = cost_model == "auto" and on_cuda
    if cost_model == "count":
        costs = (dims > 1).astype(np.float64)
    elif batched:
        costs = np.where(dims > 1, _CUDA_NS_PER_CUBE * dims.astype(np.float64) ** 3, 0.0)
    elif cost_model == "dense":
        costs = np.where(dims > 1, dims.astype(np.float64) ** 3, 0.0)
    else:
        costs = np.array([cpu_root_cost(int(n)) for n in dims], dtype=np.float64)
    load = np.zeros(frequency, dtype=np.float64)
    sizes: list[set[int]] = [set() for _ in range(frequency)]
    # stable sort: equal costs keep factor order
    for f in np.argsort(-costs, kind="stable"):
        n = int(dims[f])
        if batched and n > 1:
            # CUDA computes equal sizes of a call in one batch: a new size costs a launch
            extra = load + costs[f] + np.array([0.0 if n in s else _CUDA_GROUP_NS for s in sizes])
        else:
            extra = load + costs[f]
        p = int(np.argmin(extra))  # first minimum: the lowest phase
        load[p] = extra[p]
        if n > 1:
            sizes[p].add(n)
        phases[f] = p
    return phases


@dataclass
class ChunkWork:
    """One chunk's share of a scheduled root step."""

    chunk: Any  # shampoo_packed_chunks.Chunk
    blocks_table: Any  # KernelTable: the chunk's blocks holding a due factor (chunk scratch)
    blocks: torch.Tensor  # their global indices (to read `active`)
    roots_table: Any  # KernelTable: one order-1 row per due factor (chunk scratch)
    root_blocks: torch.Tensor  # the due factors' blocks (global indices)
    factor_range: tuple[int, int]  # the blocks' packed factors in the factor staging
    root_range: tuple[int, int]  # the due factors' staged results (packed roots) in the root staging
    root_rows: np.ndarray  # roots_table's rows (one per due factor)
    due_mask: torch.Tensor  # uint8 per factor of the chunk: the due ones (packed_select)


@dataclass
class PhasePlan:
    """Everything a root step of one phase needs, built once per (frequency, phase)."""

    work: list[ChunkWork]
    block_mask: torch.Tensor  # uint8[num_blocks]: the blocks holding a due factor
    factor_mask: torch.Tensor  # uint8[factor_count]: every factor of those blocks
    due: np.ndarray  # bool[factor_count]: the due factors
    factor_numel: int  # staging sizes (packed elements)
    root_numel: int


def _chunk_rows(layout: Any, chunk: Any) -> np.ndarray:
    """The chunk's table rows as plan_chunks rebases them (chunk scratch, chunk factors)."""
    rows = layout.table.numpy()[chunk.block_start : chunk.block_stop].copy()
    rows[:, _backend.BF_FACTOR_OFFSET] -= rows[0, _backend.BF_FACTOR_OFFSET]
    rows[:, _backend.BF_FACTOR_INDEX] -= rows[0, _backend.BF_FACTOR_INDEX]
    return rows


def unpack_due(w: "ChunkWork", packed: torch.Tensor, compact: torch.Tensor, full: torch.Tensor,
               active_blocks: torch.Tensor, write: torch.Tensor | None = None) -> None:
    """Chunk w's due factors alone (packed: the chunk's packed factors, CPU) into the full
    scratch `full`, through `compact` (their packed copy, in due order, root_range-sized): not
    their blocks' other factors. `write`: the factors to copy (None: every due one)."""
    _backend.packed_select(compact, packed, w.chunk.table, w.due_mask, write, to_packed=False)
    _backend.sym_unpack(full, compact, w.roots_table, active_blocks[w.root_blocks])


def _factor_rows(rows: np.ndarray, picks: list[tuple[int, int]]) -> np.ndarray:
    """One order-1 row per (row, dim k): that factor alone, at its place in the chunk
    scratch and the chunk's per-factor arrays, with its block's root."""
    out = np.zeros((len(picks), _backend.BF_COUNT), dtype=np.int64)
    at = 0
    for i, (r, k) in enumerate(picks):
        row = rows[r]
        dims = row[_backend.BF_DIMS : _backend.BF_DIMS + _backend.MAX_ORDER]
        n = int(dims[k])
        out[i, _backend.BF_ORDER] = 1
        out[i, _backend.BF_NUMEL] = n
        out[i, _backend.BF_BLOCK_OFFSET] = at  # unused by these kernels; kept disjoint
        out[i, _backend.BF_PARAM_OFFSET] = at
        out[i, _backend.BF_FACTOR_OFFSET] = row[_backend.BF_FACTOR_OFFSET] + int((dims[:k] ** 2).sum())
        out[i, _backend.BF_FACTOR_INDEX] = row[_backend.BF_FACTOR_INDEX] + k
        out[i, _backend.BF_ROOT] = row[_backend.BF_ROOT]
        out[i, _backend.BF_DIMS] = n
        out[i, _backend.BF_STRIDES] = 1
        at += n
    return out


class RootSchedule:
    """Phases and per-phase plans of one engine (see the module doc)."""

    def __init__(self, config: StaggeredRootScheduleConfig, layout: Any, packing: Any, device: torch.device) -> None:
        config.__post_init__()  # a mutable config: validated again when read
        self.cost_model = config.cost_model
        self.layout = layout
        self.packing = packing
        self.device = device
        rows = layout.table.numpy()
        self.factor_dims = np.asarray(
            [d for shape in layout.block_shapes for d in shape], dtype=np.int64
        ) if layout.factor_count else np.zeros(0, np.int64)
        self.first_factor = rows[:, _backend.BF_FACTOR_INDEX] if len(rows) else np.zeros(0, np.int64)
        self._phases: dict[int, np.ndarray] = {}
        self._plans: dict[tuple[int, int], PhasePlan | None] = {}

    def phases(self, frequency: int) -> np.ndarray:
        """phase[f] for this frequency (derived, cached; the frequency is a group value the
        user may edit)."""
        if frequency not in self._phases:
            self._phases[frequency] = assign_phases(
                self.factor_dims, frequency, self.cost_model, self.device.type == "cuda"
            )
        return self._phases[frequency]

    def due(self, t: int, frequency: int, start: int) -> int | None:
        """The key of step t's roots: ALL at start, the phase t % frequency after it (None when
        this engine has no factor of that phase), None before start."""
        if self.layout.factor_count == 0:
            return None
        if t == start:
            return ALL
        if t < start:
            return None
        phase = t % frequency
        return phase if self.plan(frequency, phase) is not None else None

    def plan(self, frequency: int, key: int) -> PhasePlan | None:
        if (frequency, key) not in self._plans:
            due = np.ones(self.layout.factor_count, dtype=bool) if key == ALL else self.phases(frequency) == key
            self._plans[(frequency, key)] = self._build(due) if due.any() else None
        return self._plans[(frequency, key)]

    def _build(self, due: np.ndarray) -> PhasePlan:
        layout = self.layout
        block_mask = np.zeros(layout.num_blocks, dtype=np.uint8)
        block_mask[layout.factor_block[due]] = 1
        factor_mask = block_mask[layout.factor_block].astype(np.uint8)
        work: list[ChunkWork] = []
        f_at = r_at = 0
        for c in self.packing.chunks:
            local = np.flatnonzero(due[c.factor_start : c.factor_stop])
            if local.size == 0:
                continue
            rows = _chunk_rows(layout, c)
            blocks = np.flatnonzero(block_mask[c.block_start : c.block_stop])
            picks = []
            for f in local + c.factor_start:
                b = int(layout.factor_block[f])
                picks.append((b - c.block_start, int(f - self.first_factor[b])))
            block_rows, factor_rows = rows[blocks], _factor_rows(rows, picks)
            f_numel, r_numel = _backend.packed_numel(block_rows), self.staged_root_numel(factor_rows)
            work.append(ChunkWork(
                c, _backend.KernelTable(block_rows, self.device),
                torch.as_tensor(blocks + c.block_start, device=self.device),
                _backend.KernelTable(factor_rows, self.device),
                torch.as_tensor(layout.factor_block[local + c.factor_start], device=self.device),
                (f_at, f_at + f_numel), (r_at, r_at + r_numel), factor_rows,
                torch.as_tensor(due[c.factor_start : c.factor_stop].astype(np.uint8), device=self.device),
            ))
            f_at, r_at = f_at + f_numel, r_at + r_numel
        return PhasePlan(
            work, torch.as_tensor(block_mask, device=self.device),
            torch.as_tensor(factor_mask, device=self.device), due, f_at, r_at,
        )

    # ------------------------------------------------------------------ the root step
    def stage(self, engine: Any, plan: PhasePlan, bias_correction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """prepare()'s half: the phase blocks' new factors and the due factors' new roots
        into packed compact staging (returned); statuses in root_status (INACTIVE for the
        factors not due) and diagonal flags in diagonal_work. Live state is not touched."""
        packing = self.packing
        dtype = engine.shampoo_dtype
        root_stage = torch.empty(plan.root_numel, dtype=dtype, device=self.device)
        engine.root_status.fill_(_backend.ROOT_INACTIVE)
        blocks = engine.active & plan.block_mask
        scratch, roots = packing.scratch(), packing.scratch()
        # CPU, factors stored in the kernels' dtype: the phase blocks' new factors come from
        # the packed update (the kernel of a step without roots: half the flops of the full
        # update) into a chunk-sized buffer, and are staged and committed without unpacking
        packed = not engine.on_cuda and engine.factors.dtype == dtype
        factor_stage = torch.empty(plan.factor_numel, dtype=dtype, device=self.device)
        chunk_packed = (
            torch.empty(max(c.packed_stop - c.packed_start for c in packing.chunks), dtype=dtype)
            if packed else None
        )
        for w in plan.work:
            c = w.chunk
            active = blocks[c.block_start : c.block_stop]
            full = scratch[: c.full_numel]
            grads, grads_table = engine._root_step_grads(c)  # G of the chunk (chunk scratch)
            factor_part = factor_stage[w.factor_range[0] : w.factor_range[1]]
            if chunk_packed is not None:
                new = chunk_packed[: c.packed_stop - c.packed_start]
                _backend.factor_update_packed(
                    new, engine.factors[c.packed_start : c.packed_stop], grads, grads_table, active,
                    engine.beta2, num_threads=engine.num_threads,
                )
                # the phase blocks' factors, compact, straight from the packed update; then
                # the due factors alone unpacked for their roots, through their place in the
                # root staging (compact in the same order; compute_roots does not read it)
                chunk_factors = slice(c.factor_start, c.factor_stop)
                _backend.packed_select(factor_part, new, c.table, plan.factor_mask[chunk_factors],
                                       engine.factor_active[chunk_factors], to_packed=False)
                unpack_due(w, new, root_stage[w.root_range[0] : w.root_range[1]], full, engine.active,
                           engine.factor_active[chunk_factors])
            else:
                packing.unpack(scratch, engine.factors, c, blocks)
                _backend.factor_update(
                    full, full, grads, grads_table, active, engine.beta2,
                    num_threads=engine.num_threads, fail=engine.fail,
                )
                # the phase blocks' factors, compact (the blocks table's own packed layout)
                _backend.sym_pack(factor_part, full, w.blocks_table)
            out = roots[: c.full_numel]
            self.compute_roots(engine, w, full, out, bias_correction)
            self.stash_roots(w, out, root_stage)
        return factor_stage, root_stage

    # What a root step computes for its due factors, and how it is staged and committed: the
    # inverse roots here (packed); eigenvalue-corrected Shampoo's eigenbases in
    # soap_group_engine.EigenbasisSchedule.
    @staticmethod
    def staged_root_numel(rows: np.ndarray) -> int:
        """Staged elements of the due factors of `rows` (one row per factor): packed roots."""
        return _backend.packed_numel(rows)

    def compute_roots(self, engine: Any, w: ChunkWork, full: torch.Tensor, out: torch.Tensor,
                      bias_correction: float) -> None:
        """The due factors' results of chunk w from its new factors `full` into `out` (both
        chunk scratch, full matrices)."""
        c = w.chunk
        _backend.root_inverse(
            out, full, w.roots_table, engine.active[w.root_blocks],
            epsilon=engine.epsilon, exponent_multiplier=engine.exponent_multiplier,
            bias_correction=bias_correction,
            is_diagonal=engine.diagonal_work[c.factor_start : c.factor_stop],
            status_out=engine.root_status[c.factor_start : c.factor_stop],
            num_threads=engine.num_threads, **engine.root_kwargs,
        )

    def stash_roots(self, w: ChunkWork, out: torch.Tensor, root_stage: torch.Tensor) -> None:
        # uncommitted roots (not OK, inactive) are staged too and skipped by the commit
        _backend.sym_pack(root_stage[w.root_range[0] : w.root_range[1]], out, w.roots_table, average=True)

    def commit_roots(self, engine: Any, w: ChunkWork, root_stage: torch.Tensor, full: torch.Tensor | None) -> None:
        """The committed (engine.root_commit) staged results of chunk w over the live ones;
        `full` is chunk scratch (None where the packed-to-packed route needs none)."""
        c = w.chunk
        staged = root_stage[w.root_range[0] : w.root_range[1]]
        live = engine.inv_factors[c.packed_start : c.packed_stop]
        if not engine.on_cuda and live.dtype == staged.dtype:  # packed to packed, per factor
            chunk_factors = slice(c.factor_start, c.factor_stop)
            _backend.packed_select(staged, live, c.table, w.due_mask,
                                   engine.root_commit[chunk_factors], to_packed=True)
            return
        assert full is not None
        full = full[: c.full_numel]
        _backend.sym_unpack(full, staged, w.roots_table, engine.active[w.root_blocks])
        self.packing.pack(engine.inv_factors, full, c, engine.root_commit)

    def commit(self, engine: Any, plan: PhasePlan, factor_stage: torch.Tensor, root_stage: torch.Tensor) -> None:
        """apply()'s half (nothing can fail): the staged factors and the committed roots
        (engine.root_commit) written over the live ones; the step pipeline then updates the
        other blocks' factors in place, as a step without roots does."""
        packing = self.packing
        staged_factors = engine.factor_active & plan.factor_mask
        packed = not engine.on_cuda and engine.factors.dtype == factor_stage.dtype
        roots_packed = not engine.on_cuda and engine.inv_factors.dtype == root_stage.dtype
        # one full scratch for the step's commits, only where a route unpacks
        scratch = None if packed and roots_packed else packing.scratch()
        for w in plan.work:
            c = w.chunk
            staged = factor_stage[w.factor_range[0] : w.factor_range[1]]
            if packed:  # packed to packed, per factor
                chunk_factors = slice(c.factor_start, c.factor_stop)
                _backend.packed_select(staged, engine.factors[c.packed_start : c.packed_stop], c.table,
                                       plan.factor_mask[chunk_factors], staged_factors[chunk_factors],
                                       to_packed=True)
            else:
                full = scratch[: c.full_numel]
                _backend.sym_unpack(full, staged, w.blocks_table, engine.active[w.blocks])
                packing.pack(engine.factors, full, c, staged_factors)
            self.commit_roots(engine, w, root_stage, scratch)
