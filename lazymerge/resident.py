"""Inputs kept in (device) memory, so that a model in memory re-merges without reading a file.

A weight search re-merges the same inputs many times. When both inputs fit in GPU memory next to
the model, `ResidentInputs` copies the byte ranges a plan reads onto the device once; each
re-merge is then one fused kernel launch per segment (`lazymerge.kernels.triton.linear_combine`
on CUDA, or the torch reference kernel on the CPU), writing straight into the parameters. The
arithmetic is the streaming path's (same kernels, same contract), so the bytes are identical.

Only weighted-sum plans (linear, task arithmetic, DogeRM) qualify: methods with statistics or
randomness (TIES, DARE...) stream as usual (`supports`).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from lazymerge._platform import pread_into, usable_cpu_count
from lazymerge.constants import DTYPE_SIZES, MERGEABLE_DTYPES
from lazymerge.errors import HeaderError
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.kernels import torch as torch_kernels
from lazymerge.kernels.torch import TORCH_DTYPES
from lazymerge.methods import get as get_method
from lazymerge.plan import MergePlan, Source

__all__ = ["ResidentInputs", "fits_on_device", "supports"]

_ALIGN = 64  # ranges start on this byte boundary so that every typed view is aligned
_PIECE = 64 << 20  # host staging piece when filling device memory
# Elements per block of the CPU re-merge: each torch operation splits a block between the
# intra-op threads the same way, so every thread's share of the fp32 scratch stays in its cache
# across the block's six passes (1B pair, 2 cores: 0.34-0.37 ns an element at 1-2 Mi against
# 0.43-0.47 for 2 Mi pieces on two Python threads, whose GIL hand-offs cost more than they save).
_CPU_BLOCK = 1 << 20


def supports(plan: MergePlan) -> bool:
    """Whether every tensor of `plan` is a weighted sum of mergeable inputs (or a byte copy)."""
    for t in plan.tensors:
        if not t.weighted_sum:
            return False
        for seg in t.segments:
            if not t.segment_is_copy(seg) and any(s.dtype not in MERGEABLE_DTYPES for s in seg.sources):
                return False
    return True


def input_ranges(plan: MergePlan) -> dict[tuple[int, str], list[tuple[int, int]]]:
    """The byte ranges `plan` reads from each input file, merged where they touch."""
    spans: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for t in plan.tensors:
        for seg in t.segments:
            for s in seg.sources:
                spans.setdefault((s.checkpoint, s.file), []).append(
                    (s.offset, s.offset + seg.count * DTYPE_SIZES[s.dtype])
                )
    merged: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for key, ranges in spans.items():
        out: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges):
            lo -= lo % _ALIGN
            if out and lo <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], hi))
            else:
                out.append((lo, hi))
        merged[key] = out
    return merged


def fits_on_device(plan: MergePlan, device: torch.device, margin: float = 0.9) -> bool:
    """Whether the input ranges of `plan` fit in the device's free memory (CUDA only)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    need = sum(hi - lo for ranges in input_ranges(plan).values() for lo, hi in ranges)
    return need < margin * free


class ResidentInputs:
    """The input bytes of a weighted-sum plan, held on `device`, and re-merges from them."""

    def __init__(
        self,
        checkpoints: Sequence[Checkpoint],
        device: torch.device | str,
        kernel: str | None = None,
        workers: int | None = None,
    ) -> None:
        """`kernel`: "triton" (the fused kernel; CUDA, or CPU under TRITON_INTERPRET=1) or "torch"
        (the reference kernel, CPU only); default triton on CUDA, torch on the CPU. `workers`:
        CPU threads of the torch kernel (default: the cores)."""
        self.checkpoints = checkpoints
        self.device = torch.device(device)
        self.kernel = kernel or ("triton" if self.device.type == "cuda" else "torch")
        self.ranges: dict[tuple[int, str], list[tuple[int, int, torch.Tensor]]] = {}
        self.nbytes = 0
        self.workers = max(1, workers or usable_cpu_count())

    def load(self, plan: MergePlan) -> None:
        """Copy the ranges `plan` reads that are not resident yet (a plan at weight 0 or 1 reads
        one model only; the next weight needs the other)."""
        for key, ranges in input_ranges(plan).items():
            have = self.ranges.setdefault(key, [])
            for lo, hi in ranges:
                if self._find(key, lo, hi - lo) is None:
                    have.append((lo, hi, self._read(key, lo, hi)))
                    have.sort(key=lambda r: r[0])

    def _find(self, key: tuple[int, str], offset: int, nbytes: int) -> torch.Tensor | None:
        have = self.ranges.get(key, [])
        for i in range(bisect.bisect_right([r[0] for r in have], offset) - 1, -1, -1):
            lo, hi, data = have[i]
            if offset + nbytes <= hi:
                return data[offset - lo : offset - lo + nbytes]
        return None

    def _read(self, key: tuple[int, str], lo: int, hi: int) -> torch.Tensor:
        checkpoint, file = key
        path = self.checkpoints[checkpoint].local_file(file)
        data = torch.empty(hi - lo, dtype=torch.uint8, device=self.device)
        fd = os.open(path, os.O_RDONLY)
        try:
            if self.device.type == "cpu":
                _pread_all(fd, data, lo, path)
            else:  # through a host piece: device memory cannot be a read(2) target
                host = torch.empty(min(_PIECE, hi - lo), dtype=torch.uint8)
                for start in range(0, hi - lo, _PIECE):
                    n = min(_PIECE, hi - lo - start)
                    _pread_all(fd, host[:n], lo + start, path)
                    data[start : start + n].copy_(host[:n])
        finally:
            os.close(fd)
        self.nbytes += hi - lo
        return data

    def merge_into(self, plan: MergePlan, targets: Mapping[str, torch.Tensor]) -> None:
        """Fill `targets` with `plan`'s merge from the resident bytes (`load(plan)` first)."""
        self.load(plan)
        cpu = _CpuMerge(self.workers) if self.kernel != "triton" else None
        previous = torch.get_num_threads()
        if cpu is not None:
            torch.set_num_threads(self.workers)
        try:
            self._merge_into(plan, targets, cpu)
        finally:
            torch.set_num_threads(previous)
            if cpu is not None:
                cpu.close()

    def _merge_into(self, plan: MergePlan, targets: Mapping[str, torch.Tensor], cpu: _CpuMerge | None) -> None:
        from lazymerge.kernels import triton as triton_kernels

        for t in plan.tensors:
            target = targets.get(t.name)
            if target is None or not t.numel:
                continue
            out_bytes = target.detach().reshape(-1).view(torch.uint8)
            size = DTYPE_SIZES[t.dtype]
            for seg in t.segments:
                out = out_bytes[seg.start * size : (seg.start + seg.count) * size]
                if t.segment_is_copy(seg):
                    out.copy_(self._bytes(seg.sources[0], seg.count))
                    continue
                xs = [self._typed(s, seg.count) for s in seg.sources]
                weights = [s.weight for s in seg.sources]
                y = out.view(TORCH_DTYPES[t.dtype])
                accumulation = get_method(t.method).accumulation
                if cpu is None:
                    triton_kernels.linear_combine(xs, weights, y, t.divisor, accumulation=accumulation)
                else:
                    cpu.run(xs, weights, y, t.divisor, accumulation)

    def _bytes(self, s: Source, count: int) -> torch.Tensor:
        data = self._find((s.checkpoint, s.file), s.offset, count * DTYPE_SIZES[s.dtype])
        if data is None:
            raise RuntimeError(f"input range {s.file}@{s.offset} is not resident")
        return data

    def _typed(self, s: Source, count: int) -> torch.Tensor:
        data = self._bytes(s, count)
        try:
            return data.view(TORCH_DTYPES[s.dtype])
        except RuntimeError:  # an input tensor at an offset that is not a multiple of its item size
            return data.clone().view(TORCH_DTYPES[s.dtype])

    def close(self) -> None:
        """Free the resident bytes."""
        self.ranges.clear()
        self.nbytes = 0


def _pread_all(fd: int, buf: torch.Tensor, offset: int, path: object) -> None:
    view = memoryview(buf.numpy())
    done = 0
    while done < len(view):
        n = pread_into(fd, view[done:], offset + done)
        if n == 0:
            raise HeaderError(path, "file ends before the tensor data its header promises: truncated?")
        done += n


class _CpuMerge:
    """The torch reference kernel on the CPU, one block at a time on `workers` intra-op threads.

    torch's intra-op threads spin at barriers when other threads want the cores (the streaming
    executor's workers are single-threaded for that reason), but a re-merge has the machine to
    itself: nothing else of ours runs while it fills the parameters.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.acc = torch.empty(_CPU_BLOCK, dtype=torch.float32)
        self.tmp = torch.empty(_CPU_BLOCK, dtype=torch.float32)
        self._pool: ThreadPoolExecutor | None = None

    def run(
        self, xs: list[torch.Tensor], weights: list[float], y: torch.Tensor, divisor: float | None, accumulation: str
    ) -> None:
        if accumulation == "rounded" or self.workers == 1:
            torch_kernels.linear_combine(
                xs, weights, y, divisor, acc=self.acc, tmp=self.tmp, accumulation=accumulation, block=_CPU_BLOCK
            )
            return
        # mergekit's fused accumulation runs on numpy (`kernels.torch._fused_on_numpy`), one
        # call per thread: split the segment between the workers (numpy releases the GIL).
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="lazymerge-remerge")
        step = -(-y.numel() // self.workers)
        pieces = [(a, min(a + step, y.numel())) for a in range(0, y.numel(), step)]
        jobs = [
            self._pool.submit(
                torch_kernels.linear_combine, [x[a:b] for x in xs], weights, y[a:b], divisor, accumulation=accumulation
            )
            for a, b in pieces
        ]
        for job in jobs:
            job.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
