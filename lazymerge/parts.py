"""Parts: a merge (or a sweep) split into N independent units of whole output shards.

The plan knows every output byte and which input ranges make it, so whole shards can be produced
by different processes or machines (a Slurm job array, Ray tasks) and assembled afterwards by
`lazymerge finalize` (`lazymerge.finalize`). This module is pure data: which shards each part
makes, and what it reads and writes. The split is balanced by bytes (the larger of a shard's input
reads and its output writes, summed over a sweep's outputs) and deterministic: every process of
a job array computes the same split from the same plan.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Sequence
from dataclasses import dataclass

from lazymerge.constants import DTYPE_SIZES
from lazymerge.errors import RecipeError
from lazymerge.methods import get as get_method
from lazymerge.plan import MergePlan

__all__ = ["Part", "PartCost", "part_costs", "shard_read_bytes", "split_shards", "statistics_read_bytes"]

_PART = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Part:
    """Part `index` (0-based, as `SLURM_ARRAY_TASK_ID` with `--array=0-{count-1}`) of `count`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise RecipeError(f"the number of parts must be a whole number >= 1, got {self.count!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise RecipeError(
                f"part {self.index!r} of {self.count} does not exist",
                hint=f"parts are numbered 0 to {self.count - 1} (--part $SLURM_ARRAY_TASK_ID/{self.count})",
            )

    @classmethod
    def parse(cls, text: str | Part) -> Part:
        """`"3/16"` -> Part(3, 16) (the CLI's `--part I/N`)."""
        if isinstance(text, Part):
            return text
        m = _PART.match(str(text))
        if m is None:
            raise RecipeError(f"--part {text!r} is not I/N", hint="e.g. --part 0/16 ... --part 15/16")
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def label(self) -> str:
        """`3/16`, as the user typed it."""
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        """`part-3-of-16`: the part's manifest and lock file names carry it."""
        return f"part-{self.index}-of-{self.count}"

    def shards(self, plans: Sequence[MergePlan]) -> list[int]:
        """The indexes of the output shards this part writes (in every output of a sweep)."""
        return split_shards(plans, self.count)[self.index]


@dataclass(frozen=True)
class PartCost:
    """What one part reads and writes: its shards, input bytes, output bytes (all outputs of a sweep)."""

    index: int
    shards: tuple[int, ...]
    read_bytes: int
    write_bytes: int
    statistics_bytes: int = 0  # model-wide statistics passes, read by every part (global methods)


def shard_read_bytes(plan: MergePlan, k: int) -> int:
    """Input bytes read to make shard `k` (a sweep reads them once for all its outputs)."""
    return sum(
        seg.count * DTYPE_SIZES[s.dtype] for t in plan.shards[k].tensors for seg in t.segments for s in seg.sources
    )


def statistics_read_bytes(plan: MergePlan) -> int:
    """Input bytes of the tensors whose method needs model-wide statistics (global TIES...): every
    part reads them once more before its first chunk, whichever shards it writes."""
    total = 0
    for t in plan.tensors:
        method = get_method(t.method)
        if method.needs_statistics and method.is_global(t.params):
            total += sum(seg.count * DTYPE_SIZES[s.dtype] for seg in t.segments for s in seg.sources)
    return total


def split_shards(plans: Sequence[MergePlan], count: int) -> list[list[int]]:
    """Shard indexes of each of `count` parts, balanced by bytes; every shard in exactly one part.

    Largest shard first to the least-loaded part (ties to the lowest part), so the split depends on
    the plan alone. A part gets no shard when there are fewer shards than parts.
    """
    if count < 1:
        raise RecipeError(f"the number of parts must be >= 1, got {count}")
    plan = plans[0]
    weights = [_shard_weight(plans, k) for k in range(len(plan.shards))]
    heap = [(0, i) for i in range(count)]
    parts: list[list[int]] = [[] for _ in range(count)]
    for k in sorted(range(len(weights)), key=lambda k: (-weights[k], k)):
        load, i = heapq.heappop(heap)
        parts[i].append(k)
        heapq.heappush(heap, (load + weights[k], i))
    return [sorted(p) for p in parts]


def _shard_weight(plans: Sequence[MergePlan], k: int) -> int:
    # The slower of reading and writing bounds a shard's time on a node that streams both.
    return max(shard_read_bytes(plans[0], k), sum(p.shards[k].size for p in plans))


def part_costs(plans: Sequence[MergePlan], count: int) -> list[PartCost]:
    """What each of `count` parts reads and writes (`--dry-run --parts N`)."""
    stats = statistics_read_bytes(plans[0])
    return [
        PartCost(
            i,
            tuple(shards),
            sum(shard_read_bytes(plans[0], k) for k in shards),
            sum(p.shards[k].size for p in plans for k in shards),
            stats if shards else 0,
        )
        for i, shards in enumerate(split_shards(plans, count))
    ]
