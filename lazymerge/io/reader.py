"""Positional reads of a merge run's input files into its chunk buffers.

The executor's reader stage and its statistics passes fill buffers at the offsets the plan gives,
from each file's `RangeSource` (`lazymerge.io.range_source`): `preadv` on a local file, ranged
HTTP requests on a streamed Hub file, which is told every range the run will read so that it
fetches ahead. Consumed input pages leave the page cache, and each input file is closed and
released (`Checkpoint.release_file`) once every chunk that reads or copies it is done. Where
cores are plentiful a chunk's reads are cut into pieces that a thread pool reads at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from lazymerge._platform import usable_cpu_count
from lazymerge.constants import DTYPE_SIZES
from lazymerge.io.range_source import RangeSource
from lazymerge.kernels.base import Buffer, host_bytes
from lazymerge.plan import ChunkTask
from lazymerge.settings import read_threads

if TYPE_CHECKING:
    from lazymerge.io.checkpoint import Checkpoint

__all__ = ["InputReader", "planned_reads"]

_READ_PIECE = 4 << 20  # smallest piece a chunk's input read is split into for the read pool


def _read_pool() -> tuple[ThreadPoolExecutor | None, int]:
    """(pool, threads that read at once, the reader thread included) for a chunk's input pieces.

    Default: half the cores, at most 8, where there are 4 or more; none on fewer, where the
    copies would only take CPU from the merge workers. LAZYMERGE_READ_THREADS overrides (0 or
    1: the reader thread alone)."""
    env = read_threads()
    cores = usable_cpu_count()
    n = env if env is not None else (min(8, cores // 2) if cores >= 4 else 0)
    if n <= 1:
        return None, 1
    return ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="lazymerge-read"), n


class InputReader:
    """The open input files of one run (`tasks`, in order), and every read of their bytes.

    `busy["read"]` accumulates the seconds spent reading (the run's profile)."""

    def __init__(self, checkpoints: Sequence[Checkpoint], tasks: list, busy: dict[str, float]) -> None:
        self.checkpoints = checkpoints
        self.busy = busy
        self.bytes_read = 0
        self.sources: dict[tuple[int, str], RangeSource] = {}
        self.fd_lock = threading.Lock()
        self.reads = planned_reads(tasks)
        # Uses of each input file still to come. A file is released when its count reaches 0,
        # not at the last task in plan order: copies run on writer threads (one per write lane)
        # that lag the reader, and with lanes the order of uses is not the plan's.
        self.uses_left = _use_counts(tasks)
        # The inputs of a chunk are read by threads of their own where cores are plentiful: one
        # thread copying from the page cache (or a fast SSD) cannot feed a GPU. On 2-3 cores
        # those copies would only take CPU from the merge workers.
        self.pool, self.threads = _read_pool()
        self.count_lock = threading.Lock()
        # Consumed pages leave the page cache unless the same inputs are about to be read again.
        self.drop_pages = True

    def read_all(self, reads: list[tuple[int, str, int, Buffer]]) -> None:
        """Fill a chunk's input buffers; with a read pool, in pieces on several threads at once.

        One thread copies about 3 GB/s from the page cache into pinned memory (measured on an
        H200 host), less than a GPU merges, so the chunk's inputs are cut into pieces of at
        least _READ_PIECE bytes that the pool's threads and this one read concurrently. Each
        piece is one positional read: the order of pieces within a file does not matter."""
        if self.pool is None:
            for r in reads:
                self.read_into(*r, drop=self.drop_pages)
            return
        pieces = []
        for checkpoint, file, offset, buf in reads:
            step = max(_READ_PIECE, -(-len(buf) // self.threads))
            pieces += [(checkpoint, file, offset + a, buf[a : a + step]) for a in range(0, len(buf), step)]
        pending = [self.pool.submit(self.read_into, *piece, self.drop_pages) for piece in pieces[1:]]
        try:
            self.read_into(*pieces[0], drop=self.drop_pages)
        finally:
            for f in pending:
                f.result()  # every piece is waited for (and its error raised) before the slot moves on

    def source(self, checkpoint: int, file: str) -> RangeSource:
        """The open source of an input file (opened, or its stream started, on first use)."""
        key = (checkpoint, file)
        with self.fd_lock:
            source = self.sources.get(key)
            if source is None:
                source = self.checkpoints[checkpoint].range_source(file, self.reads.get(key, []))
                self.sources[key] = source
            return source

    def fd(self, checkpoint: int, file: str) -> int | None:
        """The input file's local descriptor (for `copy_file_range`), or None when it is streamed."""
        return self.source(checkpoint, file).fd

    def read_into(self, checkpoint: int, file: str, offset: int, buf: Buffer, drop: bool = True) -> None:
        began = time.perf_counter()
        view = host_bytes(buf).cast("B")
        self.source(checkpoint, file).read_into(offset, view, consume=drop)
        self.count(len(view), time.perf_counter() - began)

    def count(self, nbytes: int, seconds: float = 0.0) -> None:
        """Add input bytes read (and seconds spent reading) to the run's totals. Reads of
        different inputs run on different threads, and copied tensors are read by the writer."""
        with self.count_lock:
            self.bytes_read += nbytes
            self.busy["read"] += seconds

    def used(self, checkpoint: int, file: str) -> None:
        """One task is done with an input file; close and release it after the last one."""
        key = (checkpoint, file)
        with self.fd_lock:
            self.uses_left[key] -= 1
            if self.uses_left[key] > 0:
                return
            source = self.sources.pop(key, None)
        if source is not None:
            source.close()
        self.checkpoints[checkpoint].release_file(file)

    def close(self) -> None:
        """Close the files still open (after a failure) and stop the read pool."""
        for source in self.sources.values():
            source.close()
        self.sources.clear()
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _use_counts(tasks: list) -> dict[tuple[int, str], int]:
    uses: dict[tuple[int, str], int] = {}
    for task in tasks:
        if isinstance(task, ChunkTask):
            for leaf in (p for s in task.sources for p in s.leaves()):
                uses[(leaf.checkpoint, leaf.file)] = uses.get((leaf.checkpoint, leaf.file), 0) + 1
    return uses


def planned_reads(tasks: list) -> dict[tuple[int, str], list[tuple[int, int]]]:
    """(offset, bytes) of every read the run's chunks make of each input file, in the run's order
    (a streamed file fetches them ahead; statistics passes' reads are fetched when asked)."""
    reads: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for task in tasks:
        if not isinstance(task, ChunkTask):
            continue
        if task.copy:
            s = task.sources[0]
            reads.setdefault((s.checkpoint, s.file), []).append((s.offset, task.out_nbytes))
            continue
        for s in task.sources:
            reads.setdefault((s.checkpoint, s.file), []).append((s.offset, task.count * DTYPE_SIZES[s.dtype]))
    return reads
