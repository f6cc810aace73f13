"""Run a MergePlan: read chunk -> merge chunk -> write chunk, in three overlapping stages.

A reader thread fills buffers from the inputs (positional reads, in plan order), the calling
thread merges them (torch releases the GIL), and a writer thread writes each result at its
offset. A fixed pool of buffer slots bounds memory: peak RSS depends on the chunk size and the
number of inputs, never on a tensor, shard or model size. The library never prints; progress
goes to a callback.
"""

from __future__ import annotations

import os
import queue
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lazymerge.constants import DEFAULT_CHUNK_ELEMENTS, DTYPE_SIZES
from lazymerge.errors import HeaderError, LazyMergeError, OutputError
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.io.writer import ShardWriter, write_side_file
from lazymerge.kernels import torch as torch_kernels
from lazymerge.plan import ChunkTask, MergePlan, iter_chunks

__all__ = ["MergeStats", "ProgressEvent", "execute"]

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_SLOTS = 3  # one being read, one being merged, one being written
_DONE = object()


@dataclass(frozen=True)
class ProgressEvent:
    """What the executor reports. `kind` is "start", "chunk", "shard" (a shard closed) or "done"."""

    kind: str
    shard: str
    bytes_written: int
    total_bytes: int
    bytes_read: int
    path: Path | None = None


@dataclass
class MergeStats:
    """A finished run: counts, sizes, time, memory, and where the files are."""

    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    device: str
    files: list[Path] = field(default_factory=list)


class _Slot:
    """Reusable byte buffers for one chunk in flight: one per input, one for the output."""

    def __init__(self, chunk_elements: int) -> None:
        self.capacity = chunk_elements * 4  # the widest mergeable dtype is 4 bytes
        self.inputs: list[torch.Tensor] = []
        self.out = torch.empty(self.capacity, dtype=torch.uint8)

    def input(self, i: int) -> torch.Tensor:
        while len(self.inputs) <= i:
            self.inputs.append(torch.empty(self.capacity, dtype=torch.uint8))
        return self.inputs[i]


def execute(
    plan: MergePlan,
    checkpoints: Sequence[Checkpoint],
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> MergeStats:
    """Write the merged model described by `plan` into `plan.output_dir`.

    Args:
        plan: from `lazymerge.plan(...)` or a recipe's planner.
        checkpoints: the opened inputs, in `plan.inputs` order.
        chunk_elements: elements per chunk; bounds memory (about 3 x inputs x 4 bytes each).
        progress: called with a ProgressEvent after every chunk and when each shard closes.

    Returns:
        MergeStats of the run.
    """
    start = time.perf_counter()
    out_dir = plan.output_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out_dir}: {exc.strerror}") from exc
    # Side files first: none of them makes the folder look like a finished model; the index does,
    # so it goes last.
    for name, data in plan.side_files.items():
        if not name.endswith(".index.json"):
            write_side_file(out_dir, name, data)
    run = _Run(plan, checkpoints, chunk_elements, progress)
    files = run.go()
    for name, data in plan.side_files.items():
        if name.endswith(".index.json"):
            files.append(write_side_file(out_dir, name, data))
    if progress:
        progress(ProgressEvent("done", "", run.bytes_written, run.total_bytes, run.bytes_read))
    return MergeStats(
        tensors=len(plan.tensors),
        bytes_read=run.bytes_read,
        bytes_written=run.bytes_written,
        seconds=time.perf_counter() - start,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        device="cpu",
        files=files,
    )


class _Run:
    """One execution: the three stages and their shared state."""

    def __init__(
        self,
        plan: MergePlan,
        checkpoints: Sequence[Checkpoint],
        chunk_elements: int,
        progress: Callable[[ProgressEvent], None] | None,
    ) -> None:
        self.plan = plan
        self.checkpoints = checkpoints
        self.chunk_elements = chunk_elements
        self.progress = progress
        self.tasks = list(iter_chunks(plan, chunk_elements))
        self.total_bytes = sum(s.size for s in plan.shards)
        self.bytes_read = 0
        self.bytes_written = 0
        self.free_slots: queue.Queue[_Slot] = queue.Queue()
        for _ in range(_SLOTS):
            self.free_slots.put(_Slot(chunk_elements))
        self.to_compute: queue.Queue = queue.Queue(maxsize=_SLOTS)
        self.to_write: queue.Queue = queue.Queue(maxsize=_SLOTS)
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self.fds: dict[tuple[int, str], int] = {}
        self.last_use = self._last_uses()
        self.acc = torch.empty(chunk_elements, dtype=torch.float32)
        self.tmp = torch.empty(chunk_elements, dtype=torch.float32)
        self.files: list[Path] = []

    def _last_uses(self) -> dict[tuple[int, str], int]:
        last: dict[tuple[int, str], int] = {}
        for i, task in enumerate(self.tasks):
            if isinstance(task, ChunkTask):
                for s in task.sources:
                    last[(s.checkpoint, s.file)] = i
        return last

    def go(self) -> list[Path]:
        reader = threading.Thread(target=self._guard, args=(self._read_stage,), name="lazymerge-read", daemon=True)
        writer = threading.Thread(target=self._guard, args=(self._write_stage,), name="lazymerge-write", daemon=True)
        reader.start()
        writer.start()
        try:
            self._compute_stage()
        except BaseException as exc:
            self._fail(exc)
        finally:
            self.to_write.put(_DONE)
            writer.join()
            self.failed.set()  # unblock the reader if it is still going
            _drain(self.to_compute)
            reader.join()
            for fd in self.fds.values():
                os.close(fd)
        if self.errors:
            raise self.errors[0]
        return self.files

    def _guard(self, stage: Callable[[], None]) -> None:
        try:
            stage()
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.failed.set()

    # -- stage 1: read -------------------------------------------------------------------------
    def _read_stage(self) -> None:
        try:
            for i, task in enumerate(self.tasks):
                if self.failed.is_set():
                    return
                if not isinstance(task, ChunkTask) or task.copy:
                    self._put(self.to_compute, (i, task, None))
                    continue
                slot = self._get_slot()
                if slot is None:
                    return
                for j, src in enumerate(task.sources):
                    nbytes = task.count * DTYPE_SIZES[src.dtype]
                    self._read_into(src.checkpoint, src.file, src.offset, slot.input(j)[:nbytes])
                    self._release_if_done(src.checkpoint, src.file, i)
                self._put(self.to_compute, (i, task, slot))
        finally:
            self._put(self.to_compute, _DONE, force=True)

    def _get_slot(self) -> _Slot | None:
        while not self.failed.is_set():
            try:
                return self.free_slots.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _put(self, q: queue.Queue, item: object, force: bool = False) -> None:
        while True:
            if self.failed.is_set() and not force:
                return
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                if self.failed.is_set() and force:
                    return

    def fd(self, checkpoint: int, file: str) -> int:
        key = (checkpoint, file)
        fd = self.fds.get(key)
        if fd is None:
            path = self.checkpoints[checkpoint].local_file(file)
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self.fds[key] = fd
        return fd

    def _read_into(self, checkpoint: int, file: str, offset: int, buf: torch.Tensor) -> None:
        fd = self.fd(checkpoint, file)
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                path = self.checkpoints[checkpoint].local_file(file)
                raise HeaderError(path, "file ends before the tensor data its header promises: truncated?")
            done += n
        # Consumed input pages leave the page cache, so a merge does not evict everything else.
        os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)
        self.bytes_read += len(view)

    def _release_if_done(self, checkpoint: int, file: str, i: int) -> None:
        if self.last_use.get((checkpoint, file)) == i:
            fd = self.fds.pop((checkpoint, file), None)
            if fd is not None:
                os.close(fd)
            self.checkpoints[checkpoint].release_file(file)

    # -- stage 2: merge (calling thread) --------------------------------------------------------
    def _compute_stage(self) -> None:
        while True:
            item = self.to_compute.get()
            if item is _DONE or self.failed.is_set():
                return
            _, task, slot = item
            if slot is not None:
                self._merge(task, slot)
            self._put(self.to_write, item)

    def _merge(self, task: ChunkTask, slot: _Slot) -> None:
        inputs = [
            slot.input(j)[: task.count * DTYPE_SIZES[s.dtype]].view(TORCH_DTYPES[s.dtype])
            for j, s in enumerate(task.sources)
        ]
        out = slot.out[: task.out_nbytes].view(TORCH_DTYPES[task.out_dtype])
        weights = [s.weight for s in task.sources]
        torch_kernels.linear_combine(inputs, weights, out, task.divisor, acc=self.acc, tmp=self.tmp)

    # -- stage 3: write -----------------------------------------------------------------------
    def _write_stage(self) -> None:
        writer: ShardWriter | None = None
        try:
            while True:
                item = self.to_write.get()
                if item is _DONE:
                    return
                if self.failed.is_set():
                    if item[2] is not None:
                        self.free_slots.put(item[2])
                    continue
                i, task, slot = item
                if isinstance(task, tuple):
                    writer = self._shard_boundary(task, writer)
                    continue
                assert writer is not None
                if slot is None:
                    src = task.sources[0]
                    writer.copy_from(self.fd(src.checkpoint, src.file), src.offset, task.out_nbytes, task.out_offset)
                    self.bytes_read += task.out_nbytes
                    self._release_if_done(src.checkpoint, src.file, i)
                else:
                    writer.write(memoryview(slot.out[: task.out_nbytes].numpy()), task.out_offset)
                    self.free_slots.put(slot)
                self.bytes_written += task.out_nbytes
                self._report("chunk", writer.shard.name)
        finally:
            if writer is not None:
                writer.abort()

    def _shard_boundary(self, marker: tuple[str, int], writer: ShardWriter | None) -> ShardWriter | None:
        kind, k = marker
        shard = self.plan.shards[k]
        if kind == "start":
            self.bytes_written += len(shard.header)
            return ShardWriter(self.plan.output_dir, shard)
        assert writer is not None
        path = writer.finish()
        self.files.append(path)
        self._report("shard", shard.name, path)
        return None

    def _report(self, kind: str, shard: str, path: Path | None = None) -> None:
        if self.progress is not None:
            self.progress(ProgressEvent(kind, shard, self.bytes_written, self.total_bytes, self.bytes_read, path))


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, LazyMergeError)
