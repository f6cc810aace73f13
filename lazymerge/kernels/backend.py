"""Compute backends for the executor: where a chunk is merged, behind one small interface.

The executor's three stages stay the same on every backend: the reader fills host byte buffers,
the compute stage hands a filled chunk to `Backend.submit`, and the writer calls
`Backend.wait(handle)` before it writes the output buffer. What differs:

- `CpuBackend` merges synchronously with the torch reference kernel; `wait` has nothing to do.
- `CudaBackend` keeps a small ring of device buffers. `submit` only enqueues work and returns:
  the inputs go host -> device on an H2D stream, the fused Triton kernel runs on a compute
  stream once they have landed, and the result goes device -> host into the caller's pinned
  `out` buffer on a D2H stream; an event recorded after that copy is the handle. Two copy
  streams (not one) so the upload of chunk k+1 is not queued behind the download of chunk k:
  the copy engines work both directions at once. GPU memory is ring depth x (inputs + 1) x
  the buffer capacity, whatever the tensor or model size.

Buffer contract (both backends): the host buffers passed to `submit` belong to the backend
until `wait(handle)` returns; only then may the caller refill the inputs or read `out`.

Under `TRITON_INTERPRET=1` without CUDA, `CudaBackend` runs the same code on device "cpu" with
no-op streams and events and unpinned buffers, so its bookkeeping is testable in CI.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lazymerge.constants import DTYPE_SIZES
from lazymerge.errors import LazyMergeError
from lazymerge.kernels import torch as torch_kernels
from lazymerge.plan import ChunkTask

__all__ = [
    "DEVICES",
    "GPU_METHODS",
    "SYNC_ENV",
    "Backend",
    "CpuBackend",
    "CudaBackend",
    "DeviceError",
    "Handle",
    "gpu_capable",
    "select_backend",
]

DEVICES = ("auto", "cpu", "cuda")
# Diagnostics knob: "1" makes CudaBackend wait for each chunk inside `submit` (no overlap of
# uploads, kernel and downloads with the host stages). gpu_check.py uses it for "pipeline off".
SYNC_ENV = "LAZYMERGE_CUDA_SYNC"

_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Ring depth: chunks whose device work may be in flight at once. Two is double buffering
# (upload k+1 while k computes / downloads); three also covers a download lagging behind.
_DEFAULT_DEPTH = 3

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


def _typed(buf: torch.Tensor, count: int, dtype: str, what: str) -> torch.Tensor:
    """The first `count` elements of a uint8 buffer, viewed as `dtype` (no copy)."""
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"{what}: dtype {dtype} is not mergeable (F32, F16, BF16)")
    nbytes = count * DTYPE_SIZES[dtype]
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < nbytes:
        raise ValueError(
            f"{what}: need a 1-D uint8 buffer of at least {nbytes} bytes, got {buf.dtype} {tuple(buf.shape)}"
        )
    return buf[:nbytes].view(_TORCH_DTYPES[dtype])


def _typed_inputs(task: ChunkTask, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Checked typed views of the input buffers, one per source of `task`."""
    if task.copy:
        raise ValueError("copy tasks are byte copies; they never reach a compute backend")
    if len(inputs) != len(task.sources):
        raise ValueError(f"task has {len(task.sources)} sources but {len(inputs)} input buffers were given")
    return [
        _typed(buf, task.count, src.dtype, f"inputs[{j}]")
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
        xs = _typed_inputs(task, inputs)
        y = _typed(out, task.count, task.out_dtype, "out")
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


# -- CUDA --------------------------------------------------------------------------------------


class _NoStream:
    """Stand-in for torch.cuda.Stream on the interpreter path: work runs synchronously."""

    def wait_event(self, event: object) -> None:
        return None

    def synchronize(self) -> None:
        return None


class _NoEvent:
    """Stand-in for torch.cuda.Event: already complete when recorded."""

    def record(self, stream: object = None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


@dataclass
class _RingEntry:
    """Device buffers for one chunk in flight, and the events that guard their reuse."""

    inputs: list[torch.Tensor] = field(default_factory=list)  # uint8 device buffers, one per source
    out: torch.Tensor | None = None  # uint8 device buffer
    acc: torch.Tensor | None = None  # fp32 scratch, only for more than MAX_INPUTS inputs
    kernel_done: Any = None  # last kernel that read `inputs` / wrote `out`
    d2h_done: Any = None  # last download that read `out`


class CudaBackend(Backend):
    """The fused Triton kernel on a GPU, overlapped with host<->device copies.

    Args:
        device: "cuda" / "cuda:N"; "cpu" only under TRITON_INTERPRET=1 (testing). Default: the
            current CUDA device, else "cpu" when the interpreter is active.
        depth: ring depth (device buffer sets), at least 2.
        pipelined: False waits for every chunk inside `submit` (a baseline for benchmarks).
            Default: on, unless the environment variable LAZYMERGE_CUDA_SYNC is "1".

    Raises:
        DeviceError: no usable CUDA device / Triton.
    """

    name = "cuda"

    def __init__(
        self, device: str | torch.device | None = None, *, depth: int = _DEFAULT_DEPTH, pipelined: bool | None = None
    ) -> None:
        from lazymerge.kernels import triton as lt  # late: TRITON_INTERPRET is read at its import

        self._lt = lt
        ok, why = lt.available()
        if not ok:
            raise DeviceError(f"the CUDA backend cannot run: {why}")
        if device is None:
            device = "cpu" if lt._INTERPRETED else "cuda"
        self.device = torch.device(device)
        # The interpreter runs on CPU tensors only, compiled Triton on CUDA tensors only.
        want = "cpu" if lt._INTERPRETED else "cuda"
        if self.device.type != want:
            raise DeviceError(f"the Triton kernels run on {want} tensors in this process, not on {self.device}")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if depth < 2:
            raise ValueError("depth must be at least 2 (double buffering)")
        self.pipelined = os.environ.get(SYNC_ENV) != "1" if pipelined is None else pipelined
        self._real = self.device.type == "cuda"
        if self._real:
            with torch.cuda.device(self.device):
                self._h2d: Any = torch.cuda.Stream(self.device)
                self._compute: Any = torch.cuda.Stream(self.device)
                self._d2h: Any = torch.cuda.Stream(self.device)
        else:
            self._h2d = self._compute = self._d2h = _NoStream()
        self._ring = [_RingEntry() for _ in range(depth)]
        self._next = 0
        # Device buffers are sized to the largest host buffer handed out, so in the executor
        # they are allocated once (first use) and never grow.
        self._capacity = 0

    # -- stand-ins that keep one code path for GPU and interpreter ---------------------------
    def _event(self) -> Any:
        # blocking=True: the writer thread sleeps in wait() instead of spinning a core that the
        # reader's memcpy from the page cache could use.
        return torch.cuda.Event(blocking=True) if self._real else _NoEvent()

    def _on(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        # Triton launches on torch's current stream, so the context also places the kernel.
        return torch.cuda.stream(stream) if self._real else contextlib.nullcontext()

    def _device_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(max(nbytes, self._capacity), dtype=torch.uint8, device=self.device)

    # -- Backend -----------------------------------------------------------------------------
    def allocate(self, nbytes: int) -> torch.Tensor:
        self._capacity = max(self._capacity, nbytes)
        # Pinned pages let the copy engines DMA straight from / to the buffer, asynchronously;
        # from pageable memory a "non_blocking" copy would be staged and synchronous.
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._real)

    def submit(self, task: ChunkTask, inputs: Sequence[torch.Tensor], out: torch.Tensor) -> Handle:
        if not gpu_capable(task.method, len(task.sources)):
            raise DeviceError(
                f"merge method {task.method!r} with {len(task.sources)} inputs runs on the CPU backend only",
                hint="use --device cpu or --device auto",
            )
        host_in = _typed_inputs(task, inputs)
        host_out = _typed(out, task.count, task.out_dtype, "out")
        entry = self._ring[self._next]
        self._next = (self._next + 1) % len(self._ring)
        self._fit(entry, task, len(host_in))

        # 1. Uploads. The entry's input buffers were last read by its previous kernel: wait for it
        #    on the device (stream order), not on the host.
        dev_in = [entry.inputs[j][: x.numel() * x.element_size()].view(x.dtype) for j, x in enumerate(host_in)]
        uploaded = self._event()
        with self._on(self._h2d):
            if entry.kernel_done is not None:
                self._h2d.wait_event(entry.kernel_done)
            for d, x in zip(dev_in, host_in, strict=True):
                d.copy_(x, non_blocking=True)
            uploaded.record(self._h2d)

        # 2. Kernel, once the uploads landed and the previous download of this entry's output
        #    buffer has finished reading it.
        assert entry.out is not None
        dev_out = entry.out[: host_out.numel() * host_out.element_size()].view(host_out.dtype)
        computed = self._event()
        with self._on(self._compute):
            self._compute.wait_event(uploaded)
            if entry.d2h_done is not None:
                self._compute.wait_event(entry.d2h_done)
            if task.method == "linear":
                weights = [s.weight for s in task.sources]
                self._lt.linear_combine(dev_in, weights, dev_out, task.divisor, acc=entry.acc)
            else:
                from lazymerge.kernels.triton_methods import task_vector_combine

                task_vector_combine(task.method, dev_in, task.params or {}, dev_out, task.element_start)
            computed.record(self._compute)

        # 3. Download into the caller's pinned buffer. Its completion implies the uploads (and so
        #    every read of the host inputs) are done too: one event covers the whole contract.
        downloaded = self._event()
        with self._on(self._d2h):
            self._d2h.wait_event(computed)
            host_out.copy_(dev_out, non_blocking=True)
            downloaded.record(self._d2h)

        # Fresh events per chunk: the handle stays tied to this chunk even after the ring wraps.
        entry.kernel_done = computed
        entry.d2h_done = downloaded
        if not self.pipelined:
            downloaded.synchronize()
        return downloaded

    def wait(self, handle: Handle) -> None:
        if handle is not None:
            handle.synchronize()

    def close(self) -> None:
        # Everything enqueued on our streams, including work of a submit that raised halfway,
        # must finish before device buffers are freed or the caller frees its pinned buffers.
        for stream in (self._h2d, self._compute, self._d2h):
            stream.synchronize()
        self._ring = [_RingEntry() for _ in self._ring]

    # -- helpers -----------------------------------------------------------------------------
    def _fit(self, entry: _RingEntry, task: ChunkTask, n_inputs: int) -> None:
        """Make sure the entry's device buffers can hold this chunk (grow only)."""
        in_bytes = max(task.count * DTYPE_SIZES[s.dtype] for s in task.sources)
        out_bytes = task.out_nbytes
        grow_in = any(b.numel() < in_bytes for b in entry.inputs[:n_inputs])
        grow_out = entry.out is None or entry.out.numel() < out_bytes
        need_acc = n_inputs > self._lt.MAX_INPUTS and (entry.acc is None or entry.acc.numel() < task.count)
        if grow_in or grow_out or need_acc:
            # Buffers about to be replaced may still be in use by queued device work; freeing
            # them early could hand their memory to another stream. Rare (first chunks only).
            if entry.d2h_done is not None:
                entry.d2h_done.synchronize()
        if grow_in:
            entry.inputs = [self._device_buffer(in_bytes) for _ in entry.inputs]
        while len(entry.inputs) < n_inputs:
            entry.inputs.append(self._device_buffer(in_bytes))
        if grow_out:
            entry.out = self._device_buffer(out_bytes)
        if need_acc:
            entry.acc = torch.empty(max(task.count, self._capacity // 4), dtype=torch.float32, device=self.device)


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
