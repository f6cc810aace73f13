"""mergekit's L1 rescaling of a sparsified delta, from streaming statistics.

mergekit (`sparsify.rescaled_masked_tensor`, `rescale: true`) multiplies a model's masked delta
by `|delta|_1 / |delta * mask|_1`, two sums over the whole tensor, unless either is below 1e-7.
Both sums come from statistics passes: `|delta|_1` during the wrapped accumulator's first pass,
`|delta * mask|_1` in one extra pass once the mask is known (the mask is a function of the
wrapped accumulator's result, so that pass computes it exactly as the merge will).

Summation order: torch sums a tensor of at most `BLOCK` (32768, its parallel grain) elements
serially, so such a tensor's sum here is torch's, bit for bit, and so is mergekit's L1 ratio.
Longer tensors are summed as the sum of their 32768-element block sums (each a serial torch
sum), which does not depend on the chunk size or on the thread count; torch's own sum of a
longer tensor (and so mergekit's) depends on its thread count and may differ in the last bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lazymerge.methods import STATISTICS_CHUNK, StatisticsAccumulator

__all__ = ["BLOCK", "L1Rescale", "Rescaled", "block_sums", "det_sum", "l1_factor"]

BLOCK = 32768  # torch's GRAIN_SIZE: reductions of fewer elements never go parallel
assert STATISTICS_CHUNK % BLOCK == 0  # so blocks never straddle two statistics chunks
_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps

# keep(xs, inner_result, element_start, key) -> one bool mask per non-base model (None: all kept)
KeepFn = Callable[[Sequence[torch.Tensor], Any, int, int], Sequence[torch.Tensor | None]]


def block_sums(v: torch.Tensor) -> list[torch.Tensor]:
    """fp32 sums of consecutive BLOCK-element pieces of `v` (each a serial torch sum)."""
    return [v[i : i + BLOCK].sum() for i in range(0, v.numel(), BLOCK)]


def det_sum(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum fp32 0-d partial sums in a fixed tree of serial sums (one part: itself)."""
    if not parts:
        return torch.zeros((), dtype=torch.float32)
    v = torch.stack(list(parts))
    while v.numel() > 1:
        v = torch.stack(block_sums(v)) if v.numel() > BLOCK else v.sum().reshape(1)
    return v.reshape(())


def l1_factor(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor | None:
    """mergekit's factor `before / after`, or None where it leaves the masked delta as is."""
    if bool(before < _EPS) or bool(after < _EPS):
        return None
    return before / after


@dataclass(frozen=True)
class Rescaled:
    """The wrapped statistics plus, per tensor key and model, the L1 factor (None: no rescale)."""

    inner: Any
    factors: dict[int, list[torch.Tensor | None]]
    n_models: int

    def for_key(self, key: int) -> list[torch.Tensor | None]:
        return self.factors.get(key, [None] * self.n_models)


class L1Rescale:
    """Wrap a mask-deciding accumulator; add per-tensor (per `key`) L1 factors per model.

    `enabled[i]` says whether model i + 1 is rescaled (mergekit skips densities >= 1).
    """

    def __init__(self, inner: StatisticsAccumulator, keep: KeepFn, enabled: Sequence[bool]) -> None:
        self.inner = inner
        self.keep = keep
        self.enabled = list(enabled)
        self._before: dict[int, list[list[torch.Tensor]]] = {}
        self._after: dict[int, list[list[torch.Tensor]]] = {}
        self._before_done = False
        self._done = not any(self.enabled)
        self._inner_result: Any = None
        self._have_inner = False

    def needs_pass(self) -> bool:
        return self.inner.needs_pass() or not self._done

    def _inner(self) -> Any:
        if not self._have_inner:
            self._inner_result, self._have_inner = self.inner.result(), True
        return self._inner_result

    def _deltas(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        return [torch.sub(x, xs[0]) if on else None for x, on in zip(xs[1:], self.enabled, strict=True)]

    def update(self, xs: Sequence[torch.Tensor], element_start: int, key: int = 0) -> None:
        final = not self.inner.needs_pass()
        if not final:
            self.inner.update(xs, element_start, key)
        if self._done:
            return
        deltas = self._deltas(xs) if (final or not self._before_done) else []
        if not self._before_done:
            sums = self._before.setdefault(key, [[] for _ in self.enabled])
            for i, d in enumerate(deltas):
                if d is not None:
                    sums[i] += block_sums(d.abs())
        if final:
            masks = self.keep(xs, self._inner(), element_start, key)
            sums = self._after.setdefault(key, [[] for _ in self.enabled])
            for i, d in enumerate(deltas):
                if d is not None:
                    masked = d if masks[i] is None else d * masks[i].to(torch.float32)
                    sums[i] += block_sums(masked.abs())

    def end_pass(self) -> None:
        if self.inner.needs_pass():
            self.inner.end_pass()
            self._before_done = True
            return
        # The extra pass (which also summed |delta| when the wrapped one needed no pass).
        self._before_done = True
        self._done = True

    def result(self) -> Rescaled:
        assert not self.needs_pass()
        factors: dict[int, list[torch.Tensor | None]] = {}
        for key, before in self._before.items():
            after = self._after.get(key, [[] for _ in self.enabled])
            factors[key] = [
                l1_factor(det_sum(b), det_sum(a)) if on else None
                for b, a, on in zip(before, after, self.enabled, strict=True)
            ]
        return Rescaled(self._inner(), factors, len(self.enabled))
