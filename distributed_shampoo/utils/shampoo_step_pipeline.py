"""The per-block pipeline of a step, run chunk by chunk so that its scratch is bounded by a
chunk, never by the model (issue 11 item 3).

The chunks are the packed factors' (shampoo_packed_chunks.py: consecutive blocks within a
byte budget). For each chunk: G of its blocks into chunk scratch (read from the gradients
where they are, shampoo_param_io.py), the factor update in place (steps without roots; a
root step staged its factors in prepare()), grafting state and filtered gradient, the Shampoo
direction, grafting norm, decoupled decay, momentum, and the parameters written in place.
Every phase works per block (the grafting norm too: SPEC B §4.8 rescales per block), so the
numbers are those of one pass over all blocks, bit for bit. Under DDP the updates go into the
all-gather payload instead (the DDP exception: this rank's updates and the gathered buffer,
in the communication dtype). A mixin of ShampooGroupEngine.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distributed_shampoo import _backend
from distributed_shampoo._backend_io import IOLocator, finish_io, gather_io
from distributed_shampoo.utils.shampoo_block_layout import contiguous_destination
from distributed_shampoo.utils.shampoo_packed_chunks import Chunk


@dataclass
class PipeChunk:
    """A packing chunk seen by the elementwise kernels: `table` addresses chunk-sized
    block-layout scratch (block offsets from `offset`) and the chunk's full-matrix scratch."""

    chunk: Chunk
    offset: int           # block-layout offset of the chunk's first block
    numel: int            # block-layout elements of its blocks
    table: Any            # _backend.KernelTable
    locator: IOLocator    # over the tensors of parameters [first_param, stop_param)
    payload_table: Any    # DDP: writes updates at their place in the payload (else None)
    first_param: int = 0
    stop_param: int = 0

    def tensors(self, per_param: list) -> list:
        """The entries of a per-parameter list this chunk's blocks lie in (a call then
        borrows only those tensors)."""
        return per_param[self.first_param : self.stop_param]

    def rows(self, state: torch.Tensor) -> torch.Tensor:
        """The chunk's slice of a block-layout buffer."""
        return state[self.offset : self.offset + self.numel]


def rebased_rows(rows: np.ndarray) -> np.ndarray:
    """Table rows with block, factor offsets and factor indices counted from the first row
    (a chunk's own scratch)."""
    rows = rows.copy()
    if len(rows):
        for field in (_backend.BF_BLOCK_OFFSET, _backend.BF_FACTOR_OFFSET, _backend.BF_FACTOR_INDEX):
            rows[:, field] -= rows[0, field]
    return rows


class StepPipeline:
    """Chunked moments / precondition / finish (see the module doc)."""

    layout: Any
    packing: Any
    device: torch.device
    exchange: Any
    working_dtype: torch.dtype
    shampoo_dtype: torch.dtype

    def _init_pipeline(self) -> None:
        rows = self.layout.table.numpy()
        payload_rows = contiguous_destination(self.layout).numpy() if self.exchange is not None else None
        self.pipe: list[PipeChunk] = []
        for c in self.packing.chunks:
            sub = rows[c.block_start : c.block_stop]
            offset = int(sub[0, _backend.BF_BLOCK_OFFSET]) if len(sub) else 0
            payload_table = None
            if payload_rows is not None:
                payload = payload_rows[c.block_start : c.block_stop].copy()
                payload[:, _backend.BF_BLOCK_OFFSET] = rebased_rows(sub)[:, _backend.BF_BLOCK_OFFSET]
                payload[:, _backend.BF_FACTOR_OFFSET] = rebased_rows(sub)[:, _backend.BF_FACTOR_OFFSET]
                payload[:, _backend.BF_FACTOR_INDEX] = rebased_rows(sub)[:, _backend.BF_FACTOR_INDEX]
                payload_table = _backend.KernelTable(torch.from_numpy(payload), self.device)
            owners = self.layout.block_param[c.block_start : c.block_stop]
            first = int(owners.min()) if len(owners) else 0
            stop = int(owners.max()) + 1 if len(owners) else 0
            self.pipe.append(PipeChunk(
                c, offset, int(sub[:, _backend.BF_NUMEL].sum()),
                _backend.KernelTable(torch.from_numpy(rebased_rows(sub)), self.device),
                IOLocator(self.layout.param_offsets[first:stop], owners - first),
                payload_table, first, stop,
            ))
        self.max_chunk_numel = max((p.numel for p in self.pipe), default=0)
        self._pipe_by_start = {pc.chunk.block_start: pc for pc in self.pipe}

    def _chunk_buffer(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Scratch of the largest chunk's block-layout size, for this step (bounded; freed
        when the step ends)."""
        key = ("chunk_" + name, dtype)
        buffer = self._scratch.get(key)  # type: ignore[attr-defined]
        if buffer is None:
            buffer = torch.empty(self.max_chunk_numel, dtype=dtype, device=self.device)
            self._scratch[key] = buffer  # type: ignore[attr-defined]
        return buffer

    def _chunk_grads(self, pc: PipeChunk, io: Any) -> torch.Tensor:
        """G (after L2 decay) of the chunk's blocks in the working dtype: gathered into chunk
        scratch from the gradients in place (direct), or the chunk's slice of the step's
        transient block-layout G (staged)."""
        if io.grad_blocks is not None:
            return pc.rows(io.grad_blocks)
        g = self._chunk_buffer("g", self.working_dtype)[: pc.numel]
        w = None
        if io.param_blocks_wanted:
            w = self._chunk_buffer("w", self.working_dtype)[: pc.numel]
        gather_io(g, w, pc.tensors(io.grads), None if io.params is None else pc.tensors(io.params),
                  pc.locator, pc.table,
                  self.active_host[pc.chunk.block_start : pc.chunk.block_stop], io.l2)  # type: ignore[attr-defined]
        io.chunk_params = w
        return g

    def _in_dtype(self, name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x itself, or a chunk-bounded copy in `dtype`."""
        if x.dtype == dtype:
            return x
        return self._chunk_buffer(name, dtype)[: x.numel()].copy_(x)

    def _update_chunk_factors(self, pc: PipeChunk, grads_s: torch.Tensor, active: torch.Tensor,
                              factor_active: torch.Tensor) -> None:
        """SPEC B §4.4 in place on the chunk's packed factors (the overflow proof held): of
        the blocks `active` (chunk slice) and, where packed back, the factors `factor_active`
        (all factors)."""
        c = pc.chunk
        factors = self.factors  # type: ignore[attr-defined]
        if not self.on_cuda and factors.dtype == self.shampoo_dtype:  # type: ignore[attr-defined]
            piece = factors[c.packed_start : c.packed_stop]
            # CPU: updated where they are stored, without unpacking
            _backend.factor_update_packed(piece, piece, grads_s, pc.table, active, self.beta2,  # type: ignore[attr-defined]
                                          num_threads=self.num_threads)  # type: ignore[attr-defined]
            return
        full = self.packing.unpack(self._pipe_full, factors, c, self.active)  # type: ignore[attr-defined]
        _backend.factor_update(full, full, grads_s, pc.table, active, self.beta2,  # type: ignore[attr-defined]
                               num_threads=self.num_threads, fail=self.fail)  # type: ignore[attr-defined]
        self.packing.pack(factors, full, c, factor_active)

    def _run_pipeline(self, plan: Any, inv_roots: torch.Tensor | None, factor_blocks: torch.Tensor | None,
                      factor_mask: torch.Tensor | None = None, roots: Any = None) -> None:
        """Factor update of the blocks `factor_blocks` (None: none; packed back where
        `factor_mask`, default every active factor), the chunk's inverse roots when `roots`
        (shampoo_roots_in_apply.RootsInApply) is given, moments, direction, finish; chunk by
        chunk."""
        update_factors = factor_blocks is not None
        if factor_mask is None:
            factor_mask = self.factor_active  # type: ignore[attr-defined]
        io, sc = plan.io, plan.scalars
        working, shampoo = self.working_dtype, self.shampoo_dtype
        beta1, momentum = sc.beta1, sc.momentum
        update_grafting = sc.grafting_on and self.grafting_state is not None  # type: ignore[attr-defined]
        graft_kind = self.grafting.kind if sc.grafting_on else "none"  # type: ignore[attr-defined]
        decoupled = sc.decoupled and sc.weight_decay != 0.0
        finish_scalars = dict(
            graft=graft_kind, grafting_phase=sc.grafting_phase,
            grafting_bias_correction=sc.grafting_bias_correction,
            grafting_epsilon=self.grafting.epsilon,  # type: ignore[attr-defined]
            decoupled_weight_decay=sc.weight_decay if sc.decoupled else 0.0,
            momentum=momentum, dampening=sc.dampening, nesterov=sc.nesterov, lr=sc.lr,
        )
        fail = self.fail  # type: ignore[attr-defined]
        needs_full = roots is not None or (update_factors and (self.on_cuda or self.factors.dtype != shampoo)) or (  # type: ignore[attr-defined]
            inv_roots is not None and not sc.grafting_phase and self._direction_needs_full
        )
        self._pipe_full = self.packing.scratch() if needs_full else None
        try:
            for pc in self.pipe:
                c = pc.chunk
                active = self.active[c.block_start : c.block_stop]  # type: ignore[attr-defined]
                g = self._chunk_grads(pc, io)
                if update_factors:
                    assert factor_blocks is not None
                    self._update_chunk_factors(pc, self._in_dtype("g_s", g, shampoo),
                                               factor_blocks[c.block_start : c.block_stop], factor_mask)
                if roots is not None:  # from the factors just updated; the full scratch is free here
                    roots.run(c, self._pipe_full)
                self._chunk_before_moments(pc, g, active, sc)
                # grafting accumulator and filtered gradient (SPEC B §4.5, §4.7), in place
                v = f = None
                if self.grafting_state is not None:  # type: ignore[attr-defined]
                    v = self._in_dtype("v", pc.rows(self.grafting_state), working)  # type: ignore[attr-defined]
                if beta1 != 0.0:
                    f = self._in_dtype("f", pc.rows(self.filtered_grad), working)  # type: ignore[attr-defined]
                _backend.moments(
                    g, v if update_grafting else None, f, pc.table, active,
                    update_grafting_state=update_grafting, grafting_beta2=self.grafting.beta2,  # type: ignore[attr-defined]
                    beta1=beta1, beta3=sc.beta3, bias_correction1=sc.bias_correction1, fail=fail,
                )
                if f is not None and f.data_ptr() != pc.rows(self.filtered_grad).data_ptr():  # type: ignore[attr-defined]
                    pc.rows(self.filtered_grad).copy_(f)  # type: ignore[attr-defined]
                if update_grafting and v.data_ptr() != pc.rows(self.grafting_state).data_ptr():  # type: ignore[attr-defined,union-attr]
                    pc.rows(self.grafting_state).copy_(v)  # type: ignore[attr-defined]
                # the Shampoo direction (SPEC B §4.8)
                d = None
                if not sc.grafting_phase:
                    assert inv_roots is not None
                    d = self._chunk_buffer("d", working)[: pc.numel]
                    d_s = d if shampoo == working else self._chunk_buffer("d_s", shampoo)[: pc.numel]
                    self._chunk_direction(pc, d_s, self._in_dtype("g_s", g, shampoo), inv_roots, active)
                    if d_s is not d:
                        d.copy_(d_s)
                # grafting, decoupled decay, momentum, lr (SPEC B §4.8-§4.11); then parameters
                m = self._in_dtype("m", pc.rows(self.momentum), working) if momentum != 0.0 else None  # type: ignore[attr-defined]
                v_diag = v if graft_kind == "diagonal" else None
                w = io.chunk_params if io.grad_blocks is None else (
                    None if io.param_blocks is None else pc.rows(io.param_blocks))
                if self.exchange is not None:
                    _backend.finish(self.payload, g, d, v_diag, w if decoupled else None, m,  # type: ignore[attr-defined]
                                    pc.payload_table, active, fail=fail, **finish_scalars)
                    if self.exchange.communicate_params:
                        pc.rows(self.payload).add_(w)  # type: ignore[attr-defined]
                elif io.grad_blocks is None:
                    finish_io(pc.tensors(io.params_all), pc.locator, g, d, v_diag, m, pc.table,
                              self.active_host[c.block_start : c.block_stop], fail=fail,  # type: ignore[attr-defined]
                              **finish_scalars)
                else:
                    _backend.finish(io.update_flat, g, d, v_diag, w if decoupled else None, m, pc.table,
                                    active, fail=fail, **finish_scalars)
                if m is not None and m.data_ptr() != pc.rows(self.momentum).data_ptr():  # type: ignore[attr-defined]
                    pc.rows(self.momentum).copy_(m)  # type: ignore[attr-defined]
        finally:
            self._pipe_full = None

    # Where eigenvalue-corrected Shampoo (soap_group_engine.py) differs; Shampoo's versions.
    _direction_needs_full = True  # the direction reads full inverse roots (chunk scratch)

    def _chunk_before_moments(self, pc: PipeChunk, g: torch.Tensor, active: torch.Tensor, scalars: Any) -> None:
        """Work on the chunk's raw G (after L2 decay) before it becomes G_hat: none here."""

    def _chunk_direction(self, pc: PipeChunk, out: torch.Tensor, g_hat: torch.Tensor, inv_roots: torch.Tensor,
                         active: torch.Tensor) -> None:
        """The Shampoo direction of the chunk's G_hat (SPEC B §4.8) into `out` (Shampoo dtype)."""
        assert self._pipe_full is not None
        roots = self.packing.unpack(self._pipe_full, inv_roots, pc.chunk, self.active)  # type: ignore[attr-defined]
        _backend.precondition(out, g_hat, roots, pc.table, active,
                              num_threads=self.num_threads)  # type: ignore[attr-defined]

    def _root_step_grads(self, chunk: Chunk) -> tuple[torch.Tensor, Any]:
        """A root step's G for the chunk's blocks, in the Shampoo dtype (chunk scratch), and
        the table that addresses it (prepare(); nothing model-sized is written)."""
        pc = self._pipe_by_start[chunk.block_start]
        g = self._chunk_grads(pc, self._step_io)  # type: ignore[attr-defined]
        return self._in_dtype("g_s", g, self.shampoo_dtype), pc.table
