"""Where a run's output bytes go: shard files (`FileSink`) or tensors in memory (`TensorSink`).

The executor (`lazymerge.pipeline`) follows the plan's byte layout whatever the destination: each
chunk is "bytes at offset O of shard k". A sink turns a shard into writers with one interface
(`write(data, offset)`, `copy_from(fd, src_offset, nbytes, offset, source)`, `abort()`, `.shard`)
and closes them when the shard ends. `FileSink` is the ordinary run (shard files, checksums, the
resume manifest); `TensorSink` writes each output tensor's bytes straight into a preallocated
tensor (a transformers model's parameter, `lazymerge.loaded`), so a merge can fill a model in
memory with no file and no second copy.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lazymerge.errors import HeaderError, PlanError
from lazymerge.io.digest import hash_pool
from lazymerge.io.direct import RING as DIRECT_RING
from lazymerge.io.direct import DirectShardWriter
from lazymerge.io.writer import HashingWriter

if TYPE_CHECKING:
    from lazymerge.manifest import Manifest
    from lazymerge.plan import MergePlan, OutputShard

__all__ = ["STORAGE_DTYPES", "FileSink", "OutputSink", "TensorSink"]

# The torch dtype of each safetensors dtype a plan can hold.
STORAGE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    **{name: getattr(torch, attr) for name, attr in (
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"),
        ("U64", "uint64"),
    ) if hasattr(torch, attr)},
}  # fmt: skip


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


class TensorSink(OutputSink):
    """Every output tensor of one plan written into `targets[name]`, a preallocated contiguous
    tensor of the plan's dtype and shape (CPU or CUDA). No file is opened and nothing is kept.
    Tensors named in `unused` (which the model has no place for) are merged and discarded.

    Raises:
        PlanError: a plan tensor has no target, or one of another dtype, shape or layout.
    """

    drop_input_pages = False

    def __init__(self, plan: MergePlan, targets: Mapping[str, torch.Tensor], unused: Collection[str] = ()) -> None:
        self.plan = plan
        for t in plan.tensors:
            target = targets.get(t.name)
            if target is None and t.name in unused:
                continue
            if target is None:
                raise PlanError(f"the merge produces {t.name}, which the model has no place for")
            want = STORAGE_DTYPES.get(t.dtype)
            if target.dtype != want or tuple(target.shape) != tuple(t.shape) or not target.is_contiguous():
                raise PlanError(
                    f"{t.name}: the model holds {target.dtype} {tuple(target.shape)}, the merge makes "
                    f"{t.dtype} {tuple(t.shape)}"
                )
        self.targets = targets

    def open_shard(self, k: int) -> list[Any]:
        return [_TensorWriter(self.plan.shards[k], self.targets)]

    def close_shard(self, k: int, writers: list[Any]) -> list[Path | None]:
        for writer in writers:
            writer.finish()
        return [None]


class _TensorWriter:
    """A shard's byte range mapped onto its tensors: bytes at file offset O land in the tensor the
    plan placed there, at O minus the tensor's offset. A chunk never spans two tensors."""

    def __init__(self, shard: OutputShard, targets: Mapping[str, torch.Tensor]) -> None:
        self.shard = shard
        tensors = [t for t in shard.tensors if t.nbytes and t.name in targets]
        self.starts = [t.offset for t in tensors]
        self.ends = [t.offset + t.nbytes for t in tensors]
        self.views = [_bytes_of(targets[t.name]) for t in tensors]
        self.names = [t.name for t in tensors]
        self._staging = torch.empty(0, dtype=torch.uint8)  # host bytes of copies to a device tensor

    def _locate(self, offset: int, nbytes: int) -> tuple[torch.Tensor | None, int]:
        """The target bytes at shard `offset`, or None for a tensor nobody wants (`unused`)."""
        i = bisect.bisect_right(self.starts, offset) - 1
        if i < 0 or offset >= self.ends[i]:
            return None, 0
        if offset + nbytes > self.ends[i]:
            raise RuntimeError(f"{nbytes} bytes at {offset} of {self.shard.name} span two tensors")
        return self.views[i], offset - self.starts[i]

    def write(self, data: memoryview | bytes, offset: int) -> None:
        view, at = self._locate(offset, len(data))
        if view is None or not len(data):
            return
        src = torch.frombuffer(data, dtype=torch.uint8)
        view[at : at + src.numel()].copy_(src)

    def copy_from(self, src_fd: int, src_offset: int, nbytes: int, offset: int, source: object = "input") -> None:
        view, at = self._locate(offset, nbytes)
        if view is None:
            return
        dest = view[at : at + nbytes]
        if dest.device.type != "cpu":
            if self._staging.numel() < nbytes:
                self._staging = torch.empty(nbytes, dtype=torch.uint8)
            host = self._staging[:nbytes]
        else:
            host = dest
        buf = memoryview(host.numpy())
        done = 0
        while done < nbytes:
            n = os.preadv(src_fd, [buf[done:]], src_offset + done)
            if n == 0:
                raise HeaderError(source, "file ends before the tensor data its header promises: truncated?")
            done += n
        if host is not dest:
            dest.copy_(host)

    def finish(self) -> None:
        return None

    def abort(self) -> None:
        return None


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's storage as a flat uint8 tensor (same memory)."""
    flat = tensor.detach().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8, device=tensor.device)
