"""Filling a chunk's input buffer from a Source, derived rows included.

A plain Source is one positional read. A derived one (mergekit's vocabulary fallbacks, planned by
`lazymerge.recipes.tokenizer_union`) is a zero row, or the mean of other models' rows computed
as mergekit's `PermutedVocabulary` does: zeros, plus each row in order, divided by their count,
in the source's dtype. Such rows are one embedding row each, so their reads stay small.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lazymerge.constants import DTYPE_SIZES
from lazymerge.kernels.base import TORCH_DTYPES
from lazymerge.plan import Source

__all__ = ["fill_source"]


def fill_source(
    read: Callable[[int, str, int, torch.Tensor], None], source: Source, count: int, buf: torch.Tensor
) -> None:
    """Put `count` elements of `source` at the start of the uint8 buffer `buf`.

    `read(checkpoint, file, offset, view)` fills `view` with the bytes at `offset`."""
    nbytes = count * DTYPE_SIZES[source.dtype]
    if not source.derived:
        read(source.checkpoint, source.file, source.offset, buf[:nbytes])
        return
    out = buf[:nbytes].view(TORCH_DTYPES[source.dtype])
    out.zero_()
    if source.derived == "zero":
        return
    if source.derived != "mean" or not source.parts:
        raise ValueError(f"unknown derived source {source.derived!r}")
    for part in source.parts:
        tmp = torch.empty(count * DTYPE_SIZES[part.dtype], dtype=torch.uint8)
        read(part.checkpoint, part.file, part.offset, tmp)
        out.add_(tmp.view(TORCH_DTYPES[part.dtype]))
    out.div_(len(source.parts))
