"""The compute backend interface: where a chunk is merged, behind one small base class.

Interface only (httpx's `_transports/base.py`): this module never imports an implementation.
The executor's three stages stay the same on every backend: the reader fills host byte buffers,
the compute stage hands a filled chunk to `Backend.submit`, and the writer calls
`Backend.wait(handle)` before it writes the output buffer. Implementations:

- `lazymerge.kernels.numpy_cpu.NumpyBackend` merges weighted sums (linear, DogeRM) with numpy,
  synchronously: the CPU path that never imports torch.
- `lazymerge.kernels.cpu.CpuBackend` merges synchronously with the torch reference kernel;
  `wait` has nothing to do.
- `lazymerge.kernels.cuda.CudaBackend` enqueues uploads, the fused Triton kernel and the
  download on CUDA streams, and `wait` waits for that chunk's download.

Buffers are 1-D uint8 host arrays, a torch tensor or a numpy array (NumpyBackend's); the
executor only slices them, takes their `len` and reads their bytes through `host_bytes`.
Torch-free, so that a run on NumpyBackend never imports torch.

Buffer contract (every backend): the host buffers passed to `submit` belong to the backend
until `wait(handle)` returns; only then may the caller refill the inputs or read `out`.
`lazymerge.kernels.device.select_backend` picks one for `--device auto|cpu|cuda`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from lazymerge.errors import LazyMergeError
from lazymerge.plan import ChunkTask

__all__ = ["Backend", "Buffer", "DeviceError", "Handle", "host_bytes"]

Handle = Any  # opaque: whatever `submit` returned, handed back to `wait`
Buffer = Any  # a 1-D uint8 host array: torch.Tensor (torch backends) or numpy.ndarray (NumpyBackend)


class DeviceError(LazyMergeError, RuntimeError):
    """The requested compute device cannot be used in this environment."""

    hint = "use --device auto or --device cpu, or install a CUDA build of torch and `pip install 'lazymerge[cuda]'`"


class Backend(ABC):
    """Merges ChunkTasks from host byte buffers into a host byte buffer.

    One thread calls `submit` (the compute stage), another may call `wait` (the writer).
    """

    name: str
    # Elements per chunk when the caller leaves it to the executor (None: the executor's default).
    chunk_elements: int | None = None

    @abstractmethod
    def allocate(self, nbytes: int) -> Buffer:
        """A 1-D uint8 CPU buffer of `nbytes` suited to this backend (pinned for CUDA)."""

    @abstractmethod
    def submit(self, task: ChunkTask, inputs: Sequence[Buffer], out: Buffer) -> Handle:
        """Start merging `task`: `inputs[j]` holds source j's bytes, the result goes to `out`.

        `inputs[j]` and `out` are uint8 CPU views of at least `task.count * itemsize` bytes
        (extra bytes are ignored). The buffers must not be touched until `wait(handle)`.
        """

    @abstractmethod
    def wait(self, handle: Handle) -> None:
        """Block until the chunk of `handle` is in `out` and its input buffers are free again."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release on CPU
        """Finish outstanding work and release device memory."""

    def new_worker(self) -> Backend:
        """Another instance for one more CPU worker thread (each keeps its own scratch)."""
        return type(self)()

    def run_scope(self) -> AbstractContextManager[object]:
        """Held around a run (the torch CPU backend runs torch single-threaded in it)."""
        return nullcontext()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def host_bytes(buf: Buffer) -> memoryview:
    """The bytes of a host buffer (torch tensor or numpy array), without a copy."""
    to_numpy = getattr(buf, "numpy", None)  # a torch tensor; a numpy array is one already
    return memoryview(to_numpy() if to_numpy is not None else buf)
