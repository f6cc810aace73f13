"""SLERP between two models (mergekit's `slerp`), with the angle from a statistics pass.

mergekit flattens each tensor, normalises copies by their norms, and interpolates along the
great circle by `t` (linearly when the directions are nearly parallel). The norms and the dot
product are whole-tensor reductions: the first pass computes each norm as the norm of the norms
of 2**20-element chunks, the second the dot product of the normalised chunks, in the order and
chunking mergekit uses, so the coefficients are mergekit's to the bit for single-tensor
batches. The merge itself is then elementwise: `c0 * base + c1 * other`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


class SlerpStatistics:
    """Two passes: chunk norms, then the dot product of the normalised chunks."""

    def __init__(self, params: Mapping[str, Any], numel: int, eps: float = 1e-8) -> None:
        self.t = float(params["t"])
        self.eps = eps
        self.threshold = float(params.get("dot_threshold", 0.9995))
        self._pass = 0
        self._na: list[torch.Tensor] = []
        self._nb: list[torch.Tensor] = []
        self._dots: list[torch.Tensor] = []
        self._norms: tuple[torch.Tensor, torch.Tensor] | None = None
        self._coef: tuple[float, float] | None = None

    def needs_pass(self) -> bool:
        return self._pass < 2

    def update(self, xs: Sequence[torch.Tensor], element_start: int, key: int = 0) -> None:
        a, b = xs[0].reshape(1, -1), xs[1].reshape(1, -1)
        if self._pass == 0:
            self._na.append(torch.linalg.vector_norm(a, dim=1, keepdim=True))
            self._nb.append(torch.linalg.vector_norm(b, dim=1, keepdim=True))
        else:
            na, nb = self._norms  # type: ignore[misc]
            self._dots.append(((a / na) * (b / nb)).sum(dim=1, keepdim=True))

    def end_pass(self) -> None:
        if self._pass == 0:
            na = torch.linalg.vector_norm(torch.stack(self._na), dim=0)
            nb = torch.linalg.vector_norm(torch.stack(self._nb), dim=0)
            self._norms = (torch.where(na > self.eps, na, 1), torch.where(nb > self.eps, nb, 1))
        else:
            dot = torch.stack(self._dots).sum(dim=0).clamp(-1, 1)
            self._coef = slerp_coefficients(self.t, dot, self.threshold)
        self._pass += 1

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._coef is not None
        return self._coef


def slerp_coefficients(t: float, dot: torch.Tensor, threshold: float = 0.9995) -> tuple[torch.Tensor, torch.Tensor]:
    """mergekit's coefficients (fp32, shape [1, 1]) for the base and the other model."""
    tt = torch.tensor([t], dtype=torch.float32).reshape(-1, 1)
    linear = dot.abs() > threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return coef_a, coef_b


def slerp_statistics(params: Mapping[str, Any], numel: int) -> SlerpStatistics:
    return SlerpStatistics(params, numel)


def slerp(
    xs: Sequence[torch.Tensor], params: Mapping[str, Any], statistics: Any, element_start: int = 0
) -> torch.Tensor:
    """`xs`: base, other (fp32 chunks); `statistics`: the two coefficients from `SlerpStatistics`."""
    coef_a, coef_b = statistics
    a, b = xs[0].reshape(1, -1), xs[1].reshape(1, -1)
    return (coef_a * a + coef_b * b).reshape(-1)
