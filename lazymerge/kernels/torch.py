"""Reference chunk kernels on torch, and the typed views of byte buffers the torch backends use. The Triton kernels must agree with these bit for bit.

Arithmetic contract (every backend): each input is widened to fp32 (exact for F16/BF16), then
    acc = x0 * w0;  acc = acc + xi * wi  (i = 1..n-1, in order);  if divisor: acc = acc / divisor
with every multiply, add and divide rounded to fp32 on its own (no fused multiply-add), and the
result stored in the output dtype with round-to-nearest-even. torch's add with `alpha` may fuse
on CPU, so the multiply and the add are separate calls here.

A method declared `accumulation="fused"` (mergekit's `linear`) instead accumulates
`acc = fma(xi, wi, acc)` from +0, one rounding each, as mergekit's `addcmul_` does on AVX2 and
AVX-512 CPUs. torch's own `addcmul_` is not fused in its non-vector build
(`ATEN_CPU_CAPABILITY=default`), so this path runs the exact numpy emulation
(`lazymerge.kernels.fused_sum`) on views of the same memory: one implementation, the same bytes
on every machine.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lazymerge.constants import DTYPE_SIZES
from lazymerge.plan import ChunkTask

# Elements per inner block: 256 Ki fp32 = 1 MiB of accumulator, small enough for L2.
BLOCK = 256 * 1024


def linear_combine(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    out: torch.Tensor,
    divisor: float | None = None,
    *,
    acc: torch.Tensor | None = None,
    tmp: torch.Tensor | None = None,
    accumulation: str = "rounded",
    block: int = BLOCK,
) -> torch.Tensor:
    """Weighted sum of 1-D chunks into `out` (fp32 accumulation, round-to-nearest-even store).

    Args:
        inputs: 1-D tensors of equal length, each F32, F16 or BF16.
        weights: one Python float per input (used as an fp32 scalar).
        out: 1-D destination of the same length, F32, F16 or BF16.
        divisor: when given, the sum is divided by it (mergekit's `normalize`).
        acc, tmp: optional fp32 scratch buffers of at least the chunk length, reused across calls
            so the hot loop allocates nothing.
        accumulation: "rounded" (the contract above) or "fused" (`acc = fma(xi, wi, acc)` from
            +0, mergekit's `addcmul_`); see `lazymerge.methods.ACCUMULATIONS`.
        block: elements per inner block (the results do not depend on it).

    Returns:
        `out`.
    """
    n = out.numel()
    if len(inputs) != len(weights) or not inputs:
        raise ValueError("need one weight per input and at least one input")
    if accumulation == "fused":
        return _fused_on_numpy(inputs, weights, out, divisor)
    if accumulation != "rounded":
        raise ValueError(f"accumulation must be 'rounded' or 'fused', got {accumulation!r}")
    acc = _scratch(acc, min(n, block))
    tmp = _scratch(tmp, min(n, block))
    # A 1-element fp32 weight (not a 0-d one) makes type promotion widen the F16/BF16 input to
    # fp32 inside the multiply: conversion and multiply in one pass, one rounding, exact widening.
    ws = [_f32(w) for w in weights]
    div = _f32(divisor) if divisor is not None else None
    # Blocks that fit in L2 keep the four passes in cache: twice the speed of whole-chunk passes
    # on a memory-bound machine, with identical results (every operation is elementwise).
    for start in range(0, n, block):
        stop = min(start + block, n)
        a, t = acc[: stop - start], tmp[: stop - start]
        _weighted(inputs[0][start:stop], ws[0], a)
        for x, w in zip(inputs[1:], ws[1:], strict=True):
            _weighted(x[start:stop], w, t)
            a.add_(t)
        if div is not None:
            a.div_(div)
        out[start:stop].copy_(a)  # torch's F32 -> F16/BF16 conversion rounds to nearest even
    return out


_NUMPY_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_local = threading.local()  # one numpy scratch per worker thread


def _fused_on_numpy(
    inputs: Sequence[torch.Tensor], weights: Sequence[float], out: torch.Tensor, divisor: float | None
) -> torch.Tensor:
    """The fused accumulation by the numpy kernel, on numpy views of the tensors' memory."""
    from lazymerge.kernels import numpy_cpu  # torch-free, imports nothing of ours back

    for t in (out, *inputs):
        if t.device.type != "cpu" or t.dtype not in _NUMPY_DTYPES or not t.is_contiguous():
            raise ValueError(f"the fused accumulation needs contiguous CPU F32/F16/BF16 tensors, got {t.dtype}")
    scratch = getattr(_local, "scratch", None)
    if scratch is None:
        _local.scratch = scratch = numpy_cpu.Scratch()
    numpy_cpu.linear_combine(
        [_as_numpy(x) for x in inputs],
        weights,
        _as_numpy(out),
        _NUMPY_DTYPES[out.dtype],
        divisor,
        scratch=scratch,
        accumulation="fused",
    )
    return out


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    # numpy has no bf16: its patterns are viewed as uint16, as NumpyBackend's buffers are.
    flat = t.reshape(-1)
    if t.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def _weighted(x: torch.Tensor, w: torch.Tensor, dst: torch.Tensor) -> None:
    """dst = fp32(x) * w, without temporaries.

    `torch.mul(x_fp16, w, out=dst)` would widen x into a fresh buffer on every call (1 MB per
    block here, above glibc's mmap threshold): measured 2.1 M page faults and ~6 s of system
    time on the 1B pair. Widening into `dst` first and multiplying in place is the same
    arithmetic (widening is exact), with no allocation.
    """
    if x.dtype == torch.float32:
        torch.mul(x, w, out=dst)
    else:
        dst.copy_(x)
        dst.mul_(w)


def _f32(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32)


def _scratch(buf: torch.Tensor | None, n: int) -> torch.Tensor:
    if buf is None:
        return torch.empty(n, dtype=torch.float32)
    return buf[:n]


TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """torch with one intra-op thread, restored after: the executor's workers are the parallelism."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
