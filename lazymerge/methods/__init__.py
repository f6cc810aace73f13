"""Merge methods: small pure functions on 1-D fp32 chunks, registered by name.

A method turns the chunks of its inputs (the base model first, then the other models, as
`OutputTensor.segments` lists them) into the merged chunk. It sees one chunk at a time plus:
`params` (per-tensor parameters resolved by the planner: weights, density, lambda, t...),
`element_start` (the index of the chunk's first element in the tensor, for counter-based
randomness) and `stats` (what its statistics pass computed over the whole tensor, or over the
whole model for a global method). A method that needs statistics declares `new_stats`, an
accumulator the executor feeds with the tensor's chunks, pass after pass, in bounded memory.
Every method is elementwise given its stats, so the bytes never depend on the chunk size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["STATS_CHUNK", "MergeMethod", "StatsAccumulator", "get", "names", "register"]

# Elements per chunk of a statistics pass: fixed (not the run's chunk size) so that statistics
# that are floating-point reductions do not depend on run settings; mergekit's SLERP chunking.
STATS_CHUNK = 1 << 20


class StatsAccumulator(Protocol):
    """Streaming statistics of one tensor (or of a whole model for a global method)."""

    def needs_pass(self) -> bool:
        """True while another pass over the chunks is needed."""

    def update(self, xs: Sequence[torch.Tensor], element_start: int, key: int = 0) -> None:
        """Feed one chunk (fp32, one per input, in source order); `key` orders tensors (global)."""

    def end_pass(self) -> None:
        """The pass over every chunk is complete."""

    def result(self) -> Any:
        """The statistics handed to the method's chunk function."""


Combine = Callable[[Sequence[torch.Tensor], Mapping[str, Any], Any, int], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: `combine(xs, params, stats, element_start) -> fp32 chunk`."""

    name: str
    reference_url: str
    combine: Combine
    new_stats: Callable[[Mapping[str, Any], int], StatsAccumulator] | None = None
    # A global method's statistics span every tensor that uses it: new_stats(params, numel) is
    # then called once per model, with the parameters of the first such tensor.
    is_global: Callable[[Mapping[str, Any]], bool] = lambda params: False

    @property
    def needs_stats(self) -> bool:
        return self.new_stats is not None


_REGISTRY: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    reference_url: str,
    new_stats: Callable[[Mapping[str, Any], int], StatsAccumulator] | None = None,
    is_global: Callable[[Mapping[str, Any]], bool] | None = None,
) -> Callable[[Combine], Combine]:
    """Decorator: register a chunk function under `name` (mergekit's method name)."""

    def wrap(fn: Combine) -> Combine:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered")
        _REGISTRY[name] = MergeMethod(name, reference_url, fn, new_stats, is_global or (lambda params: False))
        return fn

    return wrap


def get(name: str) -> MergeMethod:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(names())}") from None


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def _load() -> None:
    # The families register themselves on import; late, so `plan` stays torch-free.
    from lazymerge.methods import dare, della, linear, model_stock, multislerp, slerp, task_arithmetic, ties  # noqa: F401
