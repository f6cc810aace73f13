"""Statistics passes: the inputs read ahead of the merge for methods that need statistics.

Some methods (TIES, DELLA, SLERP...) need statistics of a tensor, or of the whole model (global
TIES), before a chunk can be merged. `statistics_passes` feeds a method's accumulator in
fixed-size chunks, pass after pass; `RunStatistics` keeps a run's statistics: model-wide ones
computed before any chunk, per-tensor ones when the reader first meets the tensor.
`verify --recompute` uses the same passes (`lazymerge.recompute`), so both compute the same
numbers. ("Statistics" here always means these; a run's figures are `execute.MergeStats`.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from lazymerge import methods
from lazymerge.constants import DTYPE_SIZES
from lazymerge.derived import fill_source
from lazymerge.kernels.base import TORCH_DTYPES
from lazymerge.plan import ChunkTask, MergePlan, OutputTensor

if TYPE_CHECKING:
    from lazymerge.io.reader import InputReader

__all__ = ["RunStatistics", "statistics_group", "statistics_passes"]


def statistics_passes(
    tensors: list[OutputTensor],
    acc: methods.StatisticsAccumulator,
    read: Callable[[int, str, int, torch.Tensor], None],
    bufs: list[torch.Tensor] | None = None,
) -> None:
    """Feed `acc` the tensors' chunks, pass after pass, in buffers of STATISTICS_CHUNK elements.

    The chunking of these passes is fixed (not the run's chunk size), so statistics that are
    floating-point reductions do not depend on the run's settings.
    """
    step = methods.STATISTICS_CHUNK
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
                        fill_source(read, s.shifted(first), n, buf)
                        xs.append(buf.view(TORCH_DTYPES[s.dtype]).float())
                    acc.update(xs, seg.start + first, key)
        acc.end_pass()


class RunStatistics:
    """The statistics of one run's K plans, read through the run's `InputReader`."""

    def __init__(self, plans: list[MergePlan], reader: InputReader) -> None:
        self.plans = plans
        self.reader = reader
        self.by_name = [{t.name: t for t in p.tensors} for p in plans]
        # Statistics of methods that need them: [variant][tensor name] -> statistics.
        self.results: list[dict[str, object]] = [{} for _ in plans]
        self._bufs: list[torch.Tensor] = []

    def global_statistics(self) -> None:
        """Methods with model-wide statistics (global TIES) get them before any chunk is merged."""
        for k, plan in enumerate(self.plans):
            done: set[str] = set()
            for t in plan.tensors:
                method = methods.get(t.method)
                if t.segments and method.needs_statistics and method.is_global(t.params) and t.name not in done:
                    tensors = statistics_group(plan, t)
                    acc = method.new_statistics(tensors[0].params, sum(x.numel for x in tensors))
                    self._passes(tensors, acc)
                    result = acc.result()
                    for x in tensors:
                        self.results[k][x.name] = result
                        done.add(x.name)

    def _tensor_statistics(self, k: int, name: str) -> object:
        """Per-tensor statistics, computed the first time the reader meets the tensor."""
        if name not in self.results[k]:
            tensor = self.by_name[k][name]
            acc = methods.get(tensor.method).new_statistics(tensor.params, tensor.numel)
            self._passes([tensor], acc)
            self.results[k] = {name: acc.result()}  # the previous tensor's are no longer needed
        return self.results[k][name]

    def _passes(self, tensors: list[OutputTensor], acc: methods.StatisticsAccumulator) -> None:
        def read(checkpoint: int, file: str, offset: int, buf: torch.Tensor) -> None:
            # Pages stay cached: the merge pass reads them again right after.
            self.reader.read_into(checkpoint, file, offset, buf, drop=False)

        statistics_passes(tensors, acc, read, self._bufs)

    def with_statistics(self, k: int, task: ChunkTask) -> ChunkTask:
        """`task` of plan `k`, with its method's statistics where the method needs them."""
        if task.copy or not methods.get(task.method).needs_statistics:
            return task
        return replace(task, statistics=self._tensor_statistics(k, task.tensor))


def statistics_group(plan: MergePlan, tensor: OutputTensor) -> list[OutputTensor]:
    """The tensors whose chunks feed `tensor`'s statistics: itself, or for a global method every
    tensor of that method in the plan, in ordinal order (the order the passes key them by)."""
    method = methods.get(tensor.method)
    if not method.is_global(tensor.params):
        return [tensor]
    return sorted(
        (t for t in plan.tensors if t.method == tensor.method and t.segments and method.is_global(t.params)),
        key=lambda t: t.params.get("ordinal", 0),
    )
