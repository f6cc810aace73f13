"""The torch-free CPU path (`lazymerge.kernels.numpy_cpu`): numpy's widening, arithmetic and
round-to-nearest-even store equal torch's bit for bit (a NaN only has to be a NaN, as between
torch and Triton), and a linear or DogeRM merge runs in an interpreter where torch cannot be
imported, writing the same bytes as the torch kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lazymerge.kernels import device as kdev
from lazymerge.kernels import numpy_cpu as nk
from lazymerge.kernels import torch as tk
from lazymerge.kernels.cpu import CpuBackend
from lazymerge.plan import ChunkTask, Source
from lazymerge.tiny_models import save_model

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # bf16 as its bit patterns
UINT = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}
SINT = {"F32": torch.int32, "F16": torch.int16, "BF16": torch.int16}
REPO = Path(__file__).resolve().parent.parent

# Values the rounding must get right: zeros, subnormals of every width, ties, the largest
# finite values and the overflow thresholds, inf, NaNs with payloads in kept or dropped bits.
SPECIAL_F32 = [
    0, 0x80000000, 1, 0x80000001, 0x007FFFFF, 0x00800000, 0x33000000, 0x33000001, 0x337FFFFF, 0x387FC000,
    0x387FE000, 0x387FF000, 0x387FFFFF, 0x38800000, 0x38801000, 0x38803000, 0x3F800000, 0x3F808000, 0x3F818000,
    0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x7F800000, 0xFF800000,
    0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFC00001, 0x7F807FFF,
]  # fmt: skip


def _torch_of(dtype: str, bits: np.ndarray) -> torch.Tensor:
    """A torch tensor of `dtype` holding the bit patterns `bits`."""
    signed = np.int32 if dtype == "F32" else np.int16
    return torch.from_numpy(bits.astype(UINT[dtype]).view(signed).copy()).view(TORCH[dtype])


def _patterns(t: torch.Tensor) -> np.ndarray:
    return t.view(SINT[_name(t.dtype)]).numpy().view(UINT[_name(t.dtype)])


def _name(dtype: torch.dtype) -> str:
    return next(k for k, v in TORCH.items() if v == dtype)


def _assert_same(got: np.ndarray, want: torch.Tensor) -> None:
    """Equal bit patterns everywhere except at NaNs, which must be NaN in both."""
    want_bits = _patterns(want)
    nan = torch.isnan(want.float()).numpy()
    got_nan = torch.isnan(_torch_of(_name(want.dtype), got).float()).numpy()
    assert np.array_equal(got_nan, nan), "NaN positions differ"
    bad = np.flatnonzero((got != want_bits) & ~nan)
    assert bad.size == 0, [(hex(int(got[i])), hex(int(want_bits[i]))) for i in bad[:5]]


def test_widening_is_exact_for_every_16_bit_pattern() -> None:
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for dtype in ("F16", "BF16"):
        got = np.empty(len(every), np.float32)
        nk.widen(every.view(NUMPY[dtype]), got)
        want = _torch_of(dtype, every).float()
        _assert_same(got.view(np.uint32), want)


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_narrowing_matches_torch_on_special_and_random_patterns(dtype: str) -> None:
    rng = np.random.default_rng(0)
    # Random patterns, and as many again inside the fp16 exponent range, where most work is.
    wide = rng.integers(0, 1 << 32, 1 << 18, dtype=np.uint64).astype(np.uint32)
    near = (rng.integers(0x33000000, 0x47800000, 1 << 18, dtype=np.uint64).astype(np.uint32)) | (wide & 0x80000000)
    bits = np.concatenate([np.array(SPECIAL_F32, dtype=np.uint32), wide, near])
    a = bits.view(np.float32)
    scratch = [np.empty(len(a), np.uint32) for _ in range(3)]
    rounding = nk.bf16_bits if dtype == "BF16" else nk.f16_bits
    with np.errstate(all="ignore"):
        got = rounding(a, scratch[0], scratch[1], scratch[2], np.empty(len(a), np.bool_)).astype(np.uint16)
    _assert_same(got, torch.from_numpy(a.copy()).to(TORCH[dtype]))
    # NaNs: the Triton kernel's documented narrowing (sign and top payload kept, quiet bit set).
    nan = np.isnan(a)
    quiet = 0x0040 if dtype == "BF16" else 0x0200
    want = (
        (bits[nan] >> 16) | quiet
        if dtype == "BF16"
        else ((bits[nan] >> 16) & 0x8000) | 0x7E00 | ((bits[nan] >> 13) & 0x3FF)
    )
    assert np.array_equal(got[nan], want.astype(np.uint16))


@settings(max_examples=100, deadline=None)
@given(
    src=st.sampled_from(["F32", "F16", "BF16"]),
    dst=st.sampled_from(["F32", "F16", "BF16"]),
    patterns=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=300),
)
def test_conversion_equals_torch_to(src: str, dst: str, patterns: list[int]) -> None:
    # A one-input merge with weight 1 is a conversion: widening, then the round-to-nearest-even
    # store, on any bit pattern (subnormals, inf, NaN payloads, overflow, -0.0).
    bits = np.array(patterns, dtype=np.uint64) & (0xFFFFFFFF if src == "F32" else 0xFFFF)
    x = _torch_of(src, bits)
    got = np.empty(len(bits), dtype=NUMPY[dst])
    nk.linear_combine([_patterns(x).view(NUMPY[src])], [1.0], got, dst)
    _assert_same(got.view(UINT[dst]), x.to(TORCH[dst]))


@settings(max_examples=80, deadline=None)
@given(
    dtypes=st.lists(st.sampled_from(["F32", "F16", "BF16"]), min_size=1, max_size=4),
    out_dtype=st.sampled_from(["F32", "F16", "BF16"]),
    weights=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=4, max_size=4),
    divisor=st.one_of(st.none(), st.floats(min_value=2.0**-10, max_value=2.0**10, width=32)),
    n=st.integers(0, 3000),
    seed=st.integers(0, 2**32 - 1),
    raw=st.booleans(),
)
def test_linear_combine_equals_torch(dtypes, out_dtype, weights, divisor, n, seed, raw) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    inputs = []
    for dtype in dtypes:
        if raw:  # any bit pattern: subnormals, inf, NaN payloads
            bits = rng.integers(0, 1 << (8 * np.dtype(UINT[dtype]).itemsize), n, dtype=np.uint64)
            inputs.append(_torch_of(dtype, bits))
        else:  # weights as a model has them
            inputs.append(torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 0.02).to(TORCH[dtype]))
    ws = weights[: len(dtypes)]
    want = torch.empty(n, dtype=TORCH[out_dtype])
    tk.linear_combine(inputs, ws, want, divisor)
    got = np.empty(n, dtype=NUMPY[out_dtype])
    nk.linear_combine([_patterns(x).view(NUMPY[_name(x.dtype)]) for x in inputs], ws, got, out_dtype, divisor)
    _assert_same(got.view(UINT[out_dtype]), want)


def test_backend_matches_cpu_backend_across_blocks() -> None:
    # Longer than one inner block, fp16 + bf16 in, bf16 out, with a divisor.
    n = nk.BLOCK + 12345
    rng = np.random.default_rng(3)
    a = (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(np.float16)
    b = _patterns(torch.from_numpy(rng.standard_normal(n, dtype=np.float32)).to(torch.bfloat16))
    task = ChunkTask(0, 0, n, "BF16", (Source(0, "a", 0, "F16", 0.3), Source(1, "b", 0, "BF16", 0.7)), 1.5, False)
    backend = nk.NumpyBackend()
    ins = [a.view(np.uint8), b.view(np.uint8)]
    out = backend.allocate(2 * n)
    backend.wait(backend.submit(task, ins, out))
    want = torch.empty(2 * n, dtype=torch.uint8)
    CpuBackend().submit(task, [torch.from_numpy(x.copy()) for x in ins], want)
    assert out.tobytes() == want.numpy().tobytes()


def test_backend_refuses_what_it_cannot_merge() -> None:
    backend = nk.NumpyBackend()
    buf = backend.allocate(8)
    assert buf.dtype == np.uint8 and len(buf) == 8
    ties = ChunkTask(0, 0, 2, "F16", (Source(0, "f", 0, "F16", 1.0),), None, False, method="ties")
    with pytest.raises(ValueError, match="not a weighted sum"):
        backend.submit(ties, [buf], buf)
    copy = ChunkTask(0, 0, 2, "F16", (Source(0, "f", 0, "F16", 1.0),), None, copy=True)
    with pytest.raises(ValueError, match="copy"):
        backend.submit(copy, [buf], buf)


def test_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    backend, why = kdev.select_backend("cpu", numpy_ok=True)
    assert isinstance(backend, nk.NumpyBackend) and why == "cpu: requested"
    assert isinstance(kdev.select_backend("cpu")[0], CpuBackend)
    monkeypatch.setattr(kdev, "_gpu_may_be_present", lambda: False)
    backend, why = kdev.select_backend("auto", numpy_ok=True)
    assert isinstance(backend, nk.NumpyBackend) and why == "cpu: no CUDA device"


def test_needs_torch_only_for_methods_that_need_it(llama_pair, tmp_path: Path, monkeypatch) -> None:
    import lazymerge
    from lazymerge.recipes.dogerm import plan_dogerm

    rm, sft = (lazymerge.open_model(p) for p in llama_pair)
    dogerm = plan_dogerm(rm, sft, 0.3, tmp_path / "out")
    monkeypatch.setattr(kdev, "_gpu_may_be_present", lambda: False)
    assert kdev.numpy_capable([dogerm]) and not kdev.needs_torch([dogerm], "auto")
    assert kdev.needs_torch([dogerm], "cuda")  # asked for: torch says whether it can
    monkeypatch.setattr(kdev, "_gpu_may_be_present", lambda: True)
    assert kdev.needs_torch([dogerm], "auto") and not kdev.needs_torch([dogerm], "cpu")
    monkeypatch.setenv("LAZYMERGE_CPU_KERNELS", "torch")
    assert kdev.needs_torch([dogerm], "cpu") and not kdev.numpy_capable([dogerm])


def _tiny_pair(tmp_path: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(5)
    shapes = {"a.weight": (300, 70), "b.weight": (1000,), "c.weight": (33, 17)}
    dtypes = [torch.float16, torch.bfloat16]
    models = []
    for k in range(2):
        tensors = {n: (torch.randn(s, generator=g) * 0.02).to(dtypes[k]) for n, s in shapes.items()}
        models.append(save_model(tmp_path / f"m{k}", tensors, shards=2))
    return models[0], models[1]


_NO_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError
from lazymerge.cli import main
code = main(sys.argv[1:])
assert sys.modules.get("torch") is None
sys.exit(code)
"""


def _run_without_torch(args: list[str], code: int = 0) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True, env=env)
    assert done.returncode == code, done.stdout + done.stderr
    return done.stderr


@pytest.mark.slow
def test_dogerm_and_linear_run_without_torch_and_write_the_torch_bytes(
    llama_pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lazymerge.cli import main

    rm, sft = llama_pair
    a, b = _tiny_pair(tmp_path)
    recipe = tmp_path / "linear.yaml"
    recipe.write_text(
        f"merge_method: linear\ndtype: bfloat16\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.9}}\n"
    )
    jobs = {
        "dogerm": ["dogerm", "--reward-model", str(rm), "--domain-model", str(sft), "--weight", "0.3"],
        "linear": ["merge", str(recipe)],
    }
    for name, args in jobs.items():
        common = [*args, "-q", "--max-shard-size", "60kB"]
        _run_without_torch([*common, "-o", str(tmp_path / f"{name}-numpy")])  # --device auto
        monkeypatch.setenv("LAZYMERGE_CPU_KERNELS", "torch")
        assert main([*common, "--device", "cpu", "-o", str(tmp_path / f"{name}-torch")]) == 0
        monkeypatch.delenv("LAZYMERGE_CPU_KERNELS")
        files = sorted(p.name for p in (tmp_path / f"{name}-torch").iterdir())
        assert files == sorted(p.name for p in (tmp_path / f"{name}-numpy").iterdir())
        assert any(f.endswith(".safetensors") for f in files)
        for f in files:
            assert (tmp_path / f"{name}-numpy" / f).read_bytes() == (tmp_path / f"{name}-torch" / f).read_bytes(), f
        # verify --recompute recomputes on numpy too: no torch needed to check a merge.
        _run_without_torch(["verify", str(tmp_path / f"{name}-numpy"), "--recompute", "2"])


@pytest.mark.slow
def test_without_torch_other_methods_fail_in_one_line(tmp_path: Path) -> None:
    a, b = _tiny_pair(tmp_path)
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 1}}\n")
    err = _run_without_torch(["merge", str(recipe), "-q", "-o", str(tmp_path / "ties")], code=2)
    assert err.startswith("error: this merge method needs torch") and "pip install torch" in err
    assert "Traceback" not in err
    args = ["merge", str(recipe).replace("ties", "x"), "-o", str(tmp_path / "cuda"), "--device", "cuda"]
    recipe.with_name("x.yaml").write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\n")
    err = _run_without_torch(args, code=2)
    assert "--device cuda: torch is not installed" in err and "Traceback" not in err
