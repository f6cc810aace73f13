"""Merge methods: small pure functions on 1-D fp32 chunks, each declared once by name.

A method turns the chunks of its inputs (the base model first, then the other models, as
`OutputTensor.segments` lists them) into the merged chunk. It sees one chunk at a time plus:
`params` (per-tensor parameters resolved by the planner from the declaration: weights,
density, lambda, t...), `element_start` (the index of the chunk's first element in the tensor,
for counter-based randomness) and `statistics` (what its statistics passes computed over the
whole tensor, or over the whole model for a global method). A method that needs statistics
declares a factory of `StatisticsAccumulator`s, which the executor feeds with the tensor's
chunks, pass after pass, in bounded memory. Every method is elementwise given its statistics,
so the bytes never depend on the chunk size.

This package and its declarations are torch-free (planning runs before torch is imported); the
family modules (`ties`, `dare`, `slerp`...) hold the torch arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from lazymerge.methods.declaration import ACCUMULATIONS, REQUIRED, GpuKernel, MergeMethod, Parameter, Range, check_value
from lazymerge.methods.registry import METHODS

if TYPE_CHECKING:
    import torch

__all__ = [
    "ACCUMULATIONS",
    "REQUIRED",
    "STATISTICS_CHUNK",
    "GpuKernel",
    "MergeMethod",
    "Parameter",
    "Range",
    "StatisticsAccumulator",
    "check_value",
    "get",
    "names",
]

# Elements per chunk of a statistics pass: fixed (not the run's chunk size) so that statistics
# that are floating-point reductions do not depend on run settings; mergekit's SLERP chunking.
STATISTICS_CHUNK = 1 << 20


class StatisticsAccumulator(Protocol):
    """Streaming statistics of one tensor (or of a whole model for a global method)."""

    def needs_pass(self) -> bool:
        """True while another pass over the chunks is needed."""

    def update(self, xs: Sequence[torch.Tensor], element_start: int, key: int = 0) -> None:
        """Feed one chunk (fp32, one per input, in source order); `key` orders tensors (global)."""

    def end_pass(self) -> None:
        """The pass over every chunk is complete."""

    def result(self) -> Any:
        """The statistics handed to the method's chunk function."""


def get(name: str) -> MergeMethod:
    """The declaration of method `name`.

    Raises:
        KeyError: no method has that name.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(names())}") from None


def names() -> list[str]:
    """The name of every method a recipe may name, sorted (internal ones are left out)."""
    return sorted(n for n, m in METHODS.items() if not m.internal)
