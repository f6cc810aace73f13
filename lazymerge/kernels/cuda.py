"""The CUDA backend: the fused Triton kernel on a GPU, overlapped with host<->device copies.

`CudaBackend` keeps a small ring of device buffers. `submit` only enqueues work and returns:
the inputs go host -> device on an H2D stream, the fused Triton kernel runs on a compute stream
once they have landed, and the result goes device -> host into the caller's pinned `out` buffer
on a D2H stream; an event recorded after that copy is the handle. Two copy streams (not one) so
the upload of chunk k+1 is not queued behind the download of chunk k: the copy engines work both
directions at once. GPU memory is ring depth x (inputs + 1) x the buffer capacity, whatever the
tensor or model size. The buffer contract is `lazymerge.kernels.base`'s.

Under `TRITON_INTERPRET=1` without CUDA, `CudaBackend` runs the same code on device "cpu" with
no-op streams and events and unpinned buffers, so its bookkeeping is testable in CI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lazymerge import methods
from lazymerge.constants import DTYPE_SIZES
from lazymerge.kernels.base import Backend, DeviceError, Handle
from lazymerge.kernels.torch import typed_inputs, typed_view
from lazymerge.plan import ChunkTask
from lazymerge.settings import CUDA_SYNC_ENV, cuda_sync

__all__ = ["SYNC_ENV", "CudaBackend"]

# Diagnostics knob: "1" makes CudaBackend wait for each chunk inside `submit` (no overlap of
# uploads, kernel and downloads with the host stages). gpu_check.py uses it for "pipeline off".
SYNC_ENV = CUDA_SYNC_ENV  # the name tests and benchmarks set

# Ring depth: chunks whose device work may be in flight at once. Two is double buffering
# (upload k+1 while k computes / downloads); three also covers a download lagging behind.
_DEFAULT_DEPTH = 3


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
        self.pipelined = not cuda_sync() if pipelined is None else pipelined
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
        method = methods.get(task.method)
        if not method.gpu_capable(len(task.sources)):
            raise DeviceError(
                f"merge method {task.method!r} with {len(task.sources)} inputs runs on the CPU backend only",
                hint="use --device cpu or --device auto",
            )
        host_in = typed_inputs(task, inputs)
        host_out = typed_view(out, task.count, task.out_dtype, "out")
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
            kernel = method.gpu_kernel
            if method.weighted_sum:  # the sources' weights and divisor, any number of inputs
                weights = [s.weight for s in task.sources]
                kernel(dev_in, weights, dev_out, task.divisor, acc=entry.acc, accumulation=method.accumulation)
            else:
                kernel(task.method, dev_in, task.params or {}, dev_out, task.element_start)
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
