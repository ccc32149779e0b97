"""The proof, before any write, that a step's factor update cannot overflow (issue 16 item 2).

A factor F = sum of weighted G G^T terms is positive semidefinite, so every entry satisfies
|F_ij| <= sqrt(F_ii F_jj) <= trace(F), and the update F' = beta2 F + (1 - beta2) G G^T has
trace(F') = beta2 trace(F) + (1 - beta2) ||G||_F^2 (the same ||G||_F^2 for every mode of a
block: each unfolding holds the same elements). The kernel first forms C = G G^T unweighted
(|C_ij| <= ||G||_F^2), then the update, so both must fit the Shampoo dtype and F' must fit the
storage dtype. The gather pass gives ||G||_F^2 per block, summed in double; trace(F) comes
from the stored diagonal (of packed storage, shampoo_packed_chunks.py). If the bound, widened by the rounding of a float sum of numel terms,
stays below the largest finite value, no entry can become Inf, so the update may run in
place; otherwise the step raises before anything is written.
"""

from typing import Any

import numpy as np
import torch

from distributed_shampoo import _backend
from distributed_shampoo.utils.shampoo_packed_chunks import packed_offsets


def _max_finite(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


class FactorOverflowGuard:
    """Per-factor no-overflow bound of one engine's factor update (see the module doc)."""

    def __init__(
        self, layout: Any, storage_dtype: torch.dtype, shampoo_dtype: torch.dtype, beta2: float,
        device: torch.device,
    ) -> None:
        rows = layout.table.numpy()
        positions: list[np.ndarray] = []
        owners: list[np.ndarray] = []
        widen = np.zeros(layout.factor_count, dtype=np.float64)
        eps = float(torch.finfo(shampoo_dtype).eps)
        starts = packed_offsets(layout)
        for b, shape in enumerate(layout.block_shapes):
            row = rows[b]
            first = int(row[_backend.BF_FACTOR_INDEX])
            numel = int(row[_backend.BF_NUMEL])
            for k, d in enumerate(shape):
                # diagonal of packed storage (upper triangle by rows): row i starts at
                # i*d - i*(i-1)/2 and holds its diagonal entry first
                i = np.arange(d, dtype=np.int64)
                positions.append(starts[first + k] + i * d - i * (i - 1) // 2)
                owners.append(np.full(d, first + k, dtype=np.int64))
                # a float sum of m products errs by at most m*eps relative to sum |terms|;
                # the few extra ulps cover beta2*F, (1-beta2)*C and their sum.
                widen[first + k] = 1.0 + (numel + 8) * eps
        def joined(parts: list[np.ndarray]) -> torch.Tensor:
            return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64)).to(device)

        self.diag_index = joined(positions)
        self.diag_factor = joined(owners)
        self.factor_block = torch.from_numpy(layout.factor_block.astype(np.int64)).to(device)
        self.widen = torch.from_numpy(widen).to(device)
        self.beta2 = float(beta2)
        self.limit = min(_max_finite(storage_dtype), _max_finite(shampoo_dtype))
        self.sq_norms = torch.zeros(layout.num_blocks, dtype=torch.float64, device=device)
        self.factor_count = layout.factor_count
        # made once: every step ranks the factors that fail the bound
        self.factor_index = torch.arange(self.factor_count, device=device)

    def traces(self, factors: torch.Tensor) -> torch.Tensor:
        """trace of every factor (float64), from the stored diagonal."""
        out = torch.zeros(self.factor_count, dtype=torch.float64, device=factors.device)
        return out.index_add_(0, self.diag_factor, factors[self.diag_index].to(torch.float64))

    def bounds(self, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per factor, an upper bound on every |entry| the coming update computes (float64),
        and whether the stored factor is finite now."""
        sq = self.sq_norms[self.factor_block]
        trace = self.traces(factors)
        if self.beta2 == 1.0:
            new = trace + sq
        else:
            new = self.beta2 * trace + (1.0 - self.beta2) * sq
        return torch.maximum(new, sq) * self.widen, torch.isfinite(trace)

    def first_overflow(self, factors: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Device scalar: the first active factor whose update could overflow, or -1; and the
        per-factor bound (bounds()), which a root step's proof reuses. A factor that is not
        finite already (a corrupted state) is left to the root step's check, which names it
        as such."""
        bound, finite = self.bounds(factors)
        # "not <= limit": an Inf or NaN bound (a double sum of squares beyond 1.8e308) fails
        bad = ~(bound <= self.limit) & finite & active[self.factor_block].bool()
        if self.factor_count == 0:
            return torch.full((), -1, dtype=torch.int64, device=factors.device), bound
        first = torch.where(bad, self.factor_index, self.factor_count).min()
        return torch.where(first == self.factor_count, -1, first), bound
