"""Read the first input ranges of a merge while the interpreter imports its compute library.

A merge command plans from headers without torch or numpy, then imports the library its chunks
need (`lazymerge.job.run_job`): torch for most methods or the GPU, about 3 s of CPU
on the 2-core CI machine even with the library files cached, during which a cold disk would sit
idle. This module fills that window: a background thread reads the plan's first input ranges,
in the order the executor will read them with one write lane (the CPU path's; with several,
as on the GPU path, the first lane's reads), so that they are in the page cache when it starts
(the executor then drops them once consumed, as it does for every range it reads). The thread
stops as soon as the import is done, or at a byte budget that keeps the page cache it fills far
below the memory the machine (or the memory cgroup the run is in) has free. A weighted-sum merge
on the CPU (linear, DogeRM) imports only numpy (`lazymerge.kernels.numpy_cpu`): a window of
0.05-0.3 s, which the same warm-up fills so that the disk starts right after planning.

Torch- and numpy-free, like the planner: it must run before they are imported.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from lazymerge._platform import cgroup_memory_headroom, memory_available, open_flags, pread_into
from lazymerge.constants import DEFAULT_CHUNK_ELEMENTS, DTYPE_SIZES
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.plan import ChunkTask, MergePlan, iter_chunks
from lazymerge.settings import prefetch_enabled

__all__ = ["StartupPrefetch", "prefetch_budget"]

MAX_PREFETCH_BYTES = 2 << 30
_PIECE = 8 << 20  # bytes per read: large enough for the disk, small enough to stop promptly


class StartupPrefetch:
    """Context manager: `with StartupPrefetch(plan, checkpoints, module=name): import name`.

    Does nothing when `module` (default torch) is already imported (no window to fill), when an input is remote
    (reading it would start a download), when resuming (the first shards may be kept), or when
    LAZYMERGE_PREFETCH=0.
    """

    def __init__(
        self, plan: MergePlan, checkpoints: Sequence[Checkpoint], *, resume: bool = False, module: str = "torch"
    ) -> None:
        self._plan = plan
        self._checkpoints = checkpoints
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.bytes_read = 0
        self._enabled = (
            module not in sys.modules and not resume and prefetch_enabled() and all(not c.remote for c in checkpoints)
        )

    def __enter__(self) -> StartupPrefetch:
        if self._enabled:
            budget = prefetch_budget()
            if budget >= _PIECE:
                self._thread = threading.Thread(target=self._run, args=(budget,), name="lazymerge-prefetch")
                self._thread.daemon = True
                self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # at most one piece (8 MiB) away

    def _run(self, budget: int) -> None:
        buf = bytearray(_PIECE)
        fds: dict[Path, int] = {}
        try:
            for path, offset, nbytes in _ranges(self._plan, self._checkpoints):
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, open_flags(os.O_RDONLY))
                done = 0
                while done < nbytes:
                    if self._stop.is_set() or self.bytes_read >= budget:
                        return
                    n = pread_into(fd, memoryview(buf)[: min(_PIECE, nbytes - done)], offset + done)
                    if n <= 0:
                        break  # a truncated input: the executor reports it
                    done += n
                    self.bytes_read += n
        except OSError:
            return  # only a warm-up: the executor meets (and reports) any real problem
        finally:
            for fd in fds.values():
                os.close(fd)


def _ranges(plan: MergePlan, checkpoints: Sequence[Checkpoint]) -> Iterator[tuple[Path, int, int]]:
    """(file, offset, bytes) of every input read, in the executor's order (chunk by chunk)."""
    for task in iter_chunks(plan, DEFAULT_CHUNK_ELEMENTS):
        if not isinstance(task, ChunkTask):
            continue
        sources = task.sources[:1] if task.copy else task.sources
        for s in (leaf for src in sources for leaf in src.leaves()):
            nbytes = task.out_nbytes if task.copy else task.count * DTYPE_SIZES[s.dtype]
            yield checkpoints[s.checkpoint].local_file(s.file), s.offset, nbytes


def prefetch_budget() -> int:
    """Bytes the warm-up may put in the page cache: a quarter of the free memory, counting a
    memory cgroup's limit (which charges page cache to the run), at most MAX_PREFETCH_BYTES."""
    free = memory_available()
    cgroup = cgroup_memory_headroom()
    if cgroup is not None:
        free = min(free, cgroup) if free else cgroup
    return min(MAX_PREFETCH_BYTES, free // 4)
