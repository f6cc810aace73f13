"""Device selection: which backend merges a run's chunks (`--device auto|cpu|cuda`).

Whether a method can run on the GPU comes from its declaration (`MergeMethod.gpu`), so there is
one table of GPU-capable methods: the registry.
"""

from __future__ import annotations

import torch

from lazymerge import methods
from lazymerge.kernels.base import Backend, DeviceError
from lazymerge.kernels.cpu import CpuBackend

__all__ = ["DEVICES", "gpu_capable", "select_backend"]

DEVICES = ("auto", "cpu", "cuda")


def gpu_capable(method: str, n_inputs: int) -> bool:
    """Whether CudaBackend can merge a chunk of `method` with `n_inputs` sources."""
    return methods.get(method).gpu_capable(n_inputs)


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
