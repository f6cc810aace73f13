"""`TensorSink`: a run's output bytes written straight into preallocated tensors (a transformers
model's parameters, `lazymerge.in_memory`), so a merge fills a model in memory with no file and
no second copy. Apart from `lazymerge.io.sink` because it needs torch and a file run does not."""

from __future__ import annotations

import bisect
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lazymerge._platform import pread_into
from lazymerge.errors import HeaderError, PlanError
from lazymerge.io.sink import OutputSink

if TYPE_CHECKING:
    from lazymerge.plan import MergePlan, OutputShard

__all__ = ["STORAGE_DTYPES", "TensorSink"]

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
            n = pread_into(src_fd, buf[done:], src_offset + done)
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
