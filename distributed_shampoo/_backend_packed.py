"""The door to the packed symmetric storage kernels (csrc/core/sym_pack.h) and the packed
factor update (csrc/core/factor_update.h): packed <-> full factor layout, the root commit,
the compact selection of a staged root step, and packed_numel. Split from _backend.py (which
re-exports these names) to keep each door small; the argument checks and the entry lookup are
_backend's.
"""

from typing import Any

import numpy as np
import torch

from distributed_shampoo._backend import (
    _C, _checked, _cuda_table, _entry, _host_table, _is_cuda, _stream, _thread_count,
)


def packed_numel(table: Any) -> int:
    """Elements of the packed layout of a table's blocks (csrc/core/sym_pack.h)."""
    return int(_C.packed_numel(torch.as_tensor(np.asarray(_host_table(table), dtype=np.int64))))


def _packed_op(op: str, names: tuple[str, str, str, str], a: Any, b: Any, table: Any, mask: Any,
               *flag: bool) -> None:
    args = (a, b, _host_table(table), mask)
    _checked(op, names, args)
    kernel = _entry(op, names[0], a)
    if not _is_cuda(a):
        kernel(*args, *flag)
        return
    kt = _cuda_table(op, table, a)
    offsets, offsets_host = kt.packed_offsets()
    kernel(_stream(a.device), a, b, kt.device_table, kt.host, offsets, offsets_host, mask, *flag)


def factor_update_packed(
    factors_out: Any, factors_in: Any, grads: Any, table: Any, active: Any, beta2: float, *,
    num_threads: int = 1,
) -> None:
    """factor_update on packed factors (CPU; csrc/core/factor_update.h): the same values as
    the full update's upper triangles, without unpacking."""
    args = (factors_out, factors_in, grads, _host_table(table), active)
    _checked("factor_update_packed", ("factors_out", "factors_in", "grads", "table", "active"), args)
    kernel = _entry("factor_update_packed", "factors_out", factors_out)
    kernel(*args, float(beta2), _thread_count("factor_update_packed", num_threads))


def sym_unpack(full: Any, packed: Any, table: Any, active: Any) -> None:
    """full (factor layout) <- packed symmetric matrices, for every factor of every active
    block (csrc/core/sym_pack.h); other factors of full are left as they are."""
    _packed_op("sym_unpack", ("full", "packed", "table", "active"), full, packed, table, active)


def sym_pack(packed: Any, full: Any, table: Any, mask: Any = None, *, average: bool = False) -> None:
    """packed <- the upper triangle of every factor of full with mask[f] (None: all); with
    `average`, the symmetric part 0.5 F_ij + 0.5 F_ji (for inverse roots)."""
    _packed_op("sym_pack", ("packed", "full", "table", "mask"), packed, full, table, mask, bool(average))


def packed_commit(dst: Any, src: Any, table: Any, commit: Any) -> None:
    """Per factor, packed layout: commit[f] ? dst[f] <- src[f] : src[f] <- dst[f]."""
    _packed_op("packed_commit", ("dst", "src", "table", "commit"), dst, src, table, commit)


def packed_select(compact: Any, packed: Any, table: Any, select: Any, write: Any = None, *,
                  to_packed: bool) -> None:
    """Per factor between the packed layout of `table` and a compact one holding only the
    factors with select[f], back to back in table order: those with write[f] (None: every
    selected one) are copied compact -> packed when `to_packed`, else packed -> compact
    (CPU; memcpy per factor, no unpacking). The buffers must not overlap."""
    args = (compact, packed, _host_table(table), select, write)
    _checked("packed_select", ("compact", "packed", "table", "select", "write"), args)
    kernel = _entry("packed_select", "compact", compact)
    kernel(*args, bool(to_packed))
