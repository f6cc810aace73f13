"""The fused task-vector kernel (task_arithmetic, dare_linear, dare_ties) against the CPU methods.

Bit for bit: the CPU backend's result (the registered method on fp32 chunks, stored with torch's
rounding) is the reference. Without CUDA the kernel runs in Triton's interpreter (see
test_kernels_triton.py for why TRITON_INTERPRET is set here); with CUDA the same tests run the
compiled kernel. Through the executor, a `--device cuda` merge of each method must write the
same files as `--device cpu`.
"""

from __future__ import annotations

import importlib
import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

import lazymerge.kernels.triton as lt  # noqa: E402

if not HAS_CUDA and not lt._INTERPRETED:
    lt = importlib.reload(lt)

import lazymerge.kernels.triton_methods as tm  # noqa: E402
from lazymerge import methods  # noqa: E402
from lazymerge.kernels import cpu as kcpu  # noqa: E402
from lazymerge.kernels import cuda as kc  # noqa: E402
from lazymerge.kernels import device as kdev  # noqa: E402
from lazymerge.plan import ChunkTask, Source  # noqa: E402

if lt._INTERPRETED and tm.lt is not lt:
    tm = importlib.reload(tm)  # bind the kernels to the interpreter build of lazymerge.kernels.triton

DEV = "cpu" if lt._INTERPRETED else "cuda"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)
NAME = "model.layers.3.mlp.up_proj.weight"

pytestmark = pytest.mark.skipif(not lt.available()[0], reason=lt.available()[1])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal bit patterns except at NaNs, which must be NaN in both (payloads: see kernels.triton)."""
    got = got.cpu()
    nan = torch.isnan(want.float())
    assert torch.equal(torch.isnan(got.float()), nan), "NaN positions differ"
    diff = (_bits(got) != _bits(want)) & ~nan
    assert not diff.any(), f"{int(diff.sum())} of {diff.numel()} elements differ, first at {int(diff.nonzero()[0])}"


def _values(n: int, dtype: torch.dtype, g: torch.Generator, specials: bool) -> torch.Tensor:
    x = torch.randn(n, generator=g) * torch.tensor([1.0, 1e-3, 30.0, 1e-6])[torch.randint(0, 4, (n,), generator=g)]
    if specials:
        vals = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 2.0**-140, 65504.0, -3e38])
        pick = torch.rand(n, generator=g) < 0.05
        x[pick] = vals[torch.randint(0, len(vals), (int(pick.sum()),), generator=g)]
    return x.to(dtype)


def _reference(method: str, xs: list[torch.Tensor], params: dict, start: int, out_dtype: torch.dtype) -> torch.Tensor:
    # Exactly what CpuBackend does for a method chunk.
    y = torch.empty(xs[0].numel(), dtype=out_dtype)
    y.copy_(methods.get(method).combine([x.float() for x in xs], params, None, start))
    return y


def _params(rng: random.Random, k: int, method: str) -> dict:
    p = {
        "tensor": NAME,
        "weights": [rng.choice([1.0, 0.5, -0.3, 1 / 3, 0.7, 2.0, 1e-3]) for _ in range(k)],
        "normalize": rng.random() < 0.5,
        "lambda": rng.choice([1.0, 0.5, 1.7]),
    }
    if method != "task_arithmetic":
        p["densities"] = [rng.choice([0.0, 0.1, 0.5, 0.9, 1.0, 1 / 3]) for _ in range(k)]
        p["seed"] = rng.randrange(1 << 31)
        p["rescale"] = rng.random() < 0.8
    return p


@pytest.mark.parametrize("method", tm.GPU_METHODS)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_matches_cpu_method(method: str, k: int) -> None:
    rng = random.Random(f"{method}-{k}")
    g = torch.Generator().manual_seed(k)
    for trial in range(3):
        n = rng.choice([1, 7, 1023, 1025, 3000])
        ins = [rng.choice(DTYPES) for _ in range(k + 1)]
        out_dtype = rng.choice(DTYPES)
        xs = [_values(n, d, g, specials=trial == 2) for d in ins]
        params = _params(rng, k, method)
        start = rng.choice([0, 5, 1 << 20, (1 << 33) + 3])
        want = _reference(method, xs, params, start, out_dtype)
        got = torch.empty(n, dtype=out_dtype, device=DEV)
        tm.task_vector_combine(method, [x.to(DEV) for x in xs], params, got, start)
        _assert_same(got, want)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_chunking_does_not_change_the_mask(method: str) -> None:
    # The same tensor merged whole and in three uneven chunks (element_start advancing).
    g = torch.Generator().manual_seed(3)
    n = 5000
    xs = [_values(n, F16, g, specials=False) for _ in range(3)]
    params = _params(random.Random(9), 2, method) | {"densities": [0.3, 0.6]}
    whole = torch.empty(n, dtype=F16, device=DEV)
    tm.task_vector_combine(method, [x.to(DEV) for x in xs], params, whole, 0)
    parts = []
    for a, b in [(0, 1234), (1234, 1235), (1235, n)]:
        part = torch.empty(b - a, dtype=F16, device=DEV)
        tm.task_vector_combine(method, [x[a:b].to(DEV) for x in xs], params, part, a)
        parts.append(part)
    assert torch.equal(_bits(torch.cat(parts).cpu()), _bits(whole.cpu()))
    _assert_same(whole, _reference(method, xs, params, 0, F16))


def test_refuses_what_it_cannot_do() -> None:
    x = torch.zeros(4, device=DEV)
    with pytest.raises(ValueError, match="no GPU kernel"):
        tm.task_vector_combine("ties", [x, x], {"weights": [1.0]}, x.clone(), 0)
    with pytest.raises(ValueError, match=r"1\.\.7 models"):
        tm.task_vector_combine("task_arithmetic", [x] * 9, {"weights": [1.0] * 8}, x.clone(), 0)
    assert not kdev.gpu_capable("ties", 3) and not kdev.gpu_capable("dare_ties", 9)
    assert kdev.gpu_capable("dare_ties", 8) and kdev.gpu_capable("linear", 20)


def test_cuda_backend_runs_method_chunks() -> None:
    # Through CudaBackend's ring and streams (interpreter: synchronous stand-ins), against CpuBackend.
    g = torch.Generator().manual_seed(4)
    n = 3000
    sources = (Source(0, "a", 0, "F16", 1.0), Source(1, "b", 0, "BF16", 1.0), Source(2, "c", 0, "F32", 1.0))
    params = _params(random.Random(2), 2, "dare_ties")
    task = ChunkTask(0, 0, n, "BF16", sources, None, False, "dare_ties", params, NAME, 777)
    ins = [_values(n, d, g, specials=True).view(torch.uint8).clone() for d in (F16, BF16, F32)]
    cpu_out = torch.empty(n * 2, dtype=torch.uint8)
    kcpu.CpuBackend().submit(task, ins, cpu_out)
    with kc.CudaBackend() as cuda:
        host_in = [cuda.allocate(x.numel()) for x in ins]
        for h, x in zip(host_in, ins, strict=True):
            h.copy_(x)
        out = cuda.allocate(n * 2)
        cuda.wait(cuda.submit(task, host_in, out))
    _assert_same(out.view(BF16), cpu_out.view(BF16))


@pytest.mark.parametrize("method", tm.GPU_METHODS)
def test_device_cuda_merge_equals_cpu_merge(method: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A whole merge through the executor. Without a GPU, "cuda" is the interpreter-backed
    # CudaBackend (select_backend rightly refuses cuda there, so it is swapped in here).
    from conftest import write_model

    from lazymerge import api
    from lazymerge import execute as ex

    g = torch.Generator().manual_seed(5)
    shapes = {"model.embed_tokens.weight": (8, 6), NAME: (6, 10), "model.norm.weight": (6,)}
    folders = []
    for i in range(3):
        tensors = {k: (torch.randn(s, generator=g) * 0.02).to(F16) for k, s in shapes.items()}
        folders.append(write_model(tmp_path / f"m{i}", tensors))
    density = ", density: 0.5" if method != "task_arithmetic" else ""
    models = "".join(
        f"  - model: {f}\n    parameters: {{weight: {w}{density}}}\n"
        for f, w in zip(folders[1:], (0.6, 0.9), strict=True)
    )
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"merge_method: {method}\nbase_model: {folders[0]}\ndtype: float32\nout_dtype: bfloat16\nmodels:\n{models}"
    )
    if not HAS_CUDA:
        real = ex.select_backend
        monkeypatch.setattr(
            ex,
            "select_backend",
            lambda d="auto", **kw: (kc.CudaBackend(), "cuda: interpreter") if d == "cuda" else real(d, **kw),
        )
    outs = {}
    for dev in ("cpu", "cuda"):
        outs[dev] = tmp_path / f"out-{dev}"
        stats = api.merge(config, outs[dev], device=dev, chunk_elements=7)
        assert stats.device.startswith(dev)
    for f in sorted(outs["cpu"].glob("*.safetensors")):
        assert f.read_bytes() == (outs["cuda"] / f.name).read_bytes()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_large_dare_ties_chunk() -> None:
    g = torch.Generator().manual_seed(8)
    n = 1 << 21
    xs = [_values(n, d, g, specials=False) for d in (BF16, BF16, F16, F32, BF16)]
    params = _params(random.Random(5), 4, "dare_ties") | {"normalize": True, "rescale": True}
    for out_dtype in DTYPES:
        got = torch.empty(n, dtype=out_dtype, device="cuda")
        tm.task_vector_combine("dare_ties", [x.cuda() for x in xs], params, got, 1 << 22)
        _assert_same(got, _reference("dare_ties", xs, params, 1 << 22, out_dtype))
