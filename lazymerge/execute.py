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

import contextlib
import os
import queue
import resource
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lazymerge import methods
from lazymerge.constants import DEFAULT_CHUNK_ELEMENTS, DTYPE_SIZES
from lazymerge.errors import HeaderError, OutputError, PlanError
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.io.digest import BlockHasher, hash_pool
from lazymerge.io.direct import RING as DIRECT_RING
from lazymerge.io.direct import DirectShardWriter, direct_io_supported
from lazymerge.io.writer import ShardWriter, write_side_file
from lazymerge.kernels.backend import _TORCH_DTYPES, Backend, CpuBackend, DeviceError, gpu_capable, select_backend
from lazymerge.lock import OutputLock
from lazymerge.manifest import Manifest, plan_fingerprint
from lazymerge.plan import ChunkTask, MergePlan, OutputTensor, iter_chunks

__all__ = ["MergeStats", "ProgressEvent", "execute", "execute_sweep", "tensor_bytes"]

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


# The GPU path's chunk size (when the caller left the default) and number of host slots.
CUDA_CHUNK_ELEMENTS = 4 * DEFAULT_CHUNK_ELEMENTS
_CUDA_SLOTS = 6


class _Slot:
    """Reusable byte buffers for one chunk in flight: one per input, one for the output.

    Buffers grow to the largest chunk they have carried (fp16 inputs need half of what fp32 ones
    do), so memory follows the actual dtypes instead of the worst case."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.inputs: list[torch.Tensor] = []
        self.outs: list[torch.Tensor] = [backend.allocate(0)]  # one per output of a sweep

    def input(self, i: int, nbytes: int = 0) -> torch.Tensor:
        while len(self.inputs) <= i:
            self.inputs.append(self.backend.allocate(0))
        if self.inputs[i].numel() < nbytes:
            self.inputs[i] = self.backend.allocate(nbytes)
        return self.inputs[i]

    @property
    def out(self) -> torch.Tensor:
        return self.outs[0]

    def output(self, nbytes: int, k: int = 0) -> torch.Tensor:
        while len(self.outs) <= k:
            self.outs.append(self.backend.allocate(0))
        if self.outs[k].numel() < nbytes:
            self.outs[k] = self.backend.allocate(nbytes)
        return self.outs[k]


def execute(
    plan: MergePlan,
    checkpoints: Sequence[Checkpoint],
    *,
    chunk_elements: int | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    resume: bool = False,
    device: str = "cpu",
    workers: int | None = None,
) -> MergeStats:
    """Write the merged model described by `plan` into `plan.output_dir`.

    Args:
        plan: from `lazymerge.plan(...)` or a recipe's planner.
        checkpoints: the opened inputs, in `plan.inputs` order.
        chunk_elements: elements per chunk; bounds memory. Default: 2 Mi on CPU, 8 Mi on CUDA.
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
    return _execute_many(
        [plan],
        checkpoints,
        chunk_elements=chunk_elements,
        progress=progress,
        resume=resume,
        device=device,
        workers=workers,
    )[0]


def execute_sweep(
    plans: Sequence[MergePlan],
    checkpoints: Sequence[Checkpoint],
    *,
    chunk_elements: int | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    resume: bool = False,
    device: str = "cpu",
    workers: int | None = None,
) -> list[MergeStats]:
    """Write K merged models that read the same input ranges (a parameter sweep) in one pass.

    Every chunk of the inputs is read once and merged K times, once per plan; each output has
    its own folder, writer, manifest and index. The plans must read the same inputs in the same
    order (same recipe shape, different weights or parameters). With `resume`, each output keeps
    the shards its own manifest records as finished; a shard is merged only for the outputs that
    lack it, and each input range is still read once.

    Raises:
        PlanError: the plans do not read the same input ranges.
    """
    return _execute_many(
        list(plans),
        checkpoints,
        chunk_elements=chunk_elements,
        progress=progress,
        resume=resume,
        device=device,
        workers=workers,
    )


def _execute_many(
    plans: list[MergePlan],
    checkpoints: Sequence[Checkpoint],
    *,
    chunk_elements: int | None,
    progress: Callable[[ProgressEvent], None] | None,
    resume: bool,
    device: str,
    workers: int | None,
) -> list[MergeStats]:
    start = time.perf_counter()
    _return_freed_buffers_to_the_os()
    dirs = [p.output_dir for p in plans]
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise OutputError("two outputs of the sweep go to the same folder", hint="put {weight} in --output")
    for out_dir in dirs:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {out_dir}: {exc.strerror}") from exc
    cpu_only = sorted(
        {
            t.method
            for p in plans
            for t in p.tensors
            if not all(gpu_capable(t.method, len(seg.sources)) for seg in t.segments)
        }
    )
    if cpu_only and device == "auto":
        backend, reason = CpuBackend(), f"cpu: {', '.join(cpu_only)} run on the CPU backend"
    elif cpu_only and device == "cuda":
        raise DeviceError(f"merge method {cpu_only[0]} runs on the CPU backend only", hint="use --device cpu or auto")
    else:
        backend, reason = select_backend(device)
    with contextlib.ExitStack() as stack:
        for out_dir in dirs:
            stack.enter_context(OutputLock(out_dir))
        stack.enter_context(backend)
        states = [_resume_state(p, resume) for p in plans]
        # Side files first: none of them makes the folder look like a finished model; the index
        # does, so it goes last.
        for p in plans:
            for name, data in p.side_files.items():
                if not name.endswith(".index.json"):
                    write_side_file(p.output_dir, name, data)
        # Shards grouped by which outputs still need them (one group unless the outputs of a
        # resumed sweep kept different shards): one pass per group, so each range is read once.
        groups: dict[tuple[int, ...], list[int]] = {}
        for k in range(len(plans[0].shards)):
            who = tuple(v for v, (_, done) in enumerate(states) if k not in done)
            if who:
                groups.setdefault(who, []).append(k)
        total = sum(s.size for p in plans for s in p.shards)
        written = sum(p.shards[k].size for p, (_, done) in zip(plans, states, strict=True) for k in done)
        read = 0
        for v, (_, done) in enumerate(states):
            for k in sorted(done):
                if progress is not None:
                    name = plans[v].shards[k].name
                    progress(ProgressEvent("skip", name, written, total, read, dirs[v] / name))
        for who, shards in groups.items():
            manifests = [states[v][0] for v in who]
            run = _Run([plans[v] for v in who], checkpoints, chunk_elements, None, backend, workers, shards, manifests)
            begun = run.bytes_written  # a run counts its plans' other shards as written: report sweep totals
            if progress is not None:
                run.progress = lambda e, shift=written - begun, before=read: progress(
                    replace(
                        e, bytes_written=e.bytes_written + shift, total_bytes=total, bytes_read=e.bytes_read + before
                    )
                )
            run.go()
            written += run.bytes_written - begun
            read += run.bytes_read
        for p in plans:
            for name, data in p.side_files.items():
                if name.endswith(".index.json"):
                    write_side_file(p.output_dir, name, data)
    if progress:
        progress(ProgressEvent("done", "", written, total, read))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return [
        MergeStats(
            tensors=len(p.tensors),
            bytes_read=read,
            bytes_written=sum(s.size for s in p.shards),
            seconds=seconds,
            peak_rss_bytes=peak,
            device=reason,
            files=[p.output_dir / s.name for s in p.shards],
            resumed_shards=len(done),
        )
        for p, (_, done) in zip(plans, states, strict=True)
    ]


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
    ) -> None:
        self.plans = plans
        self.plan = plans[0]
        self.checkpoints = checkpoints
        self.progress = progress
        self.backend = backend
        self.manifests = manifests
        if chunk_elements is None:
            # Larger chunks on the GPU path: the per-chunk host work (a kernel launch, events,
            # several syscalls) is paid 4x less often; still bounded (see slots below).
            chunk_elements = CUDA_CHUNK_ELEMENTS if backend.name == "cuda" else DEFAULT_CHUNK_ELEMENTS
        self.variants = [list(iter_chunks(p, chunk_elements, shards)) for p in plans]
        self.tasks = self.variants[0]
        _check_same_reads(self.variants)
        self.total_bytes = sum(s.size for p in plans for s in p.shards)
        self.bytes_read = 0
        self.written = [sum(s.size for k, s in enumerate(p.shards) if k not in shards) for p in plans]
        if backend.name == "cpu":
            self.workers = [CpuBackend() for _ in range(workers or os.cpu_count() or 1)]
        else:
            self.workers = [backend]  # one thread enqueues; the GPU overlaps the chunks itself
        # Enough slots for every worker to hold one chunk, plus one being read and one written.
        # The GPU path keeps a deeper queue: reads, device work and writes are separate stages
        # whose speeds jitter, and pinned 8 Mi-element chunks of fp16 cost 48 MB per slot.
        slots = 2 * len(self.workers) + 2 if backend.name == "cpu" else _CUDA_SLOTS
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
        self.by_name = [{t.name: t for t in p.tensors} for p in plans]
        # Statistics of methods that need them: [variant][tensor name] -> stats.
        self.stats: list[dict[str, object]] = [{} for _ in plans]
        self._stats_bufs: list[torch.Tensor] = []
        # Shard checksums are computed off the writer thread, several blocks at once.
        self.hash_pool = hash_pool()
        # The inputs of a chunk are read by threads of their own where cores are plentiful: one
        # thread copying from the page cache (or a fast SSD) cannot feed a GPU. On 2-3 cores
        # those copies would only take CPU from the merge workers.
        self.read_pool, self.read_threads = _read_pool()
        self.count_lock = threading.Lock()
        self.write_pool = _write_pool()
        self.direct = _direct_writes(backend, plans)
        # Threads that hash and write the O_DIRECT writer's blocks: one per block in flight.
        self.direct_pool = (
            ThreadPoolExecutor(DIRECT_RING - 1, thread_name_prefix="lazymerge-direct") if self.direct else None
        )
        # Seconds each stage spent working (not waiting on queues): LAZYMERGE_PROFILE=1 prints them.
        self.busy = {"read": 0.0, "gpu wait": 0.0, "write": 0.0, "shard close": 0.0}

    @property
    def bytes_written(self) -> int:
        return sum(self.written)

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
            self._global_stats()
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
                if t.is_alive() or t.ident is not None:
                    t.join()
        finally:
            torch.set_num_threads(previous_threads)
            for fd in self.fds.values():
                os.close(fd)
            self.hash_pool.shutdown(cancel_futures=True)
            for pool in (self.read_pool, self.write_pool[0] if self.write_pool else None, self.direct_pool):
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
        if os.environ.get("LAZYMERGE_PROFILE") == "1":
            print("lazymerge profile (busy s): " + ", ".join(f"{k} {v:.2f}" for k, v in self.busy.items()), flush=True)
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

    # -- statistics passes -------------------------------------------------------------------------
    def _global_stats(self) -> None:
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
            self._read_into(checkpoint, file, offset, buf, drop=False)

        stats_passes(tensors, acc, read, self._stats_bufs)

    def _with_stats(self, k: int, task: ChunkTask) -> ChunkTask:
        if task.method == "linear" or task.copy or not methods.get(task.method).needs_stats:
            return task
        return replace(task, stats=self._tensor_stats(k, task.tensor))

    # -- stage 1: read -------------------------------------------------------------------------
    def _read_stage(self) -> None:
        try:
            for i, task in enumerate(self.tasks):
                if not isinstance(task, ChunkTask) or task.copy:
                    if not self._put(self.to_compute, (i, [v[i] for v in self.variants], None)):
                        return
                    continue
                tasks = [self._with_stats(k, v[i]) for k, v in enumerate(self.variants)]  # type: ignore[arg-type]
                slot = self._get(self.free_slots)
                if slot is _DONE:
                    return
                bufs = [slot.input(j, task.count * DTYPE_SIZES[s.dtype]) for j, s in enumerate(task.sources)]
                reads = [
                    (s.checkpoint, s.file, s.offset, buf[: task.count * DTYPE_SIZES[s.dtype]])
                    for s, buf in zip(task.sources, bufs, strict=True)
                ]
                self._read_all(reads)
                for s in task.sources:
                    self._release_if_done(s.checkpoint, s.file, i)
                if not self._put(self.to_compute, (i, tasks, slot)):
                    return
        finally:
            for _ in self.workers:
                self._put(self.to_compute, _DONE, force=True)

    def _read_all(self, reads: list[tuple[int, str, int, torch.Tensor]]) -> None:
        """Fill a chunk's input buffers; with a read pool, in pieces on several threads at once.

        One thread copies about 3 GB/s from the page cache into pinned memory (measured on an
        H200 host), less than a GPU merges, so the chunk's inputs are cut into pieces of at
        least _READ_PIECE bytes that the pool's threads and this one read concurrently. Each
        piece is one positional read: the order of pieces within a file does not matter."""
        if self.read_pool is None:
            for r in reads:
                self._read_into(*r)
            return
        pieces = []
        for checkpoint, file, offset, buf in reads:
            step = max(_READ_PIECE, -(-buf.numel() // self.read_threads))
            pieces += [(checkpoint, file, offset + a, buf[a : a + step]) for a in range(0, buf.numel(), step)]
        pending = [self.read_pool.submit(self._read_into, *piece) for piece in pieces[1:]]
        try:
            self._read_into(*pieces[0])
        finally:
            for f in pending:
                f.result()  # every piece is waited for (and its error raised) before the slot moves on

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

    def _read_into(self, checkpoint: int, file: str, offset: int, buf: torch.Tensor, drop: bool = True) -> None:
        began = time.perf_counter()
        fd = self.fd(checkpoint, file)
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                path = self.checkpoints[checkpoint].local_file(file)
                raise HeaderError(path, "file ends before the tensor data its header promises: truncated?")
            done += n
        if drop:
            # Consumed input pages leave the page cache, so a merge does not evict everything else.
            os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)
        with self.count_lock:  # reads of different inputs may run on different threads
            self.bytes_read += len(view)
            self.busy["read"] += time.perf_counter() - began

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
            i, tasks, slot = item
            handles = None
            if slot is not None:
                inputs = [slot.input(j) for j in range(len(tasks[0].sources))]
                handles = [backend.submit(t, inputs, slot.output(t.out_nbytes, k)) for k, t in enumerate(tasks)]
            if not self._put(self.to_write, (i, tasks, slot, handles)):
                return

    # -- stage 3: write, in task order ------------------------------------------------------------
    def _write_stage(self) -> None:
        pending: dict[int, tuple] = {}
        expected = 0
        writers: list[ShardWriter] | None = None
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
                    _, tasks, slot, handles = pending.pop(expected)
                    writers = self._write_one(expected, tasks, slot, handles, writers)
                    expected += 1
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
            source = self.checkpoints[src.checkpoint].local_file(src.file)
            writers[0].copy_from(
                self.fd(src.checkpoint, src.file), src.offset, first.out_nbytes, first.out_offset, source
            )
            # The other outputs copy from the first one's (cached) file: the input is read once.
            for writer, task in zip(writers[1:], tasks[1:], strict=True):
                writer.copy_from(
                    writers[0].fd, first.out_offset, task.out_nbytes, task.out_offset, writers[0].shard.name
                )
            self.bytes_read += first.out_nbytes
            self._release_if_done(src.checkpoint, src.file, i)
        else:
            for k, (writer, task, handle) in enumerate(zip(writers, tasks, handles or [], strict=True)):
                began = time.perf_counter()
                self.backend.wait(handle)
                waited = time.perf_counter()
                writer.write(memoryview(slot.outs[k][: task.out_nbytes].numpy()), task.out_offset)
                self.busy["gpu wait"] += waited - began
                self.busy["write"] += time.perf_counter() - waited
            self.free_slots.put(slot)
        for k, task in enumerate(tasks):
            self.written[k] += task.out_nbytes
        self.report("chunk", writers[0].shard.name)
        return writers

    def _shard_boundary(self, marker: tuple[str, int], writers: list[ShardWriter] | None) -> list[ShardWriter] | None:
        kind, k = marker
        if kind == "start":
            for v, plan in enumerate(self.plans):
                self.written[v] += len(plan.shards[k].header)
            if self.direct:
                return [DirectShardWriter(self.plan.output_dir, self.plan.shards[k], self.direct_pool)]
            return [
                _HashingWriter(plan.output_dir, plan.shards[k], self.hash_pool, self.write_pool) for plan in self.plans
            ]
        assert writers is not None
        for plan, manifest, writer in zip(self.plans, self.manifests, writers, strict=True):
            shard = plan.shards[k]
            began = time.perf_counter()
            digest = writer.digest()
            path = writer.finish()
            self.busy["shard close"] += time.perf_counter() - began
            manifest.record(shard.name, shard.size, digest)
            manifest.save(plan.output_dir)
            self.report("shard", shard.name, path)
        return None

    def report(self, kind: str, shard: str, path: Path | None = None) -> None:
        if self.progress is not None:
            self.progress(ProgressEvent(kind, shard, self.bytes_written, self.total_bytes, self.bytes_read, path))


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
                        xs.append(buf.view(_TORCH_DTYPES[s.dtype]).float())
                    acc.update(xs, seg.start + first, key)
        acc.end_pass()


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


_READ_PIECE = 4 << 20  # smallest piece a chunk's input read is split into for the read pool


def _read_pool() -> tuple[ThreadPoolExecutor | None, int]:
    """(pool, threads that read at once, the reader thread included) for a chunk's input pieces.

    Default: half the cores, at most 8, where there are 4 or more; none on fewer, where the
    copies would only take CPU from the merge workers. LAZYMERGE_READ_THREADS overrides (0 or
    1: the reader thread alone)."""
    env = os.environ.get("LAZYMERGE_READ_THREADS")
    cores = os.cpu_count() or 1
    n = int(env) if env and env.isdigit() else (min(8, cores // 2) if cores >= 4 else 0)
    if n <= 1:
        return None, 1
    return ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="lazymerge-read"), n


def _write_pool() -> tuple[ThreadPoolExecutor, int] | None:
    """Threads that write one chunk's output in pieces; LAZYMERGE_WRITE_THREADS overrides (0 or
    1: the writer thread alone). Used where cores are plentiful, as for reads."""
    env = os.environ.get("LAZYMERGE_WRITE_THREADS")
    n = int(env) if env and env.isdigit() else (2 if (os.cpu_count() or 1) >= 4 else 0)
    return (ThreadPoolExecutor(max_workers=n, thread_name_prefix="lazymerge-write"), n) if n > 1 else None


def _direct_writes(backend: Backend, plans: list[MergePlan]) -> bool:
    """Whether shards bypass the page cache (`lazymerge.io.direct`): on the CPU path, where the
    kernel's buffered-write work competes with the merge for the cores, for a single output (a
    sweep's outputs copy shared ranges from the first output's cached file), where the file
    system allows it. LAZYMERGE_DIRECT_WRITE=0 turns it off, =1 on for the GPU path too."""
    env = os.environ.get("LAZYMERGE_DIRECT_WRITE")
    if env == "0" or len(plans) != 1 or (backend.name != "cpu" and env != "1"):
        return False
    return direct_io_supported(plans[0].output_dir)


class _HashingWriter(ShardWriter):
    """A ShardWriter that checksums the shard as its bytes go out (`lazymerge.io.digest`).

    Writes arrive in file order; each completed 16 MiB block is hashed on the run's hash pool
    from the output file itself, so the digest covers exactly what is on disk, copied ranges
    included, and the writer thread never waits for sha256.
    """

    def __init__(
        self,
        directory: Path,
        shard: object,
        pool: ThreadPoolExecutor,
        write_pool: tuple[ThreadPoolExecutor, int] | None = None,
    ) -> None:
        super().__init__(directory, shard, write_pool)
        self._hasher = BlockHasher(self.fd, self.shard.size, pool)
        self._next = len(self.shard.header)

    def write(self, data: memoryview | bytes, offset: int) -> None:
        self._check_order(offset)
        super().write(data, offset)
        self._advance(len(data))

    def copy_from(self, src_fd: int, src_offset: int, nbytes: int, offset: int, source: object = "input") -> None:
        self._check_order(offset)
        super().copy_from(src_fd, src_offset, nbytes, offset, source)
        self._advance(nbytes)

    def _check_order(self, offset: int) -> None:
        if offset != self._next:
            raise RuntimeError(f"out-of-order write at {offset} (expected {self._next}) in {self.shard.name}")

    def _advance(self, n: int) -> None:
        self._next += n
        self._hasher.advance(self._next)

    def digest(self) -> str:
        return self._hasher.digest()

    def abort(self) -> None:
        hasher = getattr(self, "_hasher", None)  # None when ShardWriter.__init__ itself failed
        if hasher is not None:
            hasher.close()  # before the file goes: a running block hash still maps it
        super().abort()


def tensor_bytes(plan: MergePlan, checkpoints: Sequence[Checkpoint], tensor: OutputTensor) -> bytes:
    """Compute one output tensor in memory (for `verify --recompute`): same tasks, same kernel."""
    out = bytearray(tensor.nbytes)
    base = tensor.offset
    backend = CpuBackend()
    fds: dict[tuple[int, str], int] = {}

    def read(checkpoint: int, file: str, offset: int, buf: torch.Tensor) -> None:
        key = (checkpoint, file)
        if key not in fds:
            fds[key] = os.open(checkpoints[checkpoint].local_file(file), os.O_RDONLY)
        data = os.pread(fds[key], buf.numel(), offset)
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    # The merge's workers run torch single-threaded, and some reductions (slerp's norms above
    # 32k elements) take their order from the thread count: recompute the same way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stats = None
        if tensor.method != "linear" and tensor.segments and (method := methods.get(tensor.method)).needs_stats:
            group = [tensor]
            if method.is_global(tensor.params):
                group = sorted(
                    (t for t in plan.tensors if t.method == tensor.method and t.segments),
                    key=lambda t: t.params.get("ordinal", 0),
                )
            acc = method.new_stats(tensor.params, sum(t.numel for t in group))  # type: ignore[misc]
            stats_passes(group, acc, read)
            stats = acc.result()
        for task in _tensor_tasks(plan, tensor):
            if stats is not None:
                task = replace(task, stats=stats)
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
