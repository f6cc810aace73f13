"""What a run reports, as plain data: `ProgressEvent` while it runs, `MergeStats` when it ends.

Torch-free (like the planner), so that `import lazymerge` can export both without importing
the executor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lazymerge.io.hub_upload import PushResult

__all__ = ["MergeStats", "ProgressEvent"]


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
    """A finished run: counts, sizes, time, memory, where the files are and where they were pushed."""

    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int | None  # None where the platform cannot measure it
    device: str
    files: list[Path] = field(default_factory=list)
    resumed_shards: int = 0
    output_dir: Path | None = None
    push: PushResult | None = None  # where the output was pushed (`push_to_hub`), else None
