"""linear: `sum(w_i * x_i)`, divided by `sum(w_i)` when normalizing (mergekit's `linear`).

Declared as a weighted-sum method (`lazymerge.methods.registry`): the planner lowers it to
weighted sources and a divisor, and the backends run it on their weighted-sum fast path
(`lazymerge.kernels.torch.linear_combine`, or the Triton kernel on a GPU) with the weights each
Source carries, accumulating as the declaration says (`accumulation="fused"`: mergekit's
`addcmul_`). These chunk functions are the same arithmetic on fp32 chunks, for callers that
hold the weights in `params`: `linear` for the recipe method, `weighted_sum` for the internal one
(DogeRM, copies), whose product and sum are rounded apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lazymerge.kernels.torch import linear_combine


def linear(
    xs: Sequence[torch.Tensor], params: Mapping[str, Any], statistics: Any = None, element_start: int = 0
) -> torch.Tensor:
    """mergekit's `linear`, fused accumulation. `params`: weights (one per input), divisor (None:
    no normalisation)."""
    out = torch.empty_like(xs[0], dtype=torch.float32)
    return linear_combine(xs, params["weights"], out, params.get("divisor"), accumulation="fused")


def weighted_sum(
    xs: Sequence[torch.Tensor], params: Mapping[str, Any], statistics: Any = None, element_start: int = 0
) -> torch.Tensor:
    """The internal weighted sum (DogeRM, copies): product and sum rounded apart."""
    out = torch.empty_like(xs[0], dtype=torch.float32)
    return linear_combine(xs, params["weights"], out, params.get("divisor"))
