"""The Triton chunk kernel against the torch reference, bit for bit.

Without CUDA the kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set before
`triton.jit` wraps them, i.e. before `lazymerge.kernels.triton` is first imported, so it is set
here at import time (and the module reloaded if something imported it earlier). With CUDA the
same tests run the compiled kernels and compare them with the torch reference on CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

import lazymerge.kernels.triton as lt  # noqa: E402
from lazymerge.kernels import torch as ref  # noqa: E402

if not HAS_CUDA and not lt._INTERPRETED:
    lt = importlib.reload(lt)  # imported earlier without the interpreter: rebuild the kernels

DEV = "cpu" if lt._INTERPRETED else "cuda"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)
SIZES = (1, 7, 1023, 4097, 4096 * 2 + 5)
WEIGHTS = (1.0, 0.5, -0.25, 0.3, 1 / 3, -1.7, 2.0**-130, 1e-3, 3e38, -0.0, 0.1, 7.0)

pytestmark = pytest.mark.skipif(not lt.available()[0], reason=lt.available()[1])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal bit patterns everywhere but at NaNs, which must be NaN in both (see module doc)."""
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = torch.isnan(want.float())
    assert torch.equal(torch.isnan(got.float()), nan), "NaN positions differ"
    diff = (_bits(got) != _bits(want)) & ~nan
    if diff.any():
        i = int(diff.nonzero()[0])
        mask = 0xFFFFFFFF if want.element_size() == 4 else 0xFFFF
        g, w = int(_bits(got)[i]) & mask, int(_bits(want)[i]) & mask
        pytest.fail(f"{int(diff.sum())} elements differ; first at {i}: got {g:#x}, want {w:#x}")


def _f32_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int64).to(torch.int32).view(F32)  # int64 first: wraps 2**31.. to negative


def _specials(dtype: torch.dtype) -> torch.Tensor:
    """Values where rounding and IEEE special cases matter, representable in `dtype`."""
    inf, nan = float("inf"), float("nan")
    vals = [
        0.0,
        -0.0,
        inf,
        -inf,
        nan,
        1.0,
        -1.0,
        65504.0,
        65519.99,
        65520.0,
        65536.0,
        70000.0,
        1e6,
        -1e6,
        2.0**-14,
        2.0**-24,
        2.0**-25,
        3 * 2.0**-25,
        2.0**-149,
        1e-40,
        3e38,
        -3e38,
    ]
    t = torch.tensor(vals, dtype=F32)
    if dtype == F32:
        # Ties and near-ties for both narrow formats: bf16 (low 16 bits) and fp16 (low 13 bits,
        # normal range), plus fp16 subnormal ties (odd multiples of 2**-25).
        hi = torch.tensor([0x3F800000, 0x3F810000, 0x477F0000, 0x38800000, 0xC2AA0000, 0x7F7F0000])
        lows = torch.tensor([0x8000, 0x7FFF, 0x8001, 0x1000, 0x0FFF, 0x1001, 0x3000, 0xFFFF])
        ties = _f32_from_bits((hi[:, None] | lows[None, :]).flatten())
        sub_ties = torch.arange(1, 64, 2, dtype=F32) * 2.0**-25
        t = torch.cat([t, ties, sub_ties, -sub_ties])
    return t.to(dtype)


def _values(n: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """A mix of ordinary values, raw bit patterns (NaN payloads, subnormals) and specials."""
    x = torch.randn(n, generator=g) * torch.tensor([1.0, 1e-3, 1e4, 60000.0])[torch.randint(0, 4, (n,), generator=g)]
    x = x.to(dtype)
    raw = torch.rand(n, generator=g) < 0.2
    if dtype == F32:
        # Raw fp32 patterns limited to moderate exponents, so sums stay interesting.
        b = torch.randint(0, 2**32, (n,), generator=g) & 0x807FFFFF | (torch.randint(90, 160, (n,), generator=g) << 23)
        rawv = _f32_from_bits(b)
    else:
        rawv = torch.randint(-(2**15), 2**15, (n,), generator=g).to(torch.int16).view(dtype)
    x = torch.where(raw, rawv, x)
    sp = _specials(dtype)
    pos = torch.randint(0, n, (min(n, 3 * sp.numel()),), generator=g)
    x[pos] = sp[torch.randint(0, sp.numel(), (pos.numel(),), generator=g)]
    return x


def _case(in_dtypes: list[torch.dtype], out_dtype: torch.dtype, n: int, divisor: float | None, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    xs = [_values(n, d, g) for d in in_dtypes]
    ws = [WEIGHTS[int(i)] for i in torch.randint(0, len(WEIGHTS), (len(xs),), generator=g)]
    want = ref.linear_combine(xs, ws, torch.empty(n, dtype=out_dtype), divisor)
    got = torch.empty(n, dtype=out_dtype, device=DEV)
    assert lt.linear_combine([x.to(DEV) for x in xs], ws, got, divisor) is got
    _assert_same(got, want)


def _cases() -> list[tuple[str, torch.dtype, int, float | None]]:
    out = []
    for out_dtype in DTYPES:
        for ins in ("f32", "f16", "bf16", "mixed"):
            for k in (1, 2, 3, 8):
                for divisor in (None, 3.0):
                    out.append((ins, out_dtype, k, divisor))
    return out


_IN = {"f32": F32, "f16": F16, "bf16": BF16}


@pytest.mark.parametrize(("ins", "out_dtype", "k", "divisor"), _cases())
def test_matches_torch(ins: str, out_dtype: torch.dtype, k: int, divisor: float | None) -> None:
    in_dtypes = [DTYPES[i % 3] for i in range(k)] if ins == "mixed" else [_IN[ins]] * k
    # A seed fixed per case (the parameter's index), cycling the chunk sizes over the cases.
    seed = _cases().index((ins, out_dtype, k, divisor))
    _case(in_dtypes, out_dtype, SIZES[seed % len(SIZES)], divisor, seed)


@pytest.mark.parametrize("n", SIZES)
def test_sizes_and_odd_divisors(n: int) -> None:
    for i, divisor in enumerate((0.7, 1e-40, -3.0, 0.0)):
        _case([BF16, F16, F32], DTYPES[(n + i) % 3], n, divisor, seed=n * 10 + i)


@pytest.mark.parametrize("k", [9, 15, 17])
def test_more_inputs_than_one_launch(k: int) -> None:
    # Folded through an fp32 carry; with and without a caller-provided scratch buffer.
    in_dtypes = [DTYPES[i % 3] for i in range(k)]
    _case(in_dtypes, BF16, 1500, 2.0, seed=k)
    g = torch.Generator().manual_seed(k)
    xs = [_values(700, d, g) for d in in_dtypes]
    ws = [0.1 * (i + 1) for i in range(k)]
    want = ref.linear_combine(xs, ws, torch.empty(700, dtype=F16))
    got = torch.empty(700, dtype=F16, device=DEV)
    scratch = torch.empty(1000, dtype=F32, device=DEV)
    lt.linear_combine([x.to(DEV) for x in xs], ws, got, acc=scratch, tmp=scratch)
    _assert_same(got, want)


def test_ties_pass_through_full_kernel() -> None:
    # One fp32 input with weight 1.0 is an exact copy before the store: every tie reaches the
    # rounding step unchanged.
    src = _specials(F32)
    for out_dtype in DTYPES:
        want = ref.linear_combine([src], [1.0], torch.empty(src.numel(), dtype=out_dtype))
        got = torch.empty(src.numel(), dtype=out_dtype, device=DEV)
        _assert_same(lt.linear_combine([src.to(DEV)], [1.0], got), want)


def _rounding_patterns() -> torch.Tensor:
    """fp32 patterns for the narrowing helpers: random, ties, subnormals, every 16-bit value."""
    g = torch.Generator().manual_seed(1234)
    parts = [torch.randint(0, 2**32, (100_000,), generator=g)]
    # bf16: every upper half with the low halves that decide rounding.
    upper = torch.arange(2**16)[:, None] << 16
    parts.append((upper | torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF])).flatten())
    # fp16 normal range and a bit around it: exponents 100..145, every 10-bit top mantissa,
    # low 13 bits at and around the tie, both signs.
    exps = torch.arange(100, 146)[:, None, None] << 23
    tops = torch.arange(1024)[None, :, None] << 13
    lows = torch.tensor([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF])[None, None, :]
    fp16 = (exps | tops | lows).flatten()
    parts += [fp16, fp16 | 0x80000000]
    # fp16 subnormals: multiples of 2**-25 (odd ones are ties) and their fp32 neighbours.
    k = torch.arange(0, 2**12, dtype=F32) * 2.0**-25
    kb = k.view(torch.int32).to(torch.int64)
    parts += [kb, kb + 1, (kb - 1).clamp(min=0), kb | 0x80000000]
    # Every fp16 and bf16 value widened: these must come back unchanged.
    h = torch.arange(-(2**15), 2**15).to(torch.int16)
    parts += [h.view(F16).float().view(torch.int32).to(torch.int64)]
    parts += [h.view(BF16).float().view(torch.int32).to(torch.int64)]
    # NaNs with payloads only in the bits that are dropped, and signalling NaNs.
    parts.append(torch.tensor([0x7F800001, 0xFF800001, 0x7F801FFF, 0x7FC00000, 0xFFFFFFFF, 0x7FA00000]))
    return _f32_from_bits(torch.cat(parts) & 0xFFFFFFFF)


def _expected_nan(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The documented NaN narrowing: sign and top payload kept, quiet bit set.
    u = src.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if dtype == BF16:
        out = (u >> 16) | 0x40
    else:
        out = ((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x3FF)
    return out.to(torch.int16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_rounding_helper_matches_torch_cast(dtype: torch.dtype) -> None:
    src = _rounding_patterns()
    got = lt._round_store(src.to(DEV), torch.empty(src.numel(), dtype=dtype, device=DEV)).cpu()
    want = src.to(dtype)
    _assert_same(got, want)
    nan = torch.isnan(src)
    assert torch.equal(_bits(got)[nan], _expected_nan(src[nan], dtype))


def test_f32_output_is_the_fp32_sum() -> None:
    src = _rounding_patterns()[:5000]
    got = lt._round_store(src.to(DEV), torch.empty(src.numel(), dtype=F32, device=DEV))
    assert torch.equal(_bits(got.cpu()), _bits(src))


def test_empty_chunk() -> None:
    out = torch.empty(0, dtype=BF16, device=DEV)
    assert lt.linear_combine([torch.empty(0, device=DEV)], [1.0], out) is out


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ([], [], torch.empty(3)), "one weight per input"),
        (lambda: ([torch.empty(3)], [1.0, 2.0], torch.empty(3)), "one weight per input"),
        (lambda: ([torch.empty(4)], [1.0], torch.empty(3)), "elements"),
        (lambda: ([torch.empty(3, dtype=torch.float64)], [1.0], torch.empty(3)), "dtype"),
        (lambda: ([torch.empty(3, 2).t()], [1.0], torch.empty(6)), "contiguous"),
    ],
)
def test_rejects_bad_arguments(
    make: Callable[[], tuple[list[torch.Tensor], list[float], torch.Tensor]], match: str
) -> None:
    inputs, weights, out = make()
    with pytest.raises(ValueError, match=match):
        lt.linear_combine([x.to(DEV) for x in inputs], weights, out.to(DEV))


def test_available_reports_mode() -> None:
    ok, why = lt.available()
    assert ok
    assert ("interpreter" in why) == lt._INTERPRETED


def test_imports_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh copy of the module, loaded while `import triton` fails.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    path = Path(lt.__file__)
    spec = importlib.util.spec_from_file_location("_lazymerge_triton_absent", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.available() == (False, "triton is not installed")
    with pytest.raises(RuntimeError, match="not installed"):
        mod.linear_combine([torch.zeros(2)], [1.0], torch.empty(2))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_large_chunk_no_fma() -> None:
    # Many inputs and weights that are not powers of two: a fused multiply-add anywhere would
    # change some of these million results in the last bit.
    g = torch.Generator().manual_seed(7)
    n = 1 << 20
    xs = [torch.randn(n, generator=g).to(d) for d in (F32, F16, BF16, F32, F16, BF16, F32, F32)]
    ws = [0.1, -0.3, 0.7, 1 / 3, -1 / 7, 0.9, 0.01, 2.2]
    for out_dtype in DTYPES:
        want = ref.linear_combine(xs, ws, torch.empty(n, dtype=out_dtype), 3.0)
        got = torch.empty(n, dtype=out_dtype, device="cuda")
        lt.linear_combine([x.cuda() for x in xs], ws, got, 3.0)
        _assert_same(got, want)
