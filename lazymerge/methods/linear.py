"""linear: `sum(w_i * x_i)`, divided by `sum(w_i)` when normalizing (mergekit's `linear`).

The executor's fast path runs `lazymerge.kernels.torch.linear_combine` directly with the
weights carried by each Source; this chunk function is the same arithmetic on fp32 chunks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lazymerge.kernels.torch import linear_combine


def linear(xs: Sequence[torch.Tensor], params: Mapping[str, Any], stats: Any = None, element_start: int = 0):
    """`params`: weights (one per input), divisor (None: no normalisation)."""
    out = torch.empty_like(xs[0], dtype=torch.float32)
    return linear_combine(xs, params["weights"], out, params.get("divisor"))
