"""Task arithmetic and the generalized form TIES and DARE build on (mergekit's
`GeneralizedTaskArithmeticMerge`), on chunks.

`xs[0]` is the base model, `xs[1:]` the other models. With the per-model keep masks given,
this is mergekit's `merge_group` line for line, on a chunk instead of a whole tensor: every
operation is elementwise or a reduction across models, so the result of an element does not
depend on the chunk it came in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def generalized_task_arithmetic(
    xs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    keep: Sequence[torch.Tensor | None] | None = None,
    rescale: Sequence[float | None] | None = None,
    factors: Sequence[torch.Tensor | None] | None = None,
    consensus: bool = False,
    normalize: bool = False,
    lam: float = 1.0,
) -> torch.Tensor:
    """Merge fp32 chunks: `base + lam * combine(w_i * sparsify(x_i - base))`.

    Args:
        xs: fp32 chunks, the base first.
        weights: one per non-base model.
        keep: per model, a bool mask of the delta elements kept (None: all kept).
        rescale: per model, a divisor applied to kept deltas (DARE's 1 - p), or None.
        factors: per model, a multiplier of the masked delta (mergekit's L1 rescale), or None.
        consensus: TIES sign election (mergekit's `sum` consensus) and disjoint mean.
        normalize: divide by the sum of the weights (of the agreeing models with consensus).
        lam: mergekit's `lambda`, applied after normalisation.
    """
    base = xs[0]
    n = len(xs) - 1
    if n == 0:
        return base.clone()
    deltas = torch.empty((n, base.numel()), dtype=torch.float32)
    for i, x in enumerate(xs[1:]):
        torch.sub(x, base, out=deltas[i])
        if keep is not None and keep[i] is not None:
            deltas[i] = deltas[i] * keep[i].to(torch.float32)
        if rescale is not None and rescale[i] is not None:
            deltas[i] = deltas[i] / torch.tensor(rescale[i], dtype=torch.float32)
        if factors is not None and factors[i] is not None:
            deltas[i] = deltas[i] * factors[i]
    w = torch.tensor(list(weights), dtype=torch.float32).unsqueeze(-1)
    deltas.mul_(w)
    if consensus:
        sign = deltas.sign()
        majority = (_sum_models(deltas) >= 0).to(torch.float32) * 2 - 1
        mask = sign == majority
        mixed = _sum_models(deltas * mask)
        divisor = _sum_models(w * mask)
        divisor[divisor == 0] = 1
    else:
        mixed = _sum_models(deltas)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return base + mixed


def _sum_models(rows: torch.Tensor) -> torch.Tensor:
    """Sum over the models (dim 0) from +0.0, in model order.

    Not `rows.sum(dim=0)`: torch picks its reduction order by shape (measured: with 7 models
    and fewer than ~64k elements per chunk it is not row by row), so the bytes of a merge would
    depend on the chunk size, and the GPU kernel could not follow it. In order from +0.0 is
    what torch does for large tensors (mergekit's case) and what the GPU kernel does.
    """
    acc = torch.zeros(rows.shape[1:], dtype=rows.dtype)
    for row in rows:
        acc += row
    return acc


def task_arithmetic(
    xs: Sequence[torch.Tensor], params: Mapping[str, Any], statistics: Any = None, element_start: int = 0
) -> torch.Tensor:
    """`params`: weights, normalize (default False), lambda (default 1)."""
    return generalized_task_arithmetic(
        xs, params["weights"], normalize=params.get("normalize", False), lam=params.get("lambda", 1.0)
    )
