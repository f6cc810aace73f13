"""Model Stock (mergekit's `model_stock`): interpolate between the base and the models' average
by a ratio from the mean angle between the models' task vectors.

mergekit flattens each tensor, takes the offsets `w_i - w_0`, the cosine of every pair of
offsets (dot / max(norm_a * norm_b, 1e-6), clamped to [-1, 1]) and their mean, then
`t = n cos / (1 + (n - 1) cos)` (0 where the denominator is below 1e-6) and returns
`t * mean(w_i) + (1 - t) * w_0`. The norms and dot products are whole-tensor reductions: one
statistics pass computes them (per 32768-element block, summed in a fixed order, so a tensor
of up to 32768 elements gets torch's own reductions and mergekit's bits; see `rescale.py`).
The merge is then elementwise. `filter_wise: true` (one angle per row) is not supported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import torch

from lazymerge.methods.rescale import BLOCK, det_sum


def _block_norms(v: torch.Tensor) -> list[torch.Tensor]:
    return [torch.linalg.vector_norm(v[i : i + BLOCK]) for i in range(0, v.numel(), BLOCK)]


def _norm(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The norm of a tensor from its block norms (one block: torch's norm of the tensor)."""
    if len(parts) == 1:
        return parts[0]
    return torch.linalg.vector_norm(torch.stack(list(parts)))


class ModelStockStatistics:
    """One pass: each offset's norm and each pair's dot product; then mergekit's `t`."""

    def __init__(self, params: Mapping[str, Any], numel: int) -> None:
        self._norms: dict[int, list[torch.Tensor]] = {}
        self._dots: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._t: torch.Tensor | None = None

    def needs_pass(self) -> bool:
        return self._t is None

    def update(self, xs: Sequence[torch.Tensor], element_start: int, key: int = 0) -> None:
        offsets = [torch.sub(x, xs[0]) for x in xs[1:]]
        for i, off in enumerate(offsets):
            self._norms.setdefault(i, []).extend(_block_norms(off))
        for i, j in combinations(range(len(offsets)), 2):
            prod = offsets[i] * offsets[j]
            self._dots.setdefault((i, j), []).extend(prod[k : k + BLOCK].sum() for k in range(0, prod.numel(), BLOCK))

    def end_pass(self) -> None:
        n = len(self._norms)
        norms = [_norm(self._norms[i]) for i in range(n)]
        cos_thetas = []
        for i, j in combinations(range(n), 2):
            norm_product = norms[i] * norms[j]
            cos_thetas.append((det_sum(self._dots[(i, j)]) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
        self._t = model_stock_t(cos_thetas, n)

    def result(self) -> torch.Tensor:
        assert self._t is not None
        return self._t


def model_stock_t(cos_thetas: Sequence[torch.Tensor], count: int) -> torch.Tensor:
    """mergekit's interpolation ratio (shape [1]) from the pairwise cosines (0-d fp32 each)."""
    cos_theta = torch.stack(list(cos_thetas)).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base
    safe_denominator = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe_denominator)


def model_stock_statistics(params: Mapping[str, Any], numel: int) -> ModelStockStatistics:
    return ModelStockStatistics(params, numel)


def model_stock(
    xs: Sequence[torch.Tensor], params: Mapping[str, Any], statistics: Any, element_start: int = 0
) -> torch.Tensor:
    """`xs`: base, then two or more models; `statistics`: the ratio t from `ModelStockStatistics`."""
    t = statistics
    ws = list(xs[1:])
    average = sum(ws) / len(ws)  # Python's sum, as mergekit: 0 + w_1 + w_2 + ...
    return t * average + (1 - t) * xs[0]
