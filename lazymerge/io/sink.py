"""Where a run's output bytes go: shard files (`FileSink`) or tensors in memory (`TensorSink`).

Torch-free, so that a file run on the numpy backend never imports torch; `TensorSink` lives in
`lazymerge.io.tensor_sink`.

The executor (`lazymerge.pipeline`) follows the plan's byte layout whatever the destination: each
chunk is "bytes at offset O of shard k". A sink turns a shard into writers with one interface
(`write(data, offset)`, `copy_from(fd, src_offset, nbytes, offset, source)`, `abort()`, `.shard`)
and closes them when the shard ends. `FileSink` is the ordinary run (shard files, checksums, the
resume manifest); `TensorSink` writes each output tensor's bytes straight into a preallocated
tensor (a transformers model's parameter, `lazymerge.loaded`), so a merge can fill a model in
memory with no file and no second copy.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazymerge.io.digest import hash_pool
from lazymerge.io.direct import RING as DIRECT_RING
from lazymerge.io.direct import DirectShardWriter
from lazymerge.io.writer import HashingWriter

if TYPE_CHECKING:
    from lazymerge.manifest import Manifest
    from lazymerge.plan import MergePlan

__all__ = ["FileSink", "OutputSink"]


class OutputSink(ABC):
    """The destination of the K outputs of one run (K = 1 but for a sweep written to files)."""

    #: Whether consumed input pages may leave the page cache (a file run reads its inputs once;
    #: a model re-merged in memory reads them again for the next weight).
    drop_input_pages: bool = True

    @abstractmethod
    def open_shard(self, k: int) -> list[Any]:
        """One writer per output for shard `k`."""

    @abstractmethod
    def close_shard(self, k: int, writers: list[Any]) -> list[Path | None]:
        """Finish shard `k`'s writers; returns each output's file (None when there is none)."""

    def close(self) -> None:  # noqa: B027 - nothing to release for most sinks
        """Release what the sink holds (thread pools); called once the run ends, failed or not."""


class FileSink(OutputSink):
    """Shard files in each plan's output folder, checksummed as they are written; each finished
    shard recorded in its output's resume manifest."""

    def __init__(
        self,
        plans: list[MergePlan],
        manifests: list[Manifest],
        direct: bool,
        busy: dict[str, float],
        sha256: bool = False,
    ) -> None:
        self.plans = plans
        self.sha256 = sha256  # each shard's plain sha256 too, computed as written (a Hub push needs it)
        self.manifests = manifests
        self.direct = direct
        self.busy = busy
        self.lock = threading.Lock()
        # Shard checksums are computed off the writer thread, several blocks at once.
        self.hash_pool = hash_pool()
        # Threads that hash and write the O_DIRECT writer's blocks: one per block in flight.
        self.direct_pool = (
            ThreadPoolExecutor(DIRECT_RING - 1, thread_name_prefix="lazymerge-direct") if direct else None
        )

    def open_shard(self, k: int) -> list[Any]:
        if self.direct_pool is not None:
            return [DirectShardWriter(self.plans[0].output_dir, self.plans[0].shards[k], self.direct_pool, self.sha256)]
        return [HashingWriter(plan.output_dir, plan.shards[k], self.hash_pool, self.sha256) for plan in self.plans]

    def close_shard(self, k: int, writers: list[Any]) -> list[Path | None]:
        paths: list[Path | None] = []
        for plan, manifest, writer in zip(self.plans, self.manifests, writers, strict=True):
            shard = plan.shards[k]
            began = time.perf_counter()
            digest = writer.digest()
            paths.append(writer.finish())
            with self.lock:
                self.busy["shard close"] += time.perf_counter() - began
                manifest.record(shard.name, shard.size, digest, writer.sha256())
                manifest.save(plan.output_dir)
        return paths

    def close(self) -> None:
        self.hash_pool.shutdown(cancel_futures=True)
        if self.direct_pool is not None:
            self.direct_pool.shutdown(cancel_futures=True)
