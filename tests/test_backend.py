"""Compute backends: CudaBackend (GPU, or Triton's interpreter on CPU) against CpuBackend, bit for bit.

Without CUDA the CudaBackend runs its whole ring/stream/event logic with no-op stand-ins and the
Triton interpreter, so TRITON_INTERPRET must be set before `lazymerge.kernels.triton` is first
imported (the module is reloaded if something imported it earlier), as in test_kernels_triton.
"""

from __future__ import annotations

import importlib
import os
import random
from collections import deque
from dataclasses import dataclass

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

import lazymerge.kernels.triton as lt  # noqa: E402
from lazymerge.constants import DTYPE_SIZES  # noqa: E402
from lazymerge.errors import LazyMergeError  # noqa: E402
from lazymerge.kernels import base as bk  # noqa: E402
from lazymerge.kernels import cpu as kcpu  # noqa: E402
from lazymerge.kernels import cuda as kc  # noqa: E402
from lazymerge.kernels import device as kdev  # noqa: E402
from lazymerge.plan import ChunkTask, Source  # noqa: E402

if not HAS_CUDA and not lt._INTERPRETED:
    lt = importlib.reload(lt)  # imported earlier without the interpreter: rebuild the kernels

needs_triton = pytest.mark.skipif(not lt.available()[0], reason=lt.available()[1])
TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
NAMES = tuple(TORCH)
WEIGHTS = (0.3, 0.7, 1.0, -0.25, 1 / 3, -1.7, 2.0**-130, 0.1)
CAPACITY_ELEMENTS = 9000  # > 2 Triton blocks, so odd tails and several programs are exercised


def _task(rng: random.Random, max_count: int, n_inputs: int | None = None) -> ChunkTask:
    """A random mergeable chunk: mixed input dtypes, 1..4 inputs, divisor or not, odd sizes."""
    k = n_inputs if n_inputs is not None else rng.randint(1, 4)
    count = rng.choice([1, 2, 7, 1023, 4095, 4097, rng.randint(1, max_count), max_count])
    sources = tuple(
        Source(j, f"input-{j}.safetensors", rng.randrange(0, 1 << 30, 2), rng.choice(NAMES), rng.choice(WEIGHTS))
        for j in range(k)
    )
    divisor = rng.choice([None, None, 3.0, 0.7])
    return ChunkTask(0, rng.randrange(0, 1 << 30), count, rng.choice(NAMES), sources, divisor, copy=False)


def _fill(buf: torch.Tensor, task: ChunkTask, j: int, g: torch.Generator) -> None:
    """Random values of source j's dtype into the first bytes of a uint8 buffer."""
    src = task.sources[j]
    scale = torch.tensor([1.0, 1e-3, 100.0, 6e4])[torch.randint(0, 4, (task.count,), generator=g)]
    vals = (torch.randn(task.count, generator=g) * scale).to(TORCH[src.dtype])
    vals[torch.rand(task.count, generator=g) < 0.01] = float("inf")  # specials pass through too
    buf[: task.count * DTYPE_SIZES[src.dtype]].copy_(vals.view(torch.uint8))


def _assert_same(got: torch.Tensor, want: torch.Tensor, task: ChunkTask) -> None:
    """Byte-identical, except that a NaN only has to be a NaN: NaN sign and payload are not part of
    the kernels' contract (see lazymerge.kernels.triton); inf - inf makes some here."""
    if torch.equal(got, want):
        return
    dtype = TORCH[task.out_dtype]
    g, w = got.view(dtype), want.view(dtype)
    width = torch.int32 if dtype == torch.float32 else torch.int16
    differ = g.view(width) != w.view(width)
    both_nan = torch.isnan(g.float()) & torch.isnan(w.float())
    bad = differ & ~both_nan
    if bad.any():
        i = int(bad.nonzero()[0])
        pytest.fail(f"{task}: {int(bad.sum())} elements differ, first at {i}: got {g[i]}, want {w[i]}")


@dataclass
class _HostSlot:
    inputs: list[torch.Tensor]
    out: torch.Tensor


def _slots(backend: bk.Backend, n: int, n_inputs: int) -> list[_HostSlot]:
    cap = CAPACITY_ELEMENTS * 4
    return [_HostSlot([backend.allocate(cap) for _ in range(n_inputs)], backend.allocate(cap)) for _ in range(n)]


def _cuda_backend(**kw: object) -> kc.CudaBackend:
    return kc.CudaBackend(**kw)  # type: ignore[arg-type]


def _run_fifo(cuda: bk.Backend, tasks: list[ChunkTask], n_slots: int, seed: int) -> None:
    """Submit every task to `cuda` through a small pool of reused host slots (waits in FIFO order)
    and compare each result with CpuBackend's, byte for byte."""
    cpu = kcpu.CpuBackend()
    n_inputs = max(len(t.sources) for t in tasks)
    free = _slots(cuda, n_slots, n_inputs)
    ref = _slots(cpu, 1, n_inputs)[0]
    g = torch.Generator().manual_seed(seed)
    in_flight: deque[tuple[object, _HostSlot, ChunkTask, torch.Tensor]] = deque()

    def retire() -> None:
        handle, slot, task, want = in_flight.popleft()
        cuda.wait(handle)
        _assert_same(slot.out[: task.out_nbytes], want, task)
        free.append(slot)

    for task in tasks:
        if not free:
            retire()
        slot = free.pop()
        # Scribble over the whole slot first: a backend that read stale or out-of-range bytes,
        # or wrote its result late, would show up as a mismatch.
        for buf in (*slot.inputs, slot.out):
            buf.fill_(0xA5)
        for j in range(len(task.sources)):
            _fill(slot.inputs[j], task, j, g)
            ref.inputs[j].copy_(slot.inputs[j])
        assert cpu.wait(cpu.submit(task, ref.inputs[: len(task.sources)], ref.out)) is None
        want = ref.out[: task.out_nbytes].clone()
        in_flight.append((cuda.submit(task, slot.inputs[: len(task.sources)], slot.out), slot, task, want))
    while in_flight:
        retire()


@needs_triton
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_cuda_backend_matches_cpu_backend(seed: int) -> None:
    rng = random.Random(seed)
    tasks = [_task(rng, CAPACITY_ELEMENTS) for _ in range(24)]
    backend = _cuda_backend(depth=2 + seed % 2)
    try:
        # More host slots than ring entries: the ring wraps while earlier chunks are in flight.
        _run_fifo(backend, tasks, n_slots=4, seed=seed)
    finally:
        backend.close()


@needs_triton
def test_unpipelined_and_env_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kc.SYNC_ENV, "1")
    assert not _cuda_backend().pipelined
    monkeypatch.delenv(kc.SYNC_ENV)
    assert _cuda_backend().pipelined
    rng = random.Random(7)
    with _cuda_backend(pipelined=False, depth=2) as backend:
        _run_fifo(backend, [_task(rng, CAPACITY_ELEMENTS) for _ in range(8)], n_slots=2, seed=7)


@needs_triton
def test_more_inputs_than_one_launch() -> None:
    # Nine inputs need the fp32 carry buffer the ring entry allocates on demand.
    rng = random.Random(9)
    tasks = [_task(rng, CAPACITY_ELEMENTS, n_inputs=9) for _ in range(3)]
    with _cuda_backend(depth=2) as backend:
        _run_fifo(backend, tasks, n_slots=2, seed=9)


@needs_triton
def test_device_buffers_grow_beyond_allocate_capacity() -> None:
    # A caller with its own (larger) buffers still works: the ring entries grow to fit.
    rng = random.Random(3)
    backend = _cuda_backend(depth=2)
    small = _task(rng, 10, n_inputs=2)
    big = ChunkTask(0, 0, 8000, "F32", small.sources, None, copy=False)
    _run_fifo(backend, [small, big, small, big], n_slots=1, seed=3)
    backend.close()


def test_cpu_backend_rejects_bad_buffers() -> None:
    cpu = kcpu.CpuBackend()
    task = ChunkTask(0, 0, 10, "F16", (Source(0, "f", 0, "F32", 1.0),), None, copy=False)
    with pytest.raises(ValueError, match="at least 40 bytes"):
        cpu.submit(task, [torch.empty(39, dtype=torch.uint8)], torch.empty(20, dtype=torch.uint8))
    with pytest.raises(ValueError, match="sources"):
        cpu.submit(task, [], torch.empty(20, dtype=torch.uint8))
    copy = ChunkTask(0, 0, 10, "F16", (Source(0, "f", 0, "F16", 1.0),), None, copy=True)
    with pytest.raises(ValueError, match="copy"):
        cpu.submit(copy, [torch.empty(20, dtype=torch.uint8)], torch.empty(20, dtype=torch.uint8))
    assert cpu.name == "cpu"
    buf = cpu.allocate(12)
    assert buf.dtype == torch.uint8 and buf.numel() == 12 and buf.device.type == "cpu"


def test_select_cpu() -> None:
    backend, why = kdev.select_backend("cpu")
    assert isinstance(backend, kcpu.CpuBackend) and backend.name == "cpu"
    assert why == "cpu: requested"


def test_select_auto() -> None:
    backend, why = kdev.select_backend("auto")
    if HAS_CUDA and lt.available()[0] and not lt._INTERPRETED:
        assert backend.name == "cuda" and why.startswith("cuda: ") and why.endswith(" via Triton")
        backend.close()
    else:
        assert isinstance(backend, kcpu.CpuBackend)
        assert why.startswith("cpu: ") and "\n" not in why
        if not HAS_CUDA:
            assert why == "cpu: no CUDA device"


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised without CUDA")
def test_select_cuda_without_gpu_is_a_clean_error() -> None:
    with pytest.raises(bk.DeviceError) as info:
        kdev.select_backend("cuda")
    err = info.value
    assert isinstance(err, LazyMergeError) and isinstance(err, RuntimeError)
    assert "\n" not in str(err) and "no CUDA device" in str(err)
    assert err.hint and "--device" in err.hint


def test_select_unknown_device() -> None:
    with pytest.raises(bk.DeviceError, match="unknown device"):
        kdev.select_backend("tpu")


@needs_triton
@pytest.mark.skipif(HAS_CUDA, reason="interpreter mode only")
def test_interpreter_backend_refuses_cuda_device() -> None:
    with pytest.raises(bk.DeviceError, match="cpu tensors"):
        kc.CudaBackend("cuda")
    with pytest.raises(ValueError, match="depth"):
        kc.CudaBackend(depth=1)


# -- on a GPU ----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_buffers_pinned_and_memory_bounded() -> None:
    with kc.CudaBackend("cuda", depth=2) as backend:
        assert backend.device.type == "cuda"
        buf = backend.allocate(CAPACITY_ELEMENTS * 4)
        assert buf.is_pinned() and buf.device.type == "cpu"
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        rng = random.Random(11)
        # Many chunks of full size through 3 host slots: device memory stays at the ring's size.
        tasks = [_task(rng, CAPACITY_ELEMENTS, n_inputs=4) for _ in range(40)]
        _run_fifo(backend, tasks, n_slots=3, seed=11)
        grown = torch.cuda.memory_allocated() - before
        assert grown <= 2 * (4 + 1) * CAPACITY_ELEMENTS * 4 * 1.1 + (1 << 20)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_large_chunks_many_in_flight() -> None:
    # Chunks the executor's default size, ring depth 3, six host slots: real overlap on streams.
    n = 2 * 1024 * 1024
    cpu = kcpu.CpuBackend()
    with kc.CudaBackend("cuda") as backend:
        g = torch.Generator().manual_seed(5)
        sources = (Source(0, "a", 0, "F16", 0.7), Source(1, "b", 0, "F32", 0.3))
        task = ChunkTask(0, 0, n, "BF16", sources, None, copy=False)
        slots = [([backend.allocate(n * 4), backend.allocate(n * 4)], backend.allocate(n * 2)) for _ in range(6)]
        pending = []
        for ins, out in slots:
            _fill(ins[0], task, 0, g)
            _fill(ins[1], task, 1, g)
            pending.append((backend.submit(task, ins, out), ins, out))
        for handle, ins, out in pending:
            backend.wait(handle)
            want = torch.empty(n * 2, dtype=torch.uint8)
            cpu.submit(task, ins, want)
            _assert_same(out, want, task)
