"""One output tensor computed in memory, the way the executor computes it (`verify --recompute`).

Same chunk tasks, same statistics passes, same CPU kernel, torch single-threaded like the
executor's workers: the bytes must equal what the merge wrote.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import torch

from lazymerge import methods
from lazymerge._platform import open_flags, pread
from lazymerge.constants import DEFAULT_CHUNK_ELEMENTS, DTYPE_SIZES
from lazymerge.derived import fill_source
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.kernels.cpu import CpuBackend
from lazymerge.plan import ChunkTask, MergePlan, OutputTensor, iter_chunks
from lazymerge.statistics import statistics_group, statistics_passes

__all__ = ["tensor_bytes"]


def tensor_bytes(plan: MergePlan, checkpoints: Sequence[Checkpoint], tensor: OutputTensor) -> bytes:
    """Compute one output tensor in memory (for `verify --recompute`): same tasks, same kernel."""
    out = bytearray(tensor.nbytes)
    base = tensor.offset
    backend = CpuBackend()
    fds: dict[tuple[int, str], int] = {}

    def read(checkpoint: int, file: str, offset: int, buf: torch.Tensor) -> None:
        key = (checkpoint, file)
        if key not in fds:
            fds[key] = os.open(checkpoints[checkpoint].local_file(file), open_flags(os.O_RDONLY))
        data = pread(fds[key], buf.numel(), offset)
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    # The merge's workers run torch single-threaded, and some reductions (slerp's norms above
    # 32k elements) take their order from the thread count: recompute the same way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        statistics = None
        if tensor.segments and (method := methods.get(tensor.method)).needs_statistics:
            group = statistics_group(plan, tensor)
            acc = method.new_statistics(group[0].params, sum(t.numel for t in group))
            statistics_passes(group, acc, read)
            statistics = acc.result()
        for task in _tensor_tasks(plan, tensor):
            if statistics is not None:
                task = replace(task, statistics=statistics)
            buffers = []
            for s in task.sources:
                buf = torch.empty(task.count * DTYPE_SIZES[s.dtype], dtype=torch.uint8)
                fill_source(read, s, task.count, buf)
                buffers.append(buf)
            start = task.out_offset - base
            if task.copy:
                out[start : start + task.out_nbytes] = buffers[0].numpy().tobytes()
                continue
            result = torch.empty(task.out_nbytes, dtype=torch.uint8)
            backend.submit(task, buffers, result)
            out[start : start + task.out_nbytes] = result.numpy().tobytes()
    finally:
        torch.set_num_threads(threads)
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
