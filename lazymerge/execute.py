"""Run a MergePlan: read chunk -> merge chunk -> write chunk, in overlapping stages.

A reader thread fills buffers from the inputs (positional reads, in plan order), compute workers
merge them (CPU: one single-threaded torch worker per core, which stays fast when the machine is
busy, unlike intra-op threads that spin at barriers; CUDA: one worker that enqueues the fused
Triton kernel), and a writer thread writes each result at its offset, in task order, hashing each
shard as it goes. A fixed pool of buffer slots bounds memory: peak RSS depends on the chunk size,
the number of inputs and workers, never on a tensor, shard or model size. The library never
prints; progress goes to a callback.
"""

from __future__ import annotations

import hashlib
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
from lazymerge.errors import HeaderError, OutputError
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.io.writer import ShardWriter, write_side_file
from lazymerge.kernels.backend import Backend, CpuBackend, select_backend
from lazymerge.lock import OutputLock
from lazymerge.manifest import Manifest, plan_fingerprint
from lazymerge.plan import ChunkTask, MergePlan, OutputTensor, iter_chunks

__all__ = ["MergeStats", "ProgressEvent", "execute", "tensor_bytes"]

_DONE = object()


@dataclass(frozen=True)
class ProgressEvent:
    """What the executor reports. `kind` is "start", "chunk", "shard" (a shard closed),
    "skip" (a shard kept from an earlier run by --resume) or "done"."""

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
    resumed_shards: int = 0


class _Slot:
    """Reusable byte buffers for one chunk in flight: one per input, one for the output.

    Buffers grow to the largest chunk they have carried (fp16 inputs need half of what fp32 ones
    do), so memory follows the actual dtypes instead of the worst case."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.inputs: list[torch.Tensor] = []
        self.out = backend.allocate(0)

    def input(self, i: int, nbytes: int = 0) -> torch.Tensor:
        while len(self.inputs) <= i:
            self.inputs.append(self.backend.allocate(0))
        if self.inputs[i].numel() < nbytes:
            self.inputs[i] = self.backend.allocate(nbytes)
        return self.inputs[i]

    def output(self, nbytes: int) -> torch.Tensor:
        if self.out.numel() < nbytes:
            self.out = self.backend.allocate(nbytes)
        return self.out


def execute(
    plan: MergePlan,
    checkpoints: Sequence[Checkpoint],
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    progress: Callable[[ProgressEvent], None] | None = None,
    resume: bool = False,
    device: str = "cpu",
    workers: int | None = None,
) -> MergeStats:
    """Write the merged model described by `plan` into `plan.output_dir`.

    Args:
        plan: from `lazymerge.plan(...)` or a recipe's planner.
        checkpoints: the opened inputs, in `plan.inputs` order.
        chunk_elements: elements per chunk; bounds memory.
        progress: called with a ProgressEvent after every chunk and when each shard closes.
        resume: keep shards that an earlier run of the same plan finished (checked against the
            manifest's sizes and sha256), redo the rest.
        device: "cpu", "cuda" or "auto" (CUDA when a GPU and Triton are usable).
        workers: CPU merge threads (default: the number of cores).

    Returns:
        MergeStats of the run.

    Raises:
        OutputError: the folder is locked by another run, or holds a different merge (--resume).
        DiskSpaceError, HeaderError: disk full, or an input truncated since it was planned.
    """
    start = time.perf_counter()
    _return_freed_buffers_to_the_os()
    out_dir = plan.output_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out_dir}: {exc.strerror}") from exc
    backend, reason = select_backend(device)
    with OutputLock(out_dir), backend:
        manifest, done = _resume_state(plan, resume)
        # Side files first: none of them makes the folder look like a finished model; the index
        # does, so it goes last.
        for name, data in plan.side_files.items():
            if not name.endswith(".index.json"):
                write_side_file(out_dir, name, data)
        todo = [k for k in range(len(plan.shards)) if k not in done]
        run = _Run(plan, checkpoints, chunk_elements, progress, backend, workers, todo, manifest)
        for k in sorted(done):
            run.report("skip", plan.shards[k].name, out_dir / plan.shards[k].name)
        run.go()
        for name, data in plan.side_files.items():
            if name.endswith(".index.json"):
                write_side_file(out_dir, name, data)
    if progress:
        progress(ProgressEvent("done", "", run.bytes_written, run.total_bytes, run.bytes_read))
    return MergeStats(
        tensors=len(plan.tensors),
        bytes_read=run.bytes_read,
        bytes_written=run.bytes_written,
        seconds=time.perf_counter() - start,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        device=reason,
        files=[out_dir / s.name for s in plan.shards],
        resumed_shards=len(done),
    )


def _return_freed_buffers_to_the_os() -> None:
    # glibc raises its mmap threshold each time a large block is freed, after which buffers of
    # that size come from the heap and stay in RSS once freed (about 100 MB here). A fixed
    # threshold keeps every multi-MB buffer in its own mapping, returned on free.
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _resume_state(plan: MergePlan, resume: bool) -> tuple[Manifest, set[int]]:
    fingerprint = plan_fingerprint(plan)
    if not resume:
        return Manifest(fingerprint), set()
    previous = Manifest.load(plan.output_dir)
    if previous is None:
        return Manifest(fingerprint), set()
    if previous.fingerprint != fingerprint:
        raise OutputError(
            f"{plan.output_dir} holds shards of a different merge (other inputs, recipe or shard size)",
            hint="run the same command as before with --resume, or choose an empty --output",
        )
    done = {k for k, s in enumerate(plan.shards) if previous.finished(plan.output_dir, s.name, s.size)}
    kept = Manifest(fingerprint, {plan.shards[k].name: previous.shards[plan.shards[k].name] for k in done})
    return kept, done


class _Run:
    """One execution: the stages and their shared state."""

    def __init__(
        self,
        plan: MergePlan,
        checkpoints: Sequence[Checkpoint],
        chunk_elements: int,
        progress: Callable[[ProgressEvent], None] | None,
        backend: Backend,
        workers: int | None,
        shards: list[int],
        manifest: Manifest,
    ) -> None:
        self.plan = plan
        self.checkpoints = checkpoints
        self.progress = progress
        self.backend = backend
        self.manifest = manifest
        self.tasks = list(iter_chunks(plan, chunk_elements, shards))
        self.total_bytes = sum(s.size for s in plan.shards)
        self.bytes_read = 0
        self.bytes_written = sum(s.size for k, s in enumerate(plan.shards) if k not in shards)
        if backend.name == "cpu":
            self.workers = [CpuBackend() for _ in range(workers or os.cpu_count() or 1)]
        else:
            self.workers = [backend]  # one thread enqueues; the GPU overlaps the chunks itself
        # Enough slots for every worker to hold one chunk, plus one being read and one written.
        slots = 2 * len(self.workers) + 2
        self.free_slots: queue.Queue[_Slot] = queue.Queue()
        for _ in range(slots):
            self.free_slots.put(_Slot(backend))
        self.to_compute: queue.Queue = queue.Queue(maxsize=slots)
        self.to_write: queue.Queue = queue.Queue(maxsize=slots)
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self.fds: dict[tuple[int, str], int] = {}
        self.fd_lock = threading.Lock()
        self.last_use = self._last_uses()

    def _last_uses(self) -> dict[tuple[int, str], int]:
        last: dict[tuple[int, str], int] = {}
        for i, task in enumerate(self.tasks):
            if isinstance(task, ChunkTask):
                for s in task.sources:
                    last[(s.checkpoint, s.file)] = i
        return last

    def go(self) -> None:
        threads = [threading.Thread(target=self._guard, args=(self._read_stage,), name="lazymerge-read")]
        threads += [
            threading.Thread(target=self._guard, args=(self._compute_stage, w), name=f"lazymerge-merge-{j}")
            for j, w in enumerate(self.workers)
        ]
        writer = threading.Thread(target=self._guard, args=(self._write_stage,), name="lazymerge-write")
        previous_threads = torch.get_num_threads()
        if self.backend.name == "cpu":
            torch.set_num_threads(1)  # parallelism comes from the workers
        try:
            for t in [*threads, writer]:
                t.daemon = True
                t.start()
            for t in threads:
                t.join()
            self._put(self.to_write, _DONE, force=True)
            writer.join()
        except BaseException as exc:  # KeyboardInterrupt in the calling thread
            self._fail(exc)
            for t in [*threads, writer]:
                t.join()
        finally:
            torch.set_num_threads(previous_threads)
            for fd in self.fds.values():
                os.close(fd)
        if self.errors:
            raise self.errors[0]

    def _guard(self, stage: Callable[..., None], *args: object) -> None:
        try:
            stage(*args)
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.failed.set()

    def _put(self, q: queue.Queue, item: object, force: bool = False) -> bool:
        """Put unless the run failed (then give up, so no thread blocks on a dead consumer)."""
        while True:
            if self.failed.is_set() and not force:
                return False
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                if self.failed.is_set():
                    return False

    def _get(self, q: queue.Queue) -> object:
        while not self.failed.is_set():
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                continue
        return _DONE

    # -- stage 1: read -------------------------------------------------------------------------
    def _read_stage(self) -> None:
        try:
            for i, task in enumerate(self.tasks):
                if not isinstance(task, ChunkTask) or task.copy:
                    if not self._put(self.to_compute, (i, task, None)):
                        return
                    continue
                slot = self._get(self.free_slots)
                if slot is _DONE:
                    return
                for j, src in enumerate(task.sources):
                    nbytes = task.count * DTYPE_SIZES[src.dtype]
                    self._read_into(src.checkpoint, src.file, src.offset, slot.input(j, nbytes)[:nbytes])
                    self._release_if_done(src.checkpoint, src.file, i)
                if not self._put(self.to_compute, (i, task, slot)):
                    return
        finally:
            for _ in self.workers:
                self._put(self.to_compute, _DONE, force=True)

    def fd(self, checkpoint: int, file: str) -> int:
        key = (checkpoint, file)
        with self.fd_lock:
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
            with self.fd_lock:
                fd = self.fds.pop((checkpoint, file), None)
            if fd is not None:
                os.close(fd)
            self.checkpoints[checkpoint].release_file(file)

    # -- stage 2: merge --------------------------------------------------------------------------
    def _compute_stage(self, backend: Backend) -> None:
        while True:
            item = self._get(self.to_compute)
            if item is _DONE:
                return
            i, task, slot = item
            handle = None
            if slot is not None:
                inputs = [slot.input(j) for j in range(len(task.sources))]
                handle = backend.submit(task, inputs, slot.output(task.out_nbytes))
            if not self._put(self.to_write, (i, task, slot, handle)):
                return

    # -- stage 3: write, in task order ------------------------------------------------------------
    def _write_stage(self) -> None:
        pending: dict[int, tuple] = {}
        expected = 0
        writer: _HashingWriter | None = None
        try:
            while True:
                item = self._get(self.to_write)
                if item is _DONE:
                    if pending and not self.failed.is_set():
                        raise RuntimeError("writer stopped with chunks still pending")
                    return
                pending[item[0]] = item
                # Workers finish out of order; the file and its checksum are written in order.
                while expected in pending:
                    _, task, slot, handle = pending.pop(expected)
                    writer = self._write_one(expected, task, slot, handle, writer)
                    expected += 1
        finally:
            if writer is not None:
                writer.abort()

    def _write_one(
        self, i: int, task: object, slot: _Slot | None, handle: object, writer: _HashingWriter | None
    ) -> _HashingWriter | None:
        if isinstance(task, tuple):
            return self._shard_boundary(task, writer)
        assert writer is not None and isinstance(task, ChunkTask)
        if slot is None:
            src = task.sources[0]
            source = self.checkpoints[src.checkpoint].local_file(src.file)
            writer.copy_from(self.fd(src.checkpoint, src.file), src.offset, task.out_nbytes, task.out_offset, source)
            self.bytes_read += task.out_nbytes
            self._release_if_done(src.checkpoint, src.file, i)
        else:
            self.backend.wait(handle)
            writer.write(memoryview(slot.out[: task.out_nbytes].numpy()), task.out_offset)
            self.free_slots.put(slot)
        self.bytes_written += task.out_nbytes
        self.report("chunk", writer.shard.name)
        return writer

    def _shard_boundary(self, marker: tuple[str, int], writer: _HashingWriter | None) -> _HashingWriter | None:
        kind, k = marker
        shard = self.plan.shards[k]
        if kind == "start":
            self.bytes_written += len(shard.header)
            return _HashingWriter(self.plan.output_dir, shard)
        assert writer is not None
        digest = writer.digest()
        path = writer.finish()
        self.manifest.record(shard.name, shard.size, digest)
        self.manifest.save(self.plan.output_dir)
        self.report("shard", shard.name, path)
        return None

    def report(self, kind: str, shard: str, path: Path | None = None) -> None:
        if self.progress is not None:
            self.progress(ProgressEvent(kind, shard, self.bytes_written, self.total_bytes, self.bytes_read, path))


class _HashingWriter(ShardWriter):
    """A ShardWriter that computes the shard's sha256 as its bytes go out, in file order.

    Copied ranges (copy_file_range never passes through Python) are read back from the output
    file, which is still in the page cache, so the digest covers exactly what is on disk.
    """

    def __init__(self, directory: Path, shard: object) -> None:
        super().__init__(directory, shard)
        self._sha = hashlib.sha256(self.shard.header)
        self._next = len(self.shard.header)

    def write(self, data: memoryview | bytes, offset: int) -> None:
        super().write(data, offset)
        self._advance(offset, len(data))
        self._sha.update(data)

    def copy_from(self, src_fd: int, src_offset: int, nbytes: int, offset: int, source: object = "input") -> None:
        super().copy_from(src_fd, src_offset, nbytes, offset, source)
        self._advance(offset, nbytes)
        done = 0
        while done < nbytes:
            block = os.pread(self.fd, min(nbytes - done, 16 << 20), offset + done)
            self._sha.update(block)
            done += len(block)

    def _advance(self, offset: int, n: int) -> None:
        if offset != self._next:
            raise RuntimeError(f"out-of-order write at {offset} (expected {self._next}) in {self.shard.name}")
        self._next += n

    def digest(self) -> str:
        return self._sha.hexdigest()


def tensor_bytes(plan: MergePlan, checkpoints: Sequence[Checkpoint], tensor: OutputTensor) -> bytes:
    """Compute one output tensor in memory (for `verify --recompute`): same tasks, same kernel."""
    out = bytearray(tensor.nbytes)
    base = tensor.offset
    backend = CpuBackend()
    fds: dict[tuple[int, str], int] = {}
    try:
        for task in _tensor_tasks(plan, tensor):
            buffers = []
            for s in task.sources:
                key = (s.checkpoint, s.file)
                if key not in fds:
                    fds[key] = os.open(checkpoints[s.checkpoint].local_file(s.file), os.O_RDONLY)
                data = os.pread(fds[key], task.count * DTYPE_SIZES[s.dtype], s.offset)
                buffers.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            start = task.out_offset - base
            if task.copy:
                out[start : start + task.out_nbytes] = buffers[0].numpy().tobytes()
                continue
            result = torch.empty(task.out_nbytes, dtype=torch.uint8)
            backend.submit(task, buffers, result)
            out[start : start + task.out_nbytes] = result.numpy().tobytes()
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
