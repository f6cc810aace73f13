"""TIES (trim, elect sign, disjoint mean) and Model Breadcrumbs, with exact streamed top-k.

Trimming keeps, per model, the k = max(1, int(density * numel)) deltas of largest magnitude
(mergekit's `magnitude`). The k-th largest |delta| is found exactly without holding the
tensor: |delta| is a non-negative fp32, so its bit pattern orders like its value; one pass
histograms the high 16 bits, a second the low 16 bits inside the bin that holds the k-th
value. Memory: two histograms per model, whatever the tensor size. Elements equal to the
threshold are ranked by position (first ones kept), found by a third pass only when needed, so
exactly k elements survive, whichever chunks they arrive in. (mergekit's argsort orders ties
arbitrarily; with distinct magnitudes the kept sets are identical.)

Global mode (`global_magnitude: true`, a lazymerge extension) ranks each model's deltas over
every tensor merged this way at once, as in the TIES paper: one threshold per model.

`rescale: true` (mergekit's L1 rescale) wraps the cuts in `rescale.L1Rescale`: one more pass
sums the kept |delta| per tensor, and the kept deltas are multiplied by the tensor's L1 ratio.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lazymerge.methods import StatisticsAccumulator
from lazymerge.methods.rescale import L1Rescale
from lazymerge.methods.task_arithmetic import generalized_task_arithmetic

_POS_SHIFT = 40  # position key = ordinal << 40 | element index (tensors < 2**40 elements)
_NONE, _ALL, _THRESHOLD = 0, 1, 2


@dataclass(frozen=True)
class TopKCut:
    """Membership in a model's top k: all, none, or |d| > thr or (|d| == thr and pos <= last)."""

    mode: int
    threshold_bits: int = 0
    last_pos: int | None = None  # None: every element equal to the threshold is in


def magnitude_bits(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The fp32 bit patterns of |x - base|, as int32 (monotonic in the magnitude)."""
    return torch.sub(x, base).abs_().view(torch.int32)


def in_top(bits: torch.Tensor, cut: TopKCut, pos_start: int) -> torch.Tensor:
    """Bool mask of the chunk elements in the top k (`pos_start`: position key of element 0)."""
    if cut.mode == _ALL:
        return torch.ones(bits.shape, dtype=torch.bool)
    if cut.mode == _NONE:
        return torch.zeros(bits.shape, dtype=torch.bool)
    keep = bits > cut.threshold_bits
    if cut.last_pos is None:
        return keep | (bits == cut.threshold_bits)
    n_eq_ok = cut.last_pos - pos_start + 1  # elements at positions <= last_pos in this chunk
    if n_eq_ok > 0:
        eq = bits[:n_eq_ok] == cut.threshold_bits
        keep[:n_eq_ok] |= eq
    return keep


class TopKStatistics:
    """Streaming exact top-k cuts for several (model, k) requests over the same stream.

    `update` gets the fp32 chunks (base first) and the position key of the chunk's first
    element; chunks of a pass must arrive in increasing position order.
    """

    def __init__(self, requests: Sequence[tuple[int, int]], numel: int) -> None:
        self.requests = list(requests)  # (model index >= 1, k)
        self.numel = numel
        self.cuts: list[TopKCut | None] = []
        self._stage = 0
        self._hist_hi: dict[int, torch.Tensor] = {}
        self._hist_lo: dict[tuple[int, int], torch.Tensor] = {}
        self._need: list[int] = []  # per request: elements still wanted at the current stage
        self._bin: list[int] = []
        self._seen_eq: list[int] = []
        self._last: list[int | None] = []
        self._lo_keys: list[tuple[int, int]] = []
        for _, k in self.requests:
            if k <= 0:
                self.cuts.append(TopKCut(_NONE))
            elif k >= numel:
                self.cuts.append(TopKCut(_ALL))
            else:
                self.cuts.append(None)
        self._models = sorted({m for (m, _), c in zip(self.requests, self.cuts, strict=True) if c is None})

    def needs_pass(self) -> bool:
        return any(c is None for c in self.cuts)

    def update(self, xs: Sequence[torch.Tensor], element_start: int, key: int = 0) -> None:
        base = xs[0]
        pos_start = (key << _POS_SHIFT) + element_start
        for m in self._models:
            bits = magnitude_bits(xs[m], base)
            if self._stage == 0:
                h = torch.bincount(bits >> 16, minlength=1 << 16)
                self._hist_hi[m] = h if m not in self._hist_hi else self._hist_hi[m] + h
            elif self._stage == 1:
                for mm, b in self._lo_keys:
                    if mm == m:
                        h = torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=1 << 16)
                        self._hist_lo[(m, b)] = self._hist_lo[(m, b)] + h
            else:
                for r, (rm, _) in enumerate(self.requests):
                    if rm != m or self.cuts[r] is not None or self._last[r] is not None:
                        continue
                    eq = (bits == self._bin[r]).to(torch.int64)
                    total = int(eq.sum())
                    if self._seen_eq[r] + total >= self._need[r]:
                        idx = int(torch.nonzero(eq.cumsum(0) == self._need[r] - self._seen_eq[r])[0])
                        self._last[r] = pos_start + idx
                    self._seen_eq[r] += total

    def end_pass(self) -> None:
        if self._stage == 0:
            for r, (m, k) in enumerate(self.requests):
                b, need = _select(self._hist_hi[m], k) if self.cuts[r] is None else (0, 0)
                self._bin.append(b)
                self._need.append(need)
            self._hist_hi.clear()
            self._lo_keys = sorted(
                {(m, self._bin[r]) for r, (m, _) in enumerate(self.requests) if self.cuts[r] is None}
            )
            self._hist_lo = {key: torch.zeros(1 << 16, dtype=torch.int64) for key in self._lo_keys}
            self._stage = 1
        elif self._stage == 1:
            for r, (m, _) in enumerate(self.requests):
                if self.cuts[r] is not None:
                    self._last.append(None)
                    self._seen_eq.append(0)
                    continue
                hist = self._hist_lo[(m, self._bin[r])]
                lo, need = _select(hist, self._need[r])
                thr = (self._bin[r] << 16) | lo
                self._bin[r], self._need[r] = thr, need
                self._last.append(None)
                self._seen_eq.append(0)
                if need == int(hist[lo]):  # every element equal to the threshold is in
                    self.cuts[r] = TopKCut(_THRESHOLD, thr, None)
            self._hist_lo.clear()
            self._stage = 2
        else:
            for r in range(len(self.requests)):
                if self.cuts[r] is None:
                    self.cuts[r] = TopKCut(_THRESHOLD, self._bin[r], self._last[r])

    def result(self) -> list[TopKCut]:
        assert not self.needs_pass()
        return list(self.cuts)  # type: ignore[arg-type]


def _select(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and how many elements of that bin are wanted."""
    above = torch.flip(hist, [0]).cumsum(0)  # above[j]: elements in bins >= len - 1 - j
    j = int(torch.searchsorted(above, torch.tensor([k]))[0])
    b = hist.numel() - 1 - j
    before = int(above[j - 1]) if j > 0 else 0
    return b, k - before


def keep_count(density: float, numel: int) -> int:
    """mergekit's `magnitude`: density >= 1 keeps all, <= 0 none, else max(1, int(d * n))."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def breadcrumbs_counts(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """mergekit's `magnitude_outliers` as top-k sets: keep top K2 minus top K1."""
    if density >= 1:
        return numel, 0
    target = int(density * numel)
    n_top = int(gamma * numel)
    n_bot = max(0, numel - target - n_top)
    return numel - n_bot, max(0, numel - n_bot - target)


def _ties_requests(params: Mapping[str, Any], numel: int) -> list[tuple[int, int]]:
    return [(i + 1, keep_count(d, numel)) for i, d in enumerate(params["densities"])]


def _breadcrumbs_requests(params: Mapping[str, Any], numel: int) -> list[tuple[int, int]]:
    out = []
    for i, (d, g) in enumerate(zip(params["densities"], params["gammas"], strict=True)):
        k2, k1 = breadcrumbs_counts(d, g, numel)
        out += [(i + 1, k2), (i + 1, k1)]
    return out


def _pos(params: Mapping[str, Any], element_start: int) -> int:
    # The statistics passes key every tensor by its ordinal (global or not), so positions do too.
    return (params.get("ordinal", 0) << _POS_SHIFT) + element_start


def _with_rescale(params: Mapping[str, Any], inner: TopKStatistics, keep: Any) -> StatisticsAccumulator:
    """mergekit's `rescale: true`: wrap the top-k cuts with per-tensor L1 factors."""
    if not params.get("rescale", False):
        return inner
    enabled = [d < 1 for d in params["densities"]]  # mergekit returns density >= 1 untouched

    def keep_fn(xs: Sequence[torch.Tensor], cuts: Any, element_start: int, key: int) -> list[torch.Tensor]:
        return keep(xs, cuts, (key << _POS_SHIFT) + element_start)

    return L1Rescale(inner, keep_fn, enabled)


def ties_statistics(params: Mapping[str, Any], numel: int) -> StatisticsAccumulator:
    return _with_rescale(params, TopKStatistics(_ties_requests(params, numel), numel), _magnitude_keep)


def breadcrumbs_statistics(params: Mapping[str, Any], numel: int) -> StatisticsAccumulator:
    return _with_rescale(params, TopKStatistics(_breadcrumbs_requests(params, numel), numel), _breadcrumbs_keep)


def _cuts_and_factors(params: Mapping[str, Any], statistics: Any) -> tuple[Any, Any]:
    if params.get("rescale", False):
        return statistics.inner, statistics.for_key(params.get("ordinal", 0))
    return statistics, None


def _magnitude_keep(xs: Sequence[torch.Tensor], cuts: Sequence[TopKCut], pos: int) -> list[torch.Tensor]:
    return [in_top(magnitude_bits(x, xs[0]), c, pos) for x, c in zip(xs[1:], cuts, strict=True)]


def _breadcrumbs_keep(xs: Sequence[torch.Tensor], cuts: Sequence[TopKCut], pos: int) -> list[torch.Tensor]:
    keep = []
    for i, x in enumerate(xs[1:]):
        bits = magnitude_bits(x, xs[0])
        keep.append(in_top(bits, cuts[2 * i], pos) & ~in_top(bits, cuts[2 * i + 1], pos))
    return keep


def ties(
    xs: Sequence[torch.Tensor], params: Mapping[str, Any], statistics: Any, element_start: int = 0
) -> torch.Tensor:
    """`params`: weights, densities, normalize (default True), lambda, rescale (L1, default False)."""
    cuts, factors = _cuts_and_factors(params, statistics)
    keep = _magnitude_keep(xs, cuts, _pos(params, element_start))
    return generalized_task_arithmetic(
        xs,
        params["weights"],
        keep=keep,
        factors=factors,
        consensus=True,
        normalize=params.get("normalize", True),
        lam=params.get("lambda", 1.0),
    )


def breadcrumbs(
    xs: Sequence[torch.Tensor], params: Mapping[str, Any], statistics: Any, element_start: int = 0
) -> torch.Tensor:
    """`params`: weights, densities, gammas, normalize (default False), lambda, rescale (L1)."""
    cuts, factors = _cuts_and_factors(params, statistics)
    keep = _breadcrumbs_keep(xs, cuts, _pos(params, element_start))
    return generalized_task_arithmetic(
        xs,
        params["weights"],
        keep=keep,
        factors=factors,
        normalize=params.get("normalize", False),
        lam=params.get("lambda", 1.0),
    )


def breadcrumbs_ties(
    xs: Sequence[torch.Tensor], params: Mapping[str, Any], statistics: Any, element_start: int = 0
) -> torch.Tensor:
    """Breadcrumbs trimming with TIES sign election."""
    cuts, factors = _cuts_and_factors(params, statistics)
    keep = _breadcrumbs_keep(xs, cuts, _pos(params, element_start))
    return generalized_task_arithmetic(
        xs,
        params["weights"],
        keep=keep,
        factors=factors,
        consensus=True,
        normalize=params.get("normalize", False),
        lam=params.get("lambda", 1.0),
    )
