"""Write lanes: the order in which a run's chunks go through the pipeline, so that several output
shards are written at once.

A write into a file holds that file's inode lock in the kernel (tmpfs, ext4 and xfs alike for
buffered writes), so one output file takes bytes at the speed of one thread's copy into the
page cache, about 3 GB/s on an H200 host: slower than the GPU path merges. Different files
have different locks. With L lanes the reader interleaves the chunks of up to L shards, and
each lane has its own writer thread, which writes its shards in file order (the checksum is
computed in order too). Pure data, computed from the task list: no torch here.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from lazymerge.plan import ChunkTask
from lazymerge.settings import WRITE_LANES_ENV
from lazymerge.settings import write_lanes as env_lanes

__all__ = ["LANES_ENV", "Schedule", "interleave_shards", "write_lanes"]

LANES_ENV = WRITE_LANES_ENV  # the name tests and benchmarks set
_GPU_LANES = 3  # a 7B fp16 model is 3 shards of at most 5 GB: each gets its own writer


@dataclass(frozen=True)
class Schedule:
    """`order[p]`: the index (in the plan's task list) of the task run at position p;
    `lane[p]`: the lane whose writer thread writes it."""

    order: list[int]
    lane: list[int]

    @property
    def lanes(self) -> int:
        return max(self.lane, default=0) + 1


def write_lanes(backend: str, shards: int, asked: int | None = None, save_disk: bool = False) -> int:
    """How many shards a run writes at once: `asked`, else LAZYMERGE_WRITE_LANES, else 3 on the
    GPU path (whose merge outruns one writer) and 1 on the CPU path (bound by its cores or its
    disk, and whose O_DIRECT writer spends no CPU on page-cache copies). Never more than the
    shards, and 1 with `save_disk` (low-disk inputs, or shards deleted once uploaded): lanes
    would keep several output shards, and the input files they read, on disk at once."""
    if save_disk:
        return 1
    if asked is None:
        env = env_lanes()
        asked = env if env is not None else (_GPU_LANES if backend == "cuda" else 1)
    return max(1, min(asked, shards))


def interleave_shards(tasks: list, lanes: int) -> Schedule:
    """Order `tasks` (`iter_chunks`' output: ("start", k), chunks, ("end", k) per shard) so that
    up to `lanes` shards are in progress at once.

    Each lane carries one shard at a time, from its start marker to its end marker, and takes
    the next unstarted shard when it finishes one. At every step the lane with the fewest
    output bytes scheduled so far goes next, so lanes advance at the same pace in bytes (shards
    differ in size, chunks too). With one lane, or one shard, the order is the plan's."""
    segments: list[list[int]] = []
    for i, task in enumerate(tasks):
        if isinstance(task, tuple) and task[0] == "start":
            segments.append([])
        if not segments:
            raise ValueError("the task list must begin with a shard's start marker")
        segments[-1].append(i)
    if lanes <= 1 or len(segments) <= 1:
        return Schedule(list(range(len(tasks))), [0] * len(tasks))
    waiting = iter(segments)
    cursors: dict[int, list[int]] = {}  # lane -> the task indices of its shard not yet scheduled
    heap: list[tuple[int, int]] = []  # (bytes scheduled, lane)
    for lane, segment in zip(range(lanes), waiting, strict=False):
        cursors[lane] = segment[::-1]  # popped from the end
        heap.append((0, lane))
    order: list[int] = []
    lane_of: list[int] = []
    while heap:
        done, lane = heapq.heappop(heap)
        i = cursors[lane].pop()
        order.append(i)
        lane_of.append(lane)
        task = tasks[i]
        done += max(1, task.out_nbytes) if isinstance(task, ChunkTask) else 1
        if not cursors[lane]:
            segment = next(waiting, None)
            if segment is None:
                continue  # this lane is finished
            cursors[lane] = segment[::-1]
        heapq.heappush(heap, (done, lane))
    return Schedule(order, lane_of)
