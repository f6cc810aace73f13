"""Compute backends for the executor: where a chunk is merged, behind one small interface.

The executor's three stages stay the same on every backend: the reader fills host byte buffers,
the compute stage hands a filled chunk to `Backend.submit`, and the writer calls
`Backend.wait(handle)` before it writes the output buffer. What differs:

- `CpuBackend` (here) merges synchronously with the torch reference kernel; `wait` has nothing
  to do.
- `CudaBackend` (`lazymerge.kernels.cuda`) enqueues uploads, the fused Triton kernel and the
  download on CUDA streams, and `wait` waits for that chunk's download.

Buffer contract (both backends): the host buffers passed to `submit` belong to the backend
until `wait(handle)` returns; only then may the caller refill the inputs or read `out`.
`select_backend` picks one for `--device auto|cpu|cuda`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from lazymerge.constants import DTYPE_SIZES
from lazymerge.errors import LazyMergeError
from lazymerge.kernels import torch as torch_kernels
from lazymerge.plan import ChunkTask

__all__ = [
    "DEVICES",
    "GPU_METHODS",
    "TORCH_DTYPES",
    "Backend",
    "CpuBackend",
    "DeviceError",
    "Handle",
    "gpu_capable",
    "select_backend",
    "typed_inputs",
    "typed_view",
]

DEVICES = ("auto", "cpu", "cuda")
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


class CpuBackend(Backend):
    """The torch reference kernel, synchronously on the calling thread."""

    name = "cpu"

    def __init__(self) -> None:
        # fp32 scratch reused across chunks so the hot loop allocates nothing; grown on demand.
        self._acc = torch.empty(0, dtype=torch.float32)
        self._tmp = torch.empty(0, dtype=torch.float32)

    def allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def submit(self, task: ChunkTask, inputs: Sequence[torch.Tensor], out: torch.Tensor) -> Handle:
        xs = typed_inputs(task, inputs)
        y = typed_view(out, task.count, task.out_dtype, "out")
        if task.method != "linear":
            from lazymerge import methods

            fp32 = [x if x.dtype == torch.float32 else x.float() for x in xs]
            y.copy_(methods.get(task.method).combine(fp32, task.params or {}, task.stats, task.element_start))
            return None
        if self._acc.numel() < task.count:
            self._acc = torch.empty(task.count, dtype=torch.float32)
            self._tmp = torch.empty(task.count, dtype=torch.float32)
        weights = [s.weight for s in task.sources]
        torch_kernels.linear_combine(xs, weights, y, task.divisor, acc=self._acc, tmp=self._tmp)
        return None

    def wait(self, handle: Handle) -> None:
        return None


# Methods with a fused GPU kernel (lazymerge.kernels.triton_methods), and how many inputs that
# kernel takes (the base model plus 7); everything else runs on the CPU backend.
GPU_METHODS = ("linear", "task_arithmetic", "dare_linear", "dare_ties")
_GPU_METHOD_MAX_INPUTS = 8


def gpu_capable(method: str, n_inputs: int) -> bool:
    """Whether CudaBackend can merge a chunk of `method` with `n_inputs` sources."""
    if method == "linear":
        return True
    return method in GPU_METHODS and 2 <= n_inputs <= _GPU_METHOD_MAX_INPUTS


def select_backend(device: str = "auto") -> tuple[Backend, str]:
    """The backend for `--device auto|cpu|cuda`, and a one-line reason for the run summary.

    auto picks CUDA when torch sees a GPU and the Triton kernels can run there, else CPU.

    Raises:
        DeviceError: `cuda` was asked for but cannot run here, or `device` is not a known name.
    """
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}", hint="use --device auto, cpu or cuda")
    if device == "cpu":
        return CpuBackend(), "cpu: requested"
    has_gpu = torch.cuda.is_available()
    why_not = "no CUDA device" if not has_gpu else _triton_problem()
    if why_not is None:
        from lazymerge.kernels.cuda import CudaBackend  # imports Triton: only when a GPU is there

        backend = CudaBackend("cuda")
        return backend, f"cuda: {torch.cuda.get_device_name(backend.device)} via Triton"
    if device == "cuda":
        raise DeviceError(f"--device cuda: {why_not}")
    return CpuBackend(), f"cpu: {why_not}"


def _triton_problem() -> str | None:
    """Why the compiled Triton path cannot run on the visible GPU, or None when it can."""
    from lazymerge.kernels import triton as lt

    ok, why = lt.available()
    if not ok:
        return f"CUDA device present but Triton unavailable ({why})"
    if lt._INTERPRETED:
        # The interpreter runs on CPU tensors; using it for a real merge would be very slow.
        return "CUDA device present but TRITON_INTERPRET=1 is set"
    return None
