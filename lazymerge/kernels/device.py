"""Device selection: which backend merges a run's chunks (`--device auto|cpu|cuda`).

Whether a method can run on the GPU comes from its declaration (`MergeMethod.gpu`), so there is
one table of GPU-capable methods: the registry. On the CPU, a run whose every method is a
weighted sum (linear, DogeRM...) merges on numpy (`NumpyBackend`) and never imports torch; other
methods use the torch reference kernels (`CpuBackend`). Torch-free until a torch backend is picked.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazymerge import methods
from lazymerge.kernels.base import Backend, DeviceError
from lazymerge.settings import cpu_kernels

if TYPE_CHECKING:
    from lazymerge.plan import MergePlan

__all__ = ["DEVICES", "gpu_capable", "needs_torch", "numpy_capable", "select_backend"]

DEVICES = ("auto", "cpu", "cuda")

# Device nodes of a GPU that torch could use (NVIDIA, AMD ROCm, WSL's GPU bridge). Without any,
# `auto` needs no torch to know that the run stays on the CPU.
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def gpu_capable(method: str, n_inputs: int) -> bool:
    """Whether CudaBackend can merge a chunk of `method` with `n_inputs` sources."""
    return methods.get(method).gpu_capable(n_inputs)


def numpy_capable(plans: Sequence[MergePlan]) -> bool:
    """Whether NumpyBackend can merge every chunk of `plans`: every method is a weighted sum, no
    row is derived (a tokenizer union's mean or zero rows are computed with torch, as mergekit
    does), and LAZYMERGE_CPU_KERNELS does not ask for the torch kernels."""
    return cpu_kernels() != "torch" and all(
        methods.get(t.method).weighted_sum and not any(s.derived for g in t.segments for s in g.sources)
        for p in plans
        for t in p.tensors
        if t.segments
    )


def needs_torch(plans: Sequence[MergePlan], device: str) -> bool:
    """Whether running `plans` on `device` will import torch (a GPU may be used, or a method
    needs the torch kernels). Decided without importing torch."""
    return not numpy_capable(plans) or device == "cuda" or (device == "auto" and _gpu_may_be_present())


def select_backend(device: str = "auto", *, numpy_ok: bool = False) -> tuple[Backend, str]:
    """The backend for `--device auto|cpu|cuda`, and a one-line reason for the run summary.

    auto picks CUDA when torch sees a GPU and the Triton kernels can run there, else CPU. On the
    CPU, `numpy_ok` (every task is a weighted sum: `numpy_capable`) picks the torch-free
    NumpyBackend; otherwise the torch reference kernels.

    Raises:
        DeviceError: `cuda` was asked for but cannot run here, or `device` is not a known name.
    """
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}", hint="use --device auto, cpu or cuda")
    if device == "cpu":
        return _cpu(numpy_ok), "cpu: requested"
    why_not = _gpu_problem(numpy_ok and device == "auto")
    if why_not is None:
        torch = _import_torch("the CUDA backend")

        from lazymerge.kernels.cuda import CudaBackend  # imports Triton: only when a GPU is there

        backend = CudaBackend("cuda")
        return backend, f"cuda: {torch.cuda.get_device_name(backend.device)} via Triton"
    if device == "cuda":
        raise DeviceError(f"--device cuda: {why_not}")
    return _cpu(numpy_ok), f"cpu: {why_not}"


def _cpu(numpy_ok: bool) -> Backend:
    if numpy_ok:
        from lazymerge.kernels.numpy_cpu import NumpyBackend

        return NumpyBackend()
    _import_torch("this merge method")
    from lazymerge.kernels.cpu import CpuBackend

    return CpuBackend()


def _import_torch(who: str) -> Any:
    """torch, or a one-line DeviceError when it is not installed (only numpy merges run then)."""
    try:
        import torch
    except ImportError as exc:
        raise DeviceError(
            f"{who} needs torch, which cannot be imported here ({exc})",
            hint="pip install torch (weighted-sum merges such as linear and DogeRM run on the CPU without it)",
        ) from None
    return torch


def _gpu_may_be_present() -> bool:
    """False when no GPU device node exists or torch or Triton is not installed: then no GPU
    can be used, and asking torch (a 2-3 s import) is not needed to know it."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("triton") is None:
        return False
    return any(Path(node).exists() for node in _GPU_NODES)


def _gpu_problem(avoid_torch: bool) -> str | None:
    """Why the GPU path cannot run here, or None when it can. With `avoid_torch`, the cheap
    checks come first, so that a machine without a GPU never imports torch."""
    if avoid_torch and not _gpu_may_be_present():
        return "no CUDA device"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return _triton_problem()


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
