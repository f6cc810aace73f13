"""Multi-SLERP (mergekit's `multislerp`): barycentric interpolation on the hypersphere.

With a base model, each model's task vector `d_i = w_i - base` is normalised (`u_i = d_i /
(|d_i| + eps)`), their weighted mean `m` is projected to the sphere, the `u_i` are mapped to the
tangent space at `m` and averaged there, and the result is mapped back with the exponential map
and scaled by the weighted mean norm. Four whole-tensor reductions are chained (the norms |d_i|,
|m|, the dots u_i . m, and the tangent norm), so the statistics take four streaming passes; the
merge is then elementwise. Reductions go by 32768-element blocks (`rescale.py`): tensors up to
that size get torch's reductions and mergekit's bits. mergekit's optional base is required here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lazymerge.errors import RecipeError
from lazymerge.methods.rescale import BLOCK, det_sum


def _weights(params: Mapping[str, Any]) -> torch.Tensor:
    w = torch.tensor(list(params["weights"]), dtype=torch.float32)
    return w / w.sum() if params.get("normalize_weights", True) else w


def _rows(v: torch.Tensor) -> list[torch.Tensor]:
    """Block pieces of the rows of an [N, n] chunk (each reduced along dim -1, as mergekit)."""
    return [v[:, i : i + BLOCK] for i in range(0, v.shape[-1], BLOCK)]


def _norm(parts: list[torch.Tensor]) -> torch.Tensor:
    """Row norms [N, 1] from block row norms (one block: torch's own)."""
    if len(parts) == 1:
        return parts[0]
    return torch.linalg.vector_norm(torch.cat(parts, dim=-1), dim=-1, keepdim=True)


@dataclass(frozen=True)
class MultiSlerpCoefs:
    norms: torch.Tensor  # [N, 1]
    mean_norm: torch.Tensor
    dots: torch.Tensor  # [N, 1]
    tangent_norm: torch.Tensor  # + eps
    linear: bool  # mergekit's two-model fallback when the weighted mean vanishes


class MultiSlerpStatistics:
    def __init__(self, params: Mapping[str, Any], numel: int) -> None:
        self.w = _weights(params)
        self.eps = float(params.get("eps", 1e-8))
        self.single = len(params["weights"]) == 1
        self._pass = 4 if self.single else 0
        self._parts: list[torch.Tensor] = []
        self._c: dict[str, Any] = {}

    def needs_pass(self) -> bool:
        return self._pass < 4

    def update(self, xs: Sequence[torch.Tensor], element_start: int, key: int = 0) -> None:
        d = torch.stack([torch.sub(x, xs[0]) for x in xs[1:]])
        if self._pass == 0:
            self._parts += [torch.norm(p, dim=-1, keepdim=True) for p in _rows(d)]
            return
        unit = d / (self._c["norms"] + self.eps)
        mean = (unit * self.w.view(-1, 1)).sum(0)
        if self._pass == 1:
            self._parts += [torch.norm(p).reshape(1, 1) for p in _rows(mean.reshape(1, -1))]
            return
        mean = mean / self._c["mean_norm"]
        if self._pass == 2:
            self._parts += [p.sum(-1, keepdim=True) for p in _rows(unit * mean)]
            return
        tangent = ((unit - self._c["dots"] * mean) * self.w.view(-1, 1)).sum(0)
        self._parts += [torch.norm(p).reshape(1, 1) for p in _rows(tangent.reshape(1, -1))]

    def end_pass(self) -> None:
        parts, self._parts = self._parts, []
        if self._pass == 0:
            self._c["norms"] = _norm(parts)
        elif self._pass == 1:
            self._c["mean_norm"] = _norm(parts).reshape(())
            if self._c["mean_norm"] < self.eps:
                if self.w.numel() != 2:
                    raise RecipeError(
                        "multislerp: the weighted sum of the normalised task vectors is zero",
                        hint="antipodal models with balancing weights: change the weights",
                    )
                self._pass = 4  # mergekit falls back to a linear interpolation of the deltas
                return
        elif self._pass == 2:
            if len(parts) == 1:
                self._c["dots"] = parts[0]
            else:
                rows = range(parts[0].shape[0])
                self._c["dots"] = torch.stack([det_sum([p[i, 0] for p in parts]) for i in rows]).reshape(-1, 1)
        else:
            self._c["tangent_norm"] = _norm(parts).reshape(()) + self.eps
        self._pass += 1

    def result(self) -> MultiSlerpCoefs | None:
        if self.single:
            return None
        c = self._c
        if "tangent_norm" not in c:
            return MultiSlerpCoefs(c["norms"], c["mean_norm"], torch.zeros(0), torch.zeros(()), True)
        return MultiSlerpCoefs(c["norms"], c["mean_norm"], c["dots"], c["tangent_norm"], False)


def multislerp_statistics(params: Mapping[str, Any], numel: int) -> MultiSlerpStatistics:
    return MultiSlerpStatistics(params, numel)


def multislerp(
    xs: Sequence[torch.Tensor], params: Mapping[str, Any], statistics: Any, element_start: int = 0
) -> torch.Tensor:
    """`xs`: base, then the models; `params`: weights, normalize_weights, eps."""
    if statistics is None:  # one model: mergekit returns it as is
        return xs[1].clone()
    w = _weights(params)
    d = torch.stack([torch.sub(x, xs[0]) for x in xs[1:]])
    if statistics.linear:
        return (d[0] * w[0] + d[1] * w[1]) + xs[0]
    eps = float(params.get("eps", 1e-8))
    unit = d / (statistics.norms + eps)
    mean = (unit * w.view(-1, 1)).sum(0) / statistics.mean_norm
    tangent = ((unit - statistics.dots * mean) * w.view(-1, 1)).sum(0)
    tn = statistics.tangent_norm
    result = mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
    avg_norm = (statistics.norms.squeeze(-1) * w).sum()
    return result * avg_norm + xs[0]
