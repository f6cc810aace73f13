"""What a run reports, as plain data: `ProgressEvent` while it runs, `MergeStats` when it ends.

Torch-free (like the planner), so that `import lazymerge` can export both without importing
the executor.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

    @property
    def read_rate(self) -> float | None:
        """Input bytes read per second over the run (None for a run too short to time)."""
        return self.bytes_read / self.seconds if self.seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        """The stats as JSON-ready data (what `lazymerge ... --json` prints for each output).

        Keys: `output_dir`, `tensors`, `bytes_read`, `bytes_written`, `seconds`, `read_rate`
        (input bytes/s, or null), `peak_rss_bytes` (null where the platform cannot measure it),
        `device`, `files`, `resumed_shards` (shards kept from an earlier run) and `push` (null, or
        `repo_id`, `revision`, `commit_url`, `uploaded`, `reused`). Paths are strings; sizes are bytes; times are seconds."""
        return {
            "output_dir": None if self.output_dir is None else str(self.output_dir),
            "tensors": self.tensors,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "seconds": self.seconds,
            "read_rate": self.read_rate,
            "peak_rss_bytes": self.peak_rss_bytes,
            "device": self.device,
            "files": [str(f) for f in self.files],
            "resumed_shards": self.resumed_shards,
            "push": None if self.push is None else dataclasses.asdict(self.push),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """`to_dict()` as a JSON document."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)
