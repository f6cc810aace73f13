"""`linear` accumulates as mergekit does: `result.addcmul_(x, w)`, which torch's AVX2/AVX-512 CPU
kernels fuse (one rounding of `acc + x * w`, from +0). lazymerge declares it on the method
(`accumulation="fused"`) and every backend follows: numpy (an exact float64 emulation), torch
CPU (the same emulation on views) and Triton (`fma.rn.f32` on CUDA, the interpreter's true fma).
DogeRM and the other internal weighted sums keep rounding product and sum apart.

Oracles: libm's `fmaf` (correctly rounded), mergekit's own `linear` in-process, `mergekit-yaml`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before lazymerge.kernels.triton is imported (test_backend.py)

import lazymerge
from lazymerge import methods
from lazymerge.errors import RecipeError
from lazymerge.kernels import numpy_cpu
from lazymerge.kernels import torch as torch_kernels
from lazymerge.kernels.fused_sum import fma_into
from lazymerge.tiny_models import build_llama

_LIBM = ctypes.util.find_library("m")
needs_libm = pytest.mark.skipif(_LIBM is None, reason="no C math library to take fmaf from")
TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _fmaf():
    libm = ctypes.CDLL(_LIBM)
    libm.fmaf.restype = ctypes.c_float
    libm.fmaf.argtypes = [ctypes.c_float] * 3
    return libm.fmaf


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32)


# -- the emulated fma against libm ---------------------------------------------------------------


@needs_libm
@pytest.mark.parametrize("kind", ["patterns", "magnitudes"])
def test_fma_into_is_libm_fmaf(kind: str) -> None:
    fmaf = _fmaf()
    rng = np.random.default_rng(1 if kind == "patterns" else 2)
    n = 4000
    for w in (0.3, 0.6, -0.7, 1 / 3, 0.3 * 2.0**-60, 1e30, float(rng.standard_normal())):
        if kind == "patterns":  # every class: zeros, subnormals, inf, NaN
            x = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
            a = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
        else:
            x = (rng.standard_normal(n) * 2.0 ** rng.integers(-140, 120, n)).astype(np.float32)
            a = (rng.standard_normal(n) * 2.0 ** rng.integers(-149, 120, n)).astype(np.float32)
        w32 = np.float32(w)
        want = np.array([fmaf(float(xi), float(w32), float(ai)) for xi, ai in zip(x, a, strict=True)], np.float32)
        got = fma_into(a.copy(), x, w32)
        same = (_bits(got) == _bits(want)) | (np.isnan(got) & np.isnan(want))
        assert same.all(), (w, x[~same][:3], a[~same][:3])


def _double_rounding_cases() -> list[tuple[np.float32, np.float32, np.float32]]:
    """(acc, x, w) whose exact `acc + x*w` sits just off an fp32 halfway point, nearer than half a
    float64 ulp: float64 rounds it onto the halfway point, and fp32 then rounds the tie to even,
    the wrong way. x*w = (1 + 2**-23)(1 - 2**-23) = 1 - 2**-46 times a power of two."""
    f = np.float32
    cases = []
    for sign in (1.0, -1.0):
        for side in (1.0, -1.0):  # below or above the halfway point (the error's sign)
            for acc in (1 + 2**-23, 1.5 + 2**-23, 3 - 2**-22):  # odd last bits: ties go away from them
                cases.append((f(sign * acc), f(sign * side * (1 + 2**-23) * 2.0**-24), f(1 - 2**-23)))
            # subnormal fp32 results: the largest subnormal, odd
            cases.append(
                (
                    f(sign * (2**23 - 1) * 2.0**-149),
                    f(sign * side * (1 + 2**-23) * 2.0**-75),
                    f(1 - 2**-23) * f(2.0**-75),
                )
            )
    return cases


@needs_libm
def test_fma_into_corrects_float64_double_rounding() -> None:
    fmaf = _fmaf()
    cases = _double_rounding_cases()
    naive_wrong = 0
    for acc, x, w in cases:
        want = np.float32(fmaf(float(x), float(w), float(acc)))
        got = fma_into(np.array([acc]), np.array([x]), w)[0]
        assert _bits(np.array([got])) == _bits(np.array([want])), (acc, x, w)
        naive_wrong += np.float32(np.float64(x) * np.float64(w) + np.float64(acc)) != want
    assert naive_wrong >= len(cases) // 2  # the cases do exercise the correction


@needs_libm
def test_fma_into_narrowed_to_halfway_points_keeps_every_correction() -> None:
    """Blocks where the quick test catches many elements (round weights make most sums exact fp32
    values; zeros too) are narrowed to possible halfway points: every double rounding must still
    be corrected, subnormal results included, and the round sums stay exact."""
    fmaf = _fmaf()
    rng = np.random.default_rng(3)
    n = 4096
    for i, (acc, xi, wi) in enumerate(_double_rounding_cases()):
        x, a = np.zeros(n, np.float32), np.zeros(n, np.float32)  # zero sums: caught, then narrowed away
        x[: n // 4] = rng.standard_normal(n // 4).astype(np.float32)
        x[100 + i], a[100 + i] = xi, acc
        want = np.array([fmaf(float(u), float(wi), float(v)) for u, v in zip(x, a, strict=True)], np.float32)
        assert (_bits(fma_into(a.copy(), x, wi)) == _bits(want)).all(), (acc, xi, wi)
    x = rng.standard_normal(n).astype(np.float16).astype(np.float32)  # 16-bit values, as read
    a = rng.standard_normal(n).astype(np.float16).astype(np.float32) * np.float32(0.5)
    w = np.float32(0.5)
    want = np.array([fmaf(float(u), float(w), float(v)) for u, v in zip(x, a, strict=True)], np.float32)
    assert (_bits(fma_into(a.copy(), x, w)) == _bits(want)).all()


# -- mergekit's linear in-process, and the three backends -----------------------------------------


def _inputs(dtype: str, k: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(k):
        x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-12, 12, (n,), generator=g).float())
        x[torch.rand(n, generator=g) < 0.05] = 0.0
        x[torch.rand(n, generator=g) < 0.05] = -0.0  # mergekit starts from +0: -0 products give +0
        xs.append(x.to(TORCH[dtype]))
    return xs


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _ours(xs: list[torch.Tensor], ws: list[float], divisor: float | None, backend: str) -> torch.Tensor:
    out = torch.empty_like(xs[0])
    if backend == "numpy":
        dtype = {v: k for k, v in TORCH.items()}[out.dtype]
        numpy_cpu.linear_combine(
            [_numpy_view(x) for x in xs], ws, _numpy_view(out), dtype, divisor, accumulation="fused"
        )
    elif backend == "torch":
        torch_kernels.linear_combine(xs, ws, out, divisor, accumulation="fused")
    else:
        from lazymerge.kernels import triton as lt

        if not lt.available()[0]:
            pytest.skip(lt.available()[1])
        if lt._INTERPRETED:
            lt.linear_combine(xs, ws, out, divisor, accumulation="fused")
        else:  # CUDA: `fma.rn.f32`
            dev = lt.linear_combine([x.cuda() for x in xs], ws, out.cuda(), divisor, accumulation="fused")
            out = dev.cpu()
    return out


def _mergekit_linear():
    mk = pytest.importorskip("mergekit.merge_methods.linear")
    from mergekit.merge_methods.base import TensorBatch

    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("torch's non-vector CPU build does not fuse addcmul_")
    return mk.linear_merge, TensorBatch


SIZES = [1, 2, 7, 15, 16, 17, 31, 33, 63, 67, 4097, 9001]


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("normalize", [False, True])
def test_fused_numpy_and_torch_are_mergekits_linear(dtype: str, k: int, normalize: bool) -> None:
    linear_merge, tensor_batch = _mergekit_linear()
    ws = [0.3, 0.6, 0.1][:k]
    divisor = float(torch.tensor(ws, dtype=torch.float32).sum()) if normalize else None
    rounded_differs = False
    for n in SIZES:
        xs = _inputs(dtype, k, n, n + 100 * k)
        want = linear_merge.merge_batch(
            tensor_batch(tuple(x.view(1, n) for x in xs)), weight=torch.tensor([ws]), normalize=normalize
        )
        want = want.view(-1)
        for backend in ("numpy", "torch"):
            got = _ours(xs, ws, divisor, backend)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (backend, n)
        rounded = torch_kernels.linear_combine(xs, ws, torch.empty_like(xs[0]), divisor)
        rounded_differs |= not torch.equal(rounded.view(torch.uint8), want.view(torch.uint8))
    assert rounded_differs  # the old accumulation would have failed this test


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("k", [2, 3, 9])  # 9: more than one Triton launch, the running sum carried
def test_fused_backends_agree_bit_for_bit(dtype: str, k: int) -> None:
    ws = [0.3, 0.6, 0.1, -0.7, 1 / 3, 2.0, 0.45, -1e-3, 0.9][:k]
    for n, divisor in ((1, None), (67, 0.9), (4097, None), (9001, 1.7)):
        xs = _inputs(dtype, k, n, n + k)
        want = _ours(xs, ws, divisor, "numpy")
        for backend in ("torch", "triton") if _triton_fma_is_fused() else ("torch",):
            got = _ours(xs, ws, divisor, backend)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (backend, n)
    if not _triton_fma_is_fused():
        pytest.skip(
            f"Triton {_triton_version()}'s CPU interpreter rounds tl.fma twice: the Triton kernel was not compared"
        )


def _triton_version() -> str:
    import triton

    return triton.__version__


def _triton_fma_is_fused() -> bool:
    """Whether the Triton kernel's `tl.fma` rounds once here: always on a GPU (`fma.rn.f32`); under
    TRITON_INTERPRET=1 only from Triton 3.9 (earlier interpreters multiply, then add)."""
    from lazymerge.kernels import triton as lt

    if not lt._INTERPRETED:
        return True
    acc, x, w = _double_rounding_cases()[0]
    got = lt.linear_combine(
        [torch.tensor([acc]), torch.tensor([x])], [1.0, float(w)], torch.empty(1), accumulation="fused"
    )
    return got.numpy()[0] == fma_into(np.array([acc], np.float32), np.array([x], np.float32), w)[0]


@needs_libm
def test_triton_interpreter_fma_is_single_rounding() -> None:
    from lazymerge.kernels import triton as lt

    if not lt._INTERPRETED:
        pytest.skip("checks Triton's CPU interpreter")
    if not _triton_fma_is_fused():
        pytest.skip(f"Triton {_triton_version()}'s CPU interpreter rounds tl.fma twice (Triton 3.9's fuses it)")
    fmaf = _fmaf()
    for acc, x, w in _double_rounding_cases():
        xs = [torch.tensor([acc]), torch.tensor([x])]
        got = lt.linear_combine(xs, [1.0, float(w)], torch.empty(1), accumulation="fused")
        assert got.numpy()[0] == np.float32(fmaf(float(x), float(w), float(acc))), (acc, x, w)


def test_rounded_accumulation_is_unchanged() -> None:
    # The internal weighted sum (DogeRM, copies) rounds product and sum apart, as before.
    xs = _inputs("F32", 2, 4097, 7)
    out = numpy_cpu.linear_combine([x.numpy() for x in xs], [0.3, 0.6], np.empty(4097, np.float32), "F32")
    want = (xs[0] * torch.tensor([0.3])) + (xs[1] * torch.tensor([0.6]))
    assert np.array_equal(_bits(out), _bits(want.numpy()))
    assert methods.get("weighted_sum").accumulation == "rounded"
    assert methods.get("linear").accumulation == "fused"


@pytest.mark.parametrize("method", ["linear", "weighted_sum"])
def test_every_backend_takes_the_accumulation_from_the_method(method: str) -> None:
    from lazymerge.kernels.cpu import CpuBackend
    from lazymerge.kernels.numpy_cpu import NumpyBackend
    from lazymerge.plan import ChunkTask, Source

    n, dtypes, ws = 4099, ("F16", "BF16", "F32"), (0.3, 0.6, 0.1)
    xs = [_inputs(d, 1, n, 50 + j)[0] for j, d in enumerate(dtypes)]
    sources = tuple(Source(j, "x.safetensors", 0, d, w) for j, (d, w) in enumerate(zip(dtypes, ws, strict=True)))
    task = ChunkTask(0, 0, n, "F16", sources, 0.9, copy=False, method=method)
    want = torch.empty(n, dtype=torch.float16)
    accumulation = methods.get(method).accumulation
    numpy_cpu.linear_combine([_numpy_view(x) for x in xs], ws, want.numpy(), "F16", 0.9, accumulation=accumulation)
    backends = [NumpyBackend(), CpuBackend()]
    from lazymerge.kernels import triton as lt

    if lt._INTERPRETED:
        from lazymerge.kernels.cuda import CudaBackend

        backends.append(CudaBackend())
    for backend in backends:
        inputs = [backend.allocate(x.numel() * x.element_size()) for x in xs]
        for buf, x in zip(inputs, xs, strict=True):
            raw = x.view(torch.uint8)
            buf[:] = raw.numpy() if isinstance(buf, np.ndarray) else raw
        out = backend.allocate(2 * n)
        backend.wait(backend.submit(task, inputs, out))
        got = bytes(out[: 2 * n]) if isinstance(out, np.ndarray) else out[: 2 * n].numpy().tobytes()
        assert got == want.numpy().tobytes(), type(backend).__name__
    rounded = torch.empty(n, dtype=torch.float16)
    torch_kernels.linear_combine(xs, ws, rounded, 0.9)
    assert (want.numpy().tobytes() == rounded.numpy().tobytes()) == (method == "weighted_sum")


# -- whole merges -------------------------------------------------------------------------------------


def test_plans_name_their_accumulation(tmp_path: Path) -> None:
    from lazymerge.tiny_models import build_llama_pair

    a, b = (build_llama(tmp_path / f"m{i}", i) for i in range(2))
    plan = lazymerge.plan_merge(
        {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]}, tmp_path / "out"
    )
    assert {t.method for t in plan.tensors if t.segments} == {"linear"}
    rm, sft = build_llama_pair(tmp_path / "pair")
    dogerm = lazymerge.plan_merge(
        {"merge_method": "dogerm", "reward_model": str(rm), "domain_model": str(sft), "weight": 0.3}, tmp_path / "d"
    )
    assert {t.method for t in dogerm.tensors} == {"weighted_sum"}


def test_fused_accumulation_is_in_the_plan_fingerprint(tmp_path: Path) -> None:
    """A `linear` run started by a version that rounded products apart must not be resumed by one
    that fuses them: other arithmetic, other bytes, so another fingerprint."""
    from dataclasses import replace

    from lazymerge.manifest import plan_fingerprint

    a, b = (build_llama(tmp_path / f"m{i}", i) for i in range(2))
    plan = lazymerge.plan_merge(
        {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]}, tmp_path / "out"
    )
    rounded = replace(plan, tensors=[replace(t, method="weighted_sum") for t in plan.tensors])
    assert plan_fingerprint(plan) != plan_fingerprint(rounded)
    assert plan_fingerprint(rounded) == plan_fingerprint(replace(rounded))  # and it is deterministic


def test_the_internal_weighted_sum_is_not_a_recipe_method(tmp_path: Path) -> None:
    a, b = (build_llama(tmp_path / f"m{i}", i) for i in range(2))
    with pytest.raises(RecipeError, match="not supported"):
        lazymerge.plan_merge(
            {"merge_method": "weighted_sum", "models": [{"model": str(a)}, {"model": str(b)}]}, tmp_path / "o"
        )
    assert "weighted_sum" not in methods.names()


def _tiny(folder: Path, seed: int, dtype: torch.dtype) -> Path:
    """A tiny Llama with odd tensor sizes, its weights stored as `dtype`."""
    from safetensors.torch import load_file, save_file

    build_llama(folder, seed, hidden=20, inter=23, vocab=37)
    for f in folder.glob("*.safetensors"):
        save_file({k: v.to(dtype) for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_yaml_same_bytes_as_mergekit_yaml(tmp_path: Path, dtype: torch.dtype, normalize: bool) -> None:
    from test_methods import MERGEKIT, mergekit_and_ours

    if MERGEKIT is None:
        pytest.skip("mergekit-yaml not installed")
    m = [_tiny(tmp_path / f"m{i}", i, dtype) for i in range(3)]
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(m[0]), "parameters": {"weight": 0.3}},
            {"model": str(m[1]), "parameters": {"weight": [0.6, 0.2, 0.45]}},  # a per-layer gradient
            {"model": str(m[2]), "parameters": {"weight": [{"filter": "mlp", "value": 0.6}, {"value": 0.1}]}},
        ],
        "parameters": {"normalize": normalize},
    }
    got, want = mergekit_and_ours(tmp_path, config)
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype == dtype and got[k].shape == w.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), k


@pytest.mark.slow
@pytest.mark.parametrize("second", [torch.bfloat16, torch.float32])
def test_mixed_dtypes_without_dtype_give_mergekits_promoted_output(tmp_path: Path, second: torch.dtype) -> None:
    """fp16 with bf16 (or fp32) inputs and no `dtype`: mergekit brings both to fp32 and writes fp32."""
    from test_methods import MERGEKIT, mergekit_and_ours

    if MERGEKIT is None:
        pytest.skip("mergekit-yaml not installed")
    m = [_tiny(tmp_path / "m0", 0, torch.float16), _tiny(tmp_path / "m1", 1, second)]
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(m[0]), "parameters": {"weight": 0.3}},
            {"model": str(m[1]), "parameters": {"weight": 0.6}},
        ],
    }
    got, want = mergekit_and_ours(tmp_path, config)
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype == torch.float32, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), k
