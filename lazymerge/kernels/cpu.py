"""The CPU backend: the torch reference kernels, synchronously on the calling thread."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch

from lazymerge import methods
from lazymerge.kernels import torch as torch_kernels
from lazymerge.kernels.base import Backend, Handle
from lazymerge.kernels.torch import typed_inputs, typed_view
from lazymerge.plan import ChunkTask

__all__ = ["CpuBackend"]


class CpuBackend(Backend):
    """The torch reference kernel, synchronously on the calling thread."""

    name = "cpu"

    def __init__(self) -> None:
        # fp32 scratch reused across chunks so the hot loop allocates nothing; grown on demand.
        self._acc = torch.empty(0, dtype=torch.float32)
        self._tmp = torch.empty(0, dtype=torch.float32)

    def allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def submit(self, task: ChunkTask, inputs: Sequence[torch.Tensor], out: torch.Tensor) -> Handle:
        xs = typed_inputs(task, inputs)
        y = typed_view(out, task.count, task.out_dtype, "out")
        method = methods.get(task.method)
        if not method.weighted_sum:
            fp32 = [x if x.dtype == torch.float32 else x.float() for x in xs]
            y.copy_(method.combine(fp32, task.params or {}, task.statistics, task.element_start))
            return None
        # The weighted-sum fast path: the sources' weights, no fp32 copies of the inputs.
        if self._acc.numel() < task.count:
            self._acc = torch.empty(task.count, dtype=torch.float32)
            self._tmp = torch.empty(task.count, dtype=torch.float32)
        weights = [s.weight for s in task.sources]
        torch_kernels.linear_combine(
            xs, weights, y, task.divisor, acc=self._acc, tmp=self._tmp, accumulation=method.accumulation
        )
        return None

    def wait(self, handle: Handle) -> None:
        return None

    def run_scope(self) -> AbstractContextManager[object]:
        # The executor's workers are the parallelism (one per core: intra-op threads spin at
        # barriers on a busy machine), and some reductions (slerp's norms) take their order
        # from the thread count: one torch thread, as `verify --recompute` runs too.
        return torch_kernels.single_threaded()
