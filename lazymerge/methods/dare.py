"""DARE (drop and rescale): dare_linear and dare_ties.

Each delta element is kept with probability `density` (= 1 - p) and, with `rescale` (the
default), divided by `density`, as in the DARE paper. The keep decision comes from a
counter-based generator keyed by (seed, tensor name, model, element index): splitmix64 of the
key, so the mask is the same whatever the chunk size, thread count or device, and a tensor's
mask does not depend on the other tensors. (mergekit draws from torch's global generator and
rescales by the L1 norm ratio instead: a different random draw by construction.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lazymerge.methods.task_arithmetic import generalized_task_arithmetic

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    # splitmix64's finalizer: a bijection on 64-bit words with full avalanche.
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def stream_key(seed: int, tensor: str, model: int, salt: str = "") -> int:
    """The 64-bit key of one (seed, tensor name, model) mask; `salt` separates methods' streams."""
    text = f"{seed}\0{tensor}\0{model}" + (f"\0{salt}" if salt else "")
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def uniform53(seed: int, tensor: str, model: int, element_start: int, count: int, salt: str = "") -> np.ndarray:
    """53-bit uniform integers (uint64) for elements [element_start, element_start + count)."""
    with np.errstate(over="ignore"):
        idx = np.arange(element_start, element_start + count, dtype=np.uint64)
        z = _mix(idx * _GOLDEN + np.uint64(stream_key(seed, tensor, model, salt)))
    return z >> np.uint64(11)


def keep_mask(seed: int, tensor: str, model: int, element_start: int, count: int, density: float) -> torch.Tensor:
    """Bool mask of kept elements [element_start, element_start + count) of a tensor's delta.

    Element e is kept iff its 53-bit uniform draw is below density * 2**53: probability
    `density` exactly (to 2**-53).
    """
    if density >= 1:
        return torch.ones(count, dtype=torch.bool)
    if density <= 0:
        return torch.zeros(count, dtype=torch.bool)
    limit = np.uint64(int(density * (1 << 53)))
    return torch.from_numpy(uniform53(seed, tensor, model, element_start, count) < limit)


def _dare(xs: Sequence[torch.Tensor], params: Mapping[str, Any], element_start: int, consensus: bool) -> torch.Tensor:
    count = xs[0].numel()
    seed, name = params.get("seed", 0), params["tensor"]
    densities = params["densities"]
    keep = [keep_mask(seed, name, i + 1, element_start, count, d) for i, d in enumerate(densities)]
    rescale = [d if (params.get("rescale", True) and 0 < d < 1) else None for d in densities]
    return generalized_task_arithmetic(
        xs,
        params["weights"],
        keep=keep,
        rescale=rescale,
        consensus=consensus,
        normalize=params.get("normalize", False),
        lam=params.get("lambda", 1.0),
    )


def dare_linear(
    xs: Sequence[torch.Tensor], params: Mapping[str, Any], statistics: Any = None, element_start: int = 0
) -> torch.Tensor:
    """`params`: tensor (name), weights, densities, seed, rescale (default True), normalize, lambda."""
    return _dare(xs, params, element_start, consensus=False)


def dare_ties(
    xs: Sequence[torch.Tensor], params: Mapping[str, Any], statistics: Any = None, element_start: int = 0
) -> torch.Tensor:
    """DARE dropping, then TIES sign election and disjoint mean."""
    return _dare(xs, params, element_start, consensus=True)
