"""The compute backend interface: where a chunk is merged, behind one small base class.

Interface only (httpx's `_transports/base.py`): this module never imports an implementation.
The executor's three stages stay the same on every backend: the reader fills host byte buffers,
the compute stage hands a filled chunk to `Backend.submit`, and the writer calls
`Backend.wait(handle)` before it writes the output buffer. Implementations:

- `lazymerge.kernels.cpu.CpuBackend` merges synchronously with the torch reference kernel;
  `wait` has nothing to do.
- `lazymerge.kernels.cuda.CudaBackend` enqueues uploads, the fused Triton kernel and the
  download on CUDA streams, and `wait` waits for that chunk's download.

Buffer contract (every backend): the host buffers passed to `submit` belong to the backend
until `wait(handle)` returns; only then may the caller refill the inputs or read `out`.
`lazymerge.kernels.device.select_backend` picks one for `--device auto|cpu|cuda`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from lazymerge.constants import DTYPE_SIZES
from lazymerge.errors import LazyMergeError
from lazymerge.plan import ChunkTask

__all__ = ["TORCH_DTYPES", "Backend", "DeviceError", "Handle", "typed_inputs", "typed_view"]

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
Handle = Any  # opaque: whatever `submit` returned, handed back to `wait`


class DeviceError(LazyMergeError, RuntimeError):
    """The requested compute device cannot be used in this environment."""

    hint = "use --device auto or --device cpu, or install a CUDA build of torch and `pip install 'lazymerge[cuda]'`"


class Backend(ABC):
    """Merges ChunkTasks from host byte buffers into a host byte buffer.

    One thread calls `submit` (the compute stage), another may call `wait` (the writer).
    """

    name: str

    @abstractmethod
    def allocate(self, nbytes: int) -> torch.Tensor:
        """A 1-D uint8 CPU buffer of `nbytes` suited to this backend (pinned for CUDA)."""

    @abstractmethod
    def submit(self, task: ChunkTask, inputs: Sequence[torch.Tensor], out: torch.Tensor) -> Handle:
        """Start merging `task`: `inputs[j]` holds source j's bytes, the result goes to `out`.

        `inputs[j]` and `out` are uint8 CPU views of at least `task.count * itemsize` bytes
        (extra bytes are ignored). The buffers must not be touched until `wait(handle)`.
        """

    @abstractmethod
    def wait(self, handle: Handle) -> None:
        """Block until the chunk of `handle` is in `out` and its input buffers are free again."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release on CPU
        """Finish outstanding work and release device memory."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def typed_view(buf: torch.Tensor, count: int, dtype: str, what: str) -> torch.Tensor:
    """The first `count` elements of a uint8 buffer, viewed as `dtype` (no copy)."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"{what}: dtype {dtype} is not mergeable (F32, F16, BF16)")
    nbytes = count * DTYPE_SIZES[dtype]
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < nbytes:
        raise ValueError(
            f"{what}: need a 1-D uint8 buffer of at least {nbytes} bytes, got {buf.dtype} {tuple(buf.shape)}"
        )
    return buf[:nbytes].view(TORCH_DTYPES[dtype])


def typed_inputs(task: ChunkTask, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Checked typed views of the input buffers, one per source of `task`."""
    if task.copy:
        raise ValueError("copy tasks are byte copies; they never reach a compute backend")
    if len(inputs) != len(task.sources):
        raise ValueError(f"task has {len(task.sources)} sources but {len(inputs)} input buffers were given")
    return [
        typed_view(buf, task.count, src.dtype, f"inputs[{j}]")
        for j, (buf, src) in enumerate(zip(inputs, task.sources, strict=True))
    ]
