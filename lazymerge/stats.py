"""Statistics passes: the inputs read ahead of the merge for methods that need statistics.

Some methods (TIES, DELLA, SLERP...) need statistics of a tensor, or of the whole model (global
TIES), before a chunk can be merged. `stats_passes` feeds a method's accumulator in fixed-size
chunks, pass after pass; `RunStats` keeps a run's statistics: model-wide ones computed before any
chunk, per-tensor ones when the reader first meets the tensor. `verify --recompute` uses the
same passes (`lazymerge.recompute`), so both compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from lazymerge import methods
from lazymerge.constants import DTYPE_SIZES
from lazymerge.kernels.backend import TORCH_DTYPES
from lazymerge.plan import ChunkTask, MergePlan, OutputTensor

if TYPE_CHECKING:
    from lazymerge.io.reader import InputReader

__all__ = ["RunStats", "stats_passes"]


def stats_passes(
    tensors: list[OutputTensor],
    acc: methods.StatsAccumulator,
    read: Callable[[int, str, int, torch.Tensor], None],
    bufs: list[torch.Tensor] | None = None,
) -> None:
    """Feed `acc` the tensors' chunks, pass after pass, in buffers of STATS_CHUNK elements.

    The chunking of these passes is fixed (not the run's chunk size), so statistics that are
    floating-point reductions do not depend on the run's settings.
    """
    step = methods.STATS_CHUNK
    bufs = [] if bufs is None else bufs
    while acc.needs_pass():
        for t in tensors:
            key = t.params.get("ordinal", 0)
            for seg in t.segments:
                for first in range(0, seg.count, step):
                    n = min(step, seg.count - first)
                    xs = []
                    for j, s in enumerate(seg.sources):
                        itemsize = DTYPE_SIZES[s.dtype]
                        while len(bufs) <= j:
                            bufs.append(torch.empty(step * 4, dtype=torch.uint8))
                        buf = bufs[j][: n * itemsize]
                        read(s.checkpoint, s.file, s.offset + first * itemsize, buf)
                        xs.append(buf.view(TORCH_DTYPES[s.dtype]).float())
                    acc.update(xs, seg.start + first, key)
        acc.end_pass()


class RunStats:
    """The statistics of one run's K plans, read through the run's `InputReader`."""

    def __init__(self, plans: list[MergePlan], reader: InputReader) -> None:
        self.plans = plans
        self.reader = reader
        self.by_name = [{t.name: t for t in p.tensors} for p in plans]
        # Statistics of methods that need them: [variant][tensor name] -> stats.
        self.stats: list[dict[str, object]] = [{} for _ in plans]
        self._stats_bufs: list[torch.Tensor] = []

    def global_stats(self) -> None:
        """Methods with model-wide statistics (global TIES) get them before any chunk is merged."""
        for k, plan in enumerate(self.plans):
            groups: dict[str, list[OutputTensor]] = {}
            for t in plan.tensors:
                if t.method != "linear" and t.segments:
                    method = methods.get(t.method)
                    if method.needs_stats and method.is_global(t.params):
                        groups.setdefault(t.method, []).append(t)
            for name, tensors in groups.items():
                tensors.sort(key=lambda t: t.params.get("ordinal", 0))
                acc = methods.get(name).new_stats(tensors[0].params, sum(t.numel for t in tensors))  # type: ignore[misc]
                self._stats_passes(tensors, acc)
                result = acc.result()
                for t in tensors:
                    self.stats[k][t.name] = result

    def _tensor_stats(self, k: int, name: str) -> object:
        """Per-tensor statistics, computed the first time the reader meets the tensor."""
        if name not in self.stats[k]:
            tensor = self.by_name[k][name]
            acc = methods.get(tensor.method).new_stats(tensor.params, tensor.numel)  # type: ignore[misc]
            self._stats_passes([tensor], acc)
            self.stats[k] = {name: acc.result()}  # the previous tensor's are no longer needed
        return self.stats[k][name]

    def _stats_passes(self, tensors: list[OutputTensor], acc: methods.StatsAccumulator) -> None:
        def read(checkpoint: int, file: str, offset: int, buf: torch.Tensor) -> None:
            # Pages stay cached: the merge pass reads them again right after.
            self.reader.read_into(checkpoint, file, offset, buf, drop=False)

        stats_passes(tensors, acc, read, self._stats_bufs)

    def with_stats(self, k: int, task: ChunkTask) -> ChunkTask:
        """`task` of plan `k`, with its method's statistics where the method needs them."""
        if task.method == "linear" or task.copy or not methods.get(task.method).needs_stats:
            return task
        return replace(task, stats=self._tensor_stats(k, task.tensor))
