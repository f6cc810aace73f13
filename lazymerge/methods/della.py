"""DELLA (MAGPRUNE: magnitude-ranked drop probabilities): della and della_linear.

mergekit's `della_magprune` ranks each delta's magnitude within its row (a 1-D tensor is one
row), maps rank 1..n linearly to a keep probability from `density - epsilon` (smallest) to
`density + epsilon` (largest), draws a Bernoulli mask, and with `rescale` (the default)
multiplies the kept deltas by the L1 ratio `|delta|_1 / |delta * mask|_1` of the tensor; then
TIES sign election and disjoint mean (`della`) or a plain weighted sum (`della_linear`).

Differences, both by construction:
- Ranks. An exact rank needs the whole row sorted (O(row) memory per row, and the merge's chunks
  do not follow rows), so ranks are estimated from statistics passes instead: per model, the
  row maximum of |delta|, then a histogram of |delta| / row max in `BINS` equal bins per row;
  an element's rank is the count of its row below its bin plus its linear position inside its
  bin. Exact when no bin holds two elements of a row; otherwise off by at most the bin's count,
  so the keep probability is off by at most 2 * epsilon * (bin count) / (row length - 1).
  Memory: BINS + 1 numbers per row and model. Tensors of 3 or more dimensions are ranked along
  their last dimension (mergekit: along dim 1).
- Randomness. The Bernoulli draw comes from the counter-based generator of DARE (splitmix64 of
  seed, tensor name, model, element index; salted so it differs from DARE's mask): the same bytes
  for any chunk size or thread count. mergekit draws from torch's global generator.
The L1 ratio itself is mergekit's (`rescale.py`), computed over the mask this module draws.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lazymerge.methods import StatisticsAccumulator
from lazymerge.methods.dare import uniform53
from lazymerge.methods.rescale import L1Rescale
from lazymerge.methods.task_arithmetic import generalized_task_arithmetic

__all__ = ["BINS", "DellaRankStatistics", "DellaRanks", "della_keep", "keep_probability"]

BINS = 64
_SALT = "della"


@dataclass(frozen=True)
class DellaRanks:
    """Per model (by index >= 1): row maxima of |delta| and the per-row histogram of |delta|."""

    row: int
    rowmax: dict[int, torch.Tensor]  # [rows] fp32
    below: dict[int, torch.Tensor]  # [rows * BINS] int32: elements of the row in lower bins
    count: dict[int, torch.Tensor]  # [rows * BINS] int32: elements of the row in the bin


def _row_ids(element_start: int, n: int, row: int) -> tuple[int, int, torch.Tensor]:
    """First row touched, number of rows touched, and each element's row relative to the first."""
    first = element_start // row
    last = (element_start + n - 1) // row
    ids = torch.arange(element_start, element_start + n, dtype=torch.int64) // row - first
    return first, last - first + 1, ids


def _bin_position(mag: torch.Tensor, rowmax: torch.Tensor) -> torch.Tensor:
    """|delta| / row max * BINS in fp64 (0 for an all-zero row): bin index + position in bin."""
    m = rowmax.double()
    return torch.where(m > 0, mag.double() / torch.where(m > 0, m, 1.0) * BINS, 0.0)


def _bin_of(pos: torch.Tensor) -> torch.Tensor:
    return pos.floor().clamp_(0, BINS - 1).to(torch.int64)


class DellaRankStatistics:
    """Pass 1: each row's max |delta| per model; pass 2: each row's histogram of |delta|."""

    def __init__(self, params: Mapping[str, Any], numel: int) -> None:
        self.row = int(params["row"])
        rows = -(-numel // self.row) if numel else 0
        self.models = [i + 1 for i, d in enumerate(params["densities"]) if 0 < d < 1]
        self._pass = 0 if self.models else 2
        self._rowmax = {m: torch.zeros(rows, dtype=torch.float32) for m in self.models}
        self._hist = {m: torch.zeros(rows * BINS, dtype=torch.int32) for m in self.models}

    def needs_pass(self) -> bool:
        return self._pass < 2

    def update(self, xs: Sequence[torch.Tensor], element_start: int, key: int = 0) -> None:
        first, n_rows, ids = _row_ids(element_start, xs[0].numel(), self.row)
        for m in self.models:
            mag = torch.sub(xs[m], xs[0]).abs_()
            if self._pass == 0:
                local = torch.zeros(n_rows, dtype=torch.float32).scatter_reduce_(0, ids, mag, "amax")
                view = self._rowmax[m][first : first + n_rows]
                torch.maximum(view, local, out=view)
            else:
                b = _bin_of(_bin_position(mag, self._rowmax[m][first + ids]))
                counts = torch.bincount(ids * BINS + b, minlength=n_rows * BINS)
                self._hist[m][first * BINS : (first + n_rows) * BINS] += counts.to(torch.int32)

    def end_pass(self) -> None:
        self._pass += 1

    def result(self) -> DellaRanks:
        below, count = {}, {}
        for m in self.models:
            h = self._hist[m].view(-1, BINS)
            below[m] = (h.cumsum(1, dtype=torch.int32) - h).reshape(-1)
            count[m] = self._hist[m]
        return DellaRanks(self.row, self._rowmax, below, count)


def keep_probability(
    mag: torch.Tensor, ranks: DellaRanks, model: int, element_start: int, density: float, epsilon: float
) -> torch.Tensor:
    """fp64 keep probability of each element: density - eps + 2 * eps * (rank - 1) / (n - 1)."""
    first, _, ids = _row_ids(element_start, mag.numel(), ranks.row)
    rows = first + ids
    pos = _bin_position(mag, ranks.rowmax[model][rows])
    b = _bin_of(pos)
    frac = (pos - b).clamp_(0, 1)
    flat = rows * BINS + b
    cnt = ranks.count[model][flat].double()
    rank0 = ranks.below[model][flat].double() + (cnt - 1).clamp_(min=0) * frac
    if ranks.row > 1:
        rank_norm = (rank0 / (ranks.row - 1)).clamp_(0, 1)
    else:
        rank_norm = torch.full_like(rank0, 0.5)  # one element: mergekit divides 0 by 0
    return (density - epsilon) + rank_norm * (2 * epsilon)


def della_keep(
    xs: Sequence[torch.Tensor], params: Mapping[str, Any], ranks: DellaRanks, element_start: int
) -> list[torch.Tensor | None]:
    """Per model, the bool keep mask of the chunk (None: all kept, mergekit's density >= 1)."""
    out: list[torch.Tensor | None] = []
    count = xs[0].numel()
    for i, (d, eps) in enumerate(zip(params["densities"], params["epsilons"], strict=True)):
        if d >= 1:
            out.append(None)
        elif d <= 0:
            out.append(torch.zeros(count, dtype=torch.bool))
        else:
            mag = torch.sub(xs[i + 1], xs[0]).abs_()
            p = keep_probability(mag, ranks, i + 1, element_start, d, eps)
            u = uniform53(params.get("seed", 0), params["tensor"], i + 1, element_start, count, _SALT)
            out.append(torch.from_numpy(u).double().mul_(2.0**-53) < p)
    return out


def della_statistics(params: Mapping[str, Any], numel: int) -> StatisticsAccumulator:
    ranks = DellaRankStatistics(params, numel)
    if not params.get("rescale", True):
        return ranks
    enabled = [0 < d < 1 for d in params["densities"]]

    def keep(xs: Sequence[torch.Tensor], inner: Any, element_start: int, key: int) -> list[torch.Tensor | None]:
        return della_keep(xs, params, inner, element_start)

    return L1Rescale(ranks, keep, enabled)


def _della(
    xs: Sequence[torch.Tensor], params: Mapping[str, Any], statistics: Any, element_start: int, consensus: bool
) -> torch.Tensor:
    if params.get("rescale", True):
        ranks, factors = statistics.inner, statistics.for_key(params.get("ordinal", 0))
    else:
        ranks, factors = statistics, None
    return generalized_task_arithmetic(
        xs,
        params["weights"],
        keep=della_keep(xs, params, ranks, element_start),
        factors=factors,
        consensus=consensus,
        normalize=params.get("normalize", False),
        lam=params.get("lambda", 1.0),
    )


def della(
    xs: Sequence[torch.Tensor], params: Mapping[str, Any], statistics: Any, element_start: int = 0
) -> torch.Tensor:
    """`params`: tensor, row, weights, densities, epsilons, seed, rescale, normalize (True), lambda."""
    return _della(xs, params, statistics, element_start, consensus=True)


def della_linear(
    xs: Sequence[torch.Tensor], params: Mapping[str, Any], statistics: Any, element_start: int = 0
) -> torch.Tensor:
    """DELLA dropping and rescaling, then a weighted sum without sign election."""
    return _della(xs, params, statistics, element_start, consensus=False)
