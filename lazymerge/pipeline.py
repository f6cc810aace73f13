"""The streaming pipeline of a merge run: read chunk -> merge chunk -> write chunk, overlapping.

A reader thread fills buffers from the inputs (positional reads, in the write lanes' order),
compute workers merge them (CPU: one single-threaded worker per core, numpy or torch, which
stays fast when the machine is busy, unlike intra-op threads that spin at barriers; CUDA: one
worker that enqueues the fused Triton kernel), and a writer thread per write lane
(`lazymerge.lanes`) writes each result at its offset, in file order, hashing each shard as it goes. A fixed pool of buffer
slots bounds memory: peak RSS depends on the chunk size, the number of inputs and workers, never
on a tensor, shard or model size. The library never prints; progress goes to a callback.
`lazymerge.execute` sets up a run (locks, resume, side files) and runs one `MergeRun` per group
of shards.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lazymerge._platform import usable_cpu_count
from lazymerge.constants import DEFAULT_CHUNK_ELEMENTS, DTYPE_SIZES
from lazymerge.derived import fill_source
from lazymerge.errors import PlanError
from lazymerge.events import ProgressEvent
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.io.direct import use_direct_writes
from lazymerge.io.reader import InputReader
from lazymerge.io.sink import FileSink, OutputSink
from lazymerge.io.writer import ShardWriter
from lazymerge.kernels.base import Backend, Buffer, host_bytes
from lazymerge.lanes import interleave_shards, write_lanes
from lazymerge.manifest import Manifest
from lazymerge.plan import ChunkTask, MergePlan, iter_chunks
from lazymerge.settings import profile_enabled
from lazymerge.statistics import RunStatistics

__all__ = ["MergeRun", "ProgressEvent"]

_DONE = object()
_COPY_PIECE = 8 << 20  # bytes of a copied tensor held at once when its input is streamed


# The GPU path's chunk size (when the caller left the default) and number of host slots.
CUDA_CHUNK_ELEMENTS = 4 * DEFAULT_CHUNK_ELEMENTS
_CUDA_SLOTS = 6


class _Slot:
    """Reusable byte buffers for one chunk in flight: one per input, one for the output.

    Buffers grow to the largest chunk they have carried (fp16 inputs need half of what fp32 ones
    do), so memory follows the actual dtypes instead of the worst case."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.inputs: list[Buffer] = []
        self.outs: list[Buffer] = [backend.allocate(0)]  # one per output of a sweep

    def input(self, i: int, nbytes: int = 0) -> Buffer:
        return self._grown(self.inputs, i, nbytes)

    @property
    def out(self) -> Buffer:
        return self.outs[0]

    def output(self, nbytes: int, k: int = 0) -> Buffer:
        return self._grown(self.outs, k, nbytes)

    def _grown(self, bufs: list[Buffer], i: int, nbytes: int) -> Buffer:
        """bufs[i], created or replaced by a larger allocation when it holds fewer than nbytes."""
        while len(bufs) <= i:
            bufs.append(self.backend.allocate(0))
        if len(bufs[i]) < nbytes:
            bufs[i] = self.backend.allocate(nbytes)
        return bufs[i]


class MergeRun:
    """One execution of one plan, or of K plans reading the same input ranges (a sweep)."""

    def __init__(
        self,
        plans: list[MergePlan],
        checkpoints: Sequence[Checkpoint],
        chunk_elements: int | None,
        progress: Callable[[ProgressEvent], None] | None,
        backend: Backend,
        workers: int | None,
        shards: list[int],
        manifests: list[Manifest],
        lanes: int | None = None,
        sha256: bool = False,
        sink: OutputSink | None = None,
    ) -> None:
        """`sink`: where the outputs go (default: the plans' shard files, `FileSink`; a
        `TensorSink` fills tensors in memory instead)."""
        self.plans = plans
        self.sha256 = sha256  # each shard's plain sha256 too, computed as written (a Hub push needs it)
        self.plan = plans[0]
        self.checkpoints = checkpoints
        self.progress = progress
        self.backend = backend
        self.manifests = manifests
        if chunk_elements is None:
            # Larger chunks on the GPU path: the per-chunk host work (a kernel launch, events,
            # several syscalls) is paid 4x less often; still bounded (see slots below). A backend
            # may ask for its own size (NumpyBackend: smaller, for a smaller peak RSS).
            chunk_elements = backend.chunk_elements or (
                CUDA_CHUNK_ELEMENTS if backend.name == "cuda" else DEFAULT_CHUNK_ELEMENTS
            )
        variants = [list(iter_chunks(p, chunk_elements, shards)) for p in plans]
        _check_same_reads(variants)
        # Several shards written at once where one writer thread cannot keep up (the GPU path).
        save_disk = any(c.deletes_released_files for c in checkpoints)
        schedule = interleave_shards(variants[0], write_lanes(backend.name, len(shards), lanes, save_disk))
        self.variants = [[v[i] for i in schedule.order] for v in variants]
        self.tasks = self.variants[0]
        self.lane_of = schedule.lane
        self.lanes = schedule.lanes
        self.total_bytes = sum(s.size for p in plans for s in p.shards)
        self.written = [sum(s.size for k, s in enumerate(p.shards) if k not in shards) for p in plans]
        if backend.name == "cpu":
            # At least one worker: with none, the reader fills every slot and waits forever.
            self.workers = [backend.new_worker() for _ in range(max(1, workers or usable_cpu_count()))]
        else:
            self.workers = [backend]  # one thread enqueues; the GPU overlaps the chunks itself
        # Enough slots for every worker to hold one chunk, plus one being read and one written.
        # The GPU path keeps a deeper queue: reads, device work and writes are separate stages
        # whose speeds jitter, and pinned 8 Mi-element chunks of fp16 cost 48 MB per slot.
        # With write lanes each writer keeps two chunks in flight (one written, one waiting).
        slots = 2 * len(self.workers) + 2 if backend.name == "cpu" else max(_CUDA_SLOTS, 2 * self.lanes + 2)
        self.free_slots: queue.Queue[_Slot] = queue.Queue()
        for _ in range(slots):
            self.free_slots.put(_Slot(backend))
        self.to_compute: queue.Queue = queue.Queue(maxsize=slots)
        self.to_write: list[queue.Queue] = [queue.Queue(maxsize=slots) for _ in range(self.lanes)]
        # Writer threads share the byte counts, the profile, the manifests and the callback.
        self.lock = threading.Lock()
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        # Seconds each stage spent working (not waiting on queues): LAZYMERGE_PROFILE=1 prints them.
        self.busy = {"read": 0.0, "read wall": 0.0, "gpu wait": 0.0, "write": 0.0, "shard close": 0.0}
        self.reader = InputReader(checkpoints, self.tasks, self.busy)
        # Statistics of methods that need them, read before the chunks that use them.
        self.statistics = RunStatistics(plans, self.reader)
        self.sink = (
            sink
            if sink is not None
            else FileSink(plans, manifests, use_direct_writes(backend, plans), self.busy, sha256)
        )
        self.reader.drop_pages = self.sink.drop_input_pages

    @property
    def bytes_written(self) -> int:
        return sum(self.written)

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    def go(self) -> None:
        threads = [threading.Thread(target=self._guard, args=(self._read_stage,), name="lazymerge-read")]
        threads += [
            threading.Thread(target=self._guard, args=(self._compute_stage, w), name=f"lazymerge-merge-{j}")
            for j, w in enumerate(self.workers)
        ]
        writers = [
            threading.Thread(target=self._guard, args=(self._write_stage, lane), name=f"lazymerge-write-{lane}")
            for lane in range(self.lanes)
        ]
        # torch single-threaded on its CPU backend: the workers are the parallelism.
        with self.backend.run_scope():
            try:
                self.statistics.global_statistics()
                for t in [*threads, *writers]:
                    t.daemon = True
                    t.start()
                for t in threads:
                    t.join()
                for q in self.to_write:
                    self._put(q, _DONE, force=True)
                for t in writers:
                    t.join()
            except BaseException as exc:  # KeyboardInterrupt in the calling thread
                self._fail(exc)
                for checkpoint in self.checkpoints:  # a thread waiting on a stalled download gives up now
                    checkpoint.cancel()
                for t in [*threads, *writers]:
                    if t.is_alive() or t.ident is not None:
                        t.join()
            finally:
                self.reader.close()
                self.sink.close()
        if profile_enabled():
            busy = ", ".join(f"{k} {v:.2f}" for k, v in self.busy.items())
            print(f"lazymerge profile (busy s): {busy}; {self.lanes} write lane(s)", file=sys.stderr, flush=True)
        if self.errors:  # an interruption wins over what it made other threads fail with
            raise next((e for e in self.errors if isinstance(e, KeyboardInterrupt)), self.errors[0])

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
                    if not self._put(self.to_compute, (i, [v[i] for v in self.variants], None)):
                        return
                    continue
                tasks = [self.statistics.with_statistics(k, v[i]) for k, v in enumerate(self.variants)]  # type: ignore[arg-type]
                slot = self._get(self.free_slots)
                if slot is _DONE:
                    return
                bufs = [slot.input(j, task.count * DTYPE_SIZES[s.dtype]) for j, s in enumerate(task.sources)]
                reads = [
                    (s.checkpoint, s.file, s.offset, buf[: task.count * DTYPE_SIZES[s.dtype]])
                    for s, buf in zip(task.sources, bufs, strict=True)
                    if not s.derived
                ]
                began = time.perf_counter()
                self.reader.read_all(reads)
                for s, buf in zip(task.sources, bufs, strict=True):
                    if s.derived:
                        fill_source(self.reader.read_into, s, task.count, buf)
                self.busy["read wall"] += time.perf_counter() - began
                for leaf in (p for s in task.sources for p in s.leaves()):
                    self.reader.used(leaf.checkpoint, leaf.file)
                if not self._put(self.to_compute, (i, tasks, slot)):
                    return
        finally:
            for _ in self.workers:
                self._put(self.to_compute, _DONE, force=True)

    # -- stage 2: merge --------------------------------------------------------------------------
    def _compute_stage(self, backend: Backend) -> None:
        while True:
            item = self._get(self.to_compute)
            if item is _DONE:
                return
            i, tasks, slot = item
            handles = None
            if slot is not None:
                inputs = [slot.input(j) for j in range(len(tasks[0].sources))]
                handles = [backend.submit(t, inputs, slot.output(t.out_nbytes, k)) for k, t in enumerate(tasks)]
            if not self._put(self.to_write[self.lane_of[i]], (i, tasks, slot, handles)):
                return

    # -- stage 3: write, each lane in task order ----------------------------------------------------
    def _write_stage(self, lane: int) -> None:
        pending: dict[int, tuple] = {}
        mine = iter([i for i, owner in enumerate(self.lane_of) if owner == lane])  # this lane's positions
        expected = next(mine, -1)
        writers: list[ShardWriter] | None = None
        try:
            while True:
                item = self._get(self.to_write[lane])
                if item is _DONE:
                    if pending and not self.failed.is_set():
                        raise RuntimeError("writer stopped with chunks still pending")
                    return
                pending[item[0]] = item
                # Workers finish out of order; the file and its checksum are written in order.
                while expected in pending:
                    _, tasks, slot, handles = pending.pop(expected)
                    writers = self._write_one(expected, tasks, slot, handles, writers)
                    expected = next(mine, -1)
        finally:
            for writer in writers or []:
                writer.abort()

    def _write_one(
        self, i: int, tasks: list, slot: _Slot | None, handles: list | None, writers: list[ShardWriter] | None
    ) -> list[ShardWriter] | None:
        if isinstance(tasks[0], tuple):
            return self._shard_boundary(tasks[0], writers)
        assert writers is not None
        first = tasks[0]
        if slot is None:
            src = first.sources[0]
            fd = self.reader.fd(src.checkpoint, src.file)
            if fd is None:  # a streamed input: its bytes pass through memory, a piece at a time
                self._copy_streamed(writers[0], src, first.out_nbytes, first.out_offset)
            else:
                source = self.checkpoints[src.checkpoint].local_file(src.file)
                writers[0].copy_from(fd, src.offset, first.out_nbytes, first.out_offset, source)
            # The other outputs copy from the first one's (cached) file: the input is read once.
            for writer, task in zip(writers[1:], tasks[1:], strict=True):
                writer.copy_from(
                    writers[0].fd, first.out_offset, task.out_nbytes, task.out_offset, writers[0].shard.name
                )
            self.reader.count(first.out_nbytes)
            for s in first.sources:
                self.reader.used(s.checkpoint, s.file)
        else:
            for k, (writer, task, handle) in enumerate(zip(writers, tasks, handles or [], strict=True)):
                began = time.perf_counter()
                self.backend.wait(handle)
                waited = time.perf_counter()
                writer.write(host_bytes(slot.outs[k][: task.out_nbytes]), task.out_offset)
                with self.lock:
                    self.busy["gpu wait"] += waited - began
                    self.busy["write"] += time.perf_counter() - waited
            self.free_slots.put(slot)
        with self.lock:
            for k, task in enumerate(tasks):
                self.written[k] += task.out_nbytes
        self.report("chunk", writers[0].shard.name)
        return writers

    def _copy_streamed(self, writer: ShardWriter, src, nbytes: int, out_offset: int) -> None:
        buf = bytearray(min(nbytes, _COPY_PIECE))
        source = self.reader.source(src.checkpoint, src.file)
        for done in range(0, nbytes, _COPY_PIECE):
            view = memoryview(buf)[: min(_COPY_PIECE, nbytes - done)]
            source.read_into(src.offset + done, view)
            writer.write(view, out_offset + done)

    def _shard_boundary(self, marker: tuple[str, int], writers: list[ShardWriter] | None) -> list[ShardWriter] | None:
        kind, k = marker
        if kind == "start":
            with self.lock:
                for v, plan in enumerate(self.plans):
                    self.written[v] += len(plan.shards[k].header)
            return self.sink.open_shard(k)
        assert writers is not None
        for plan, path in zip(self.plans, self.sink.close_shard(k, writers), strict=True):
            self.report("shard", plan.shards[k].name, path)
        return None

    def report(self, kind: str, shard: str, path: Path | None = None) -> None:
        if self.progress is not None:
            with self.lock:  # callbacks (progress bars, the Hub pusher) see one event at a time
                self.progress(ProgressEvent(kind, shard, self.bytes_written, self.total_bytes, self.bytes_read, path))


def _check_same_reads(variants: list[list]) -> None:
    """The K plans of a sweep must read the same input ranges, chunk for chunk."""
    first = variants[0]
    for other in variants[1:]:
        ok = len(other) == len(first)
        for a, b in zip(first, other, strict=False) if ok else ():
            if isinstance(a, ChunkTask) != isinstance(b, ChunkTask):
                ok = False
            elif not isinstance(a, ChunkTask):
                ok = a == b
            else:
                ok = (a.count, a.copy, a.out_dtype) == (b.count, b.copy, b.out_dtype) and [
                    (s.checkpoint, s.file, s.offset, s.dtype) for s in a.sources
                ] == [(s.checkpoint, s.file, s.offset, s.dtype) for s in b.sources]
            if not ok:
                break
        if not ok:
            raise PlanError(
                "the merges of a sweep must read the same tensors from the same inputs in the same layout",
                hint="sweep a weight or a method parameter, not the models, dtype or shard size",
            )
