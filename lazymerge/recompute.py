"""One output tensor computed in memory, the way the executor computes it (`verify --recompute`).

Same chunk tasks, same statistics passes, same CPU kernels (numpy for weighted sums, torch
single-threaded like the executor's workers otherwise): the bytes must equal what the merge
wrote. Torch is imported only for a method that needs it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

from lazymerge import methods
from lazymerge._platform import open_flags, pread
from lazymerge.constants import DEFAULT_CHUNK_ELEMENTS, DTYPE_SIZES
from lazymerge.derived import fill_source
from lazymerge.errors import HeaderError
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.kernels.base import Buffer, host_bytes
from lazymerge.kernels.device import select_backend
from lazymerge.plan import ChunkTask, MergePlan, OutputTensor, iter_chunks
from lazymerge.settings import cpu_kernels
from lazymerge.statistics import statistics_group, statistics_passes

__all__ = ["tensor_bytes"]


def tensor_bytes(plan: MergePlan, checkpoints: Sequence[Checkpoint], tensor: OutputTensor) -> bytes:
    """Compute one output tensor in memory (for `verify --recompute`): same tasks, same kernel."""
    out = bytearray(tensor.nbytes)
    base = tensor.offset
    method = methods.get(tensor.method) if tensor.segments else None
    # numpy and torch give the same bytes for a weighted sum; numpy spares the torch import.
    numpy_ok = method is None or (method.weighted_sum and cpu_kernels() != "torch")
    backend, _ = select_backend("cpu", numpy_ok=numpy_ok)
    fds: dict[tuple[int, str], int] = {}

    def read(checkpoint: int, file: str, offset: int, buf: Buffer) -> None:
        key = (checkpoint, file)
        if key not in fds:
            fds[key] = os.open(checkpoints[checkpoint].local_file(file), open_flags(os.O_RDONLY))
        view = host_bytes(buf)
        data = pread(fds[key], len(view), offset)
        if len(data) != len(view):
            path = checkpoints[checkpoint].local_file(file)
            raise HeaderError(path, "file ends before the tensor data its header promises: truncated?")
        view[:] = data

    try:
        with backend.run_scope():  # torch single-threaded, as in the merge's workers
            statistics = None
            if method is not None and method.needs_statistics:
                group = statistics_group(plan, tensor)
                acc = method.new_statistics(group[0].params, sum(t.numel for t in group))
                statistics_passes(group, acc, read)
                statistics = acc.result()
            for task in _tensor_tasks(plan, tensor):
                if statistics is not None:
                    task = replace(task, statistics=statistics)
                buffers = []
                for s in task.sources:
                    buf = backend.allocate(task.count * DTYPE_SIZES[s.dtype])
                    fill_source(read, s, task.count, buf)
                    buffers.append(buf)
                start = task.out_offset - base
                if task.copy:
                    out[start : start + task.out_nbytes] = host_bytes(buffers[0])[: task.out_nbytes]
                    continue
                result = backend.allocate(task.out_nbytes)
                backend.submit(task, buffers, result)
                out[start : start + task.out_nbytes] = host_bytes(result)
    finally:
        for fd in fds.values():
            os.close(fd)
    return bytes(out)


def _tensor_tasks(plan: MergePlan, tensor: OutputTensor) -> list[ChunkTask]:
    end = tensor.offset + tensor.nbytes
    return [
        t
        for t in iter_chunks(plan, DEFAULT_CHUNK_ELEMENTS, [tensor.shard])
        if isinstance(t, ChunkTask) and tensor.offset <= t.out_offset < end
    ]
