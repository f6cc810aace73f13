"""The torch-free CPU backend: weighted sums on numpy, bit for bit the torch reference kernel.

The common merge (linear, DogeRM, task arithmetic lowered to weights: every method declared
`weighted_sum`) needs no tensor library, and importing torch costs a CPU merge 2-3 s of start-up
and 250-600 MB of RSS depending on the build (its CUDA libraries). This backend does the same
arithmetic as `lazymerge.kernels.torch.linear_combine`, with numpy (a dependency already):

- widening to fp32 is exact: fp16 by numpy's cast, bf16 by a 16-bit shift of the pattern;
- `acc = x0*w0; acc = acc + xi*wi` in input order, then `acc / divisor`: numpy's fp32 ufuncs,
  each operation rounded on its own (numpy never fuses a multiply and an add), no flush of
  subnormals, as torch on CPU;
- the store rounds to nearest even: fp16 by numpy's cast (IEEE, subnormals and overflow to inf
  included), bf16 by the integer arithmetic of the Triton kernel (`lazymerge.kernels.triton`),
  NaNs narrowed like it (sign and top payload kept, quiet bit set).

A method declared `accumulation="fused"` (mergekit's `linear`) accumulates as mergekit's
`result.addcmul_(x, w)` does on an AVX2/AVX-512 CPU: `acc = fma(xi, wi, acc)` from +0, one
rounding each. numpy has no fused multiply-add; `lazymerge.kernels.fused_sum` emulates it exactly.

Results equal the torch and Triton backends' byte for byte; a NaN only has to be a NaN (its sign
and payload are not part of the contract, see `lazymerge.kernels.triton`). Buffers are numpy
uint8 arrays; numpy releases the GIL in these loops, so the executor's workers run in parallel.
Only weighted-sum tasks are accepted: `lazymerge.kernels.device` picks this backend when every
task of a run is one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lazymerge import methods
from lazymerge.constants import DTYPE_SIZES
from lazymerge.kernels.base import Backend, Handle
from lazymerge.kernels.fused_sum import FusedScratch, fma_into
from lazymerge.plan import ChunkTask

__all__ = ["NumpyBackend", "Scratch", "bf16_bits", "f16_bits", "linear_combine", "widen"]

# Elements per inner block: 128 Ki fp32 = 512 KiB per work array, so that the few arrays a block
# touches stay in a 1 MiB L2 across the ~30 passes of an fp16 merge (measured: 2.6 ns an element
# against 2.7 at 256 Ki and 3.3 at 64 Ki, best of 7, fp16 x2 -> fp16, on this machine's EPYC).
# The fused accumulation's float64 arrays do not fit then, but smaller blocks cost it more in
# per-call overhead than they save (fp16 x2: 4.2 ns an element at 128 Ki, 5.3 at 32 Ki, 6.6 at 16 Ki).
BLOCK = 128 * 1024
# Elements per chunk: half the executor's default. The numpy path is not compute-bound here,
# and 6 slots x 3 buffers of 2 MiB instead of 4 MiB take 38 MB off the peak RSS (1B DogeRM pair:
# 180 MB against 218 MB, same wall time within noise).
CHUNK_ELEMENTS = 512 * 1024

# How each safetensors dtype is viewed: bf16 as its raw 16-bit patterns (numpy has no bf16).
_VIEWS = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_TWO_112 = np.float32(2.0**112)
_SPECIAL_SCALED = np.float32(2.0**-96)  # 65536 * 2**-112: where inf and NaN halves land when scaled down
_FOLD_LIMIT = 2.0**15  # |w| * 2**112 stays finite (and exact) below this
_F16_CLAMP = np.float32(65536.0)  # 2**16: fp16 inf in the rounding of `f16_bits`
_F16_MIN_NORMAL_BITS = np.uint32(0x38800000)  # 2**-14
_TIMES_2_13 = np.uint32(13 << 23)  # added to an exponent field: times 2**13
_TWO_MINUS_112 = np.float32(2.0**-112)
_ZERO = np.float32(0.0)


class NumpyBackend(Backend):
    """Weighted sums on numpy, synchronously on the calling thread (one per executor worker)."""

    name = "cpu"
    chunk_elements = CHUNK_ELEMENTS

    def __init__(self) -> None:
        self._scratch = Scratch()

    def allocate(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, dtype=np.uint8)

    def submit(self, task: ChunkTask, inputs: Sequence[np.ndarray], out: np.ndarray) -> Handle:
        if task.copy:
            raise ValueError("copy tasks are byte copies; they never reach a compute backend")
        if len(inputs) != len(task.sources):
            raise ValueError(f"task has {len(task.sources)} sources but {len(inputs)} input buffers were given")
        method = methods.get(task.method)
        if not method.weighted_sum:
            raise ValueError(f"merge method {task.method!r} is not a weighted sum: it runs on the torch backend")
        sources = zip(inputs, task.sources, strict=True)
        xs = [_typed(buf, task.count, s.dtype, f"inputs[{j}]") for j, (buf, s) in enumerate(sources)]
        y = _typed(out, task.count, task.out_dtype, "out")
        linear_combine(
            xs,
            [s.weight for s in task.sources],
            y,
            task.out_dtype,
            task.divisor,
            scratch=self._scratch,
            accumulation=method.accumulation,
        )
        return None

    def wait(self, handle: Handle) -> None:
        return None


class Scratch:
    """Block-sized work arrays reused across chunks, so the hot loop allocates nothing."""

    def __init__(self) -> None:
        self.acc = np.empty(BLOCK, dtype=np.float32)
        self.tmp = np.empty(BLOCK, dtype=np.float32)
        self.x = np.empty(BLOCK, dtype=np.uint32)
        self.c = np.empty(BLOCK, dtype=np.uint32)
        self.mask = np.empty(BLOCK, dtype=np.bool_)
        self._fused: FusedScratch | None = None

    @property
    def fused(self) -> FusedScratch:
        """float64 work arrays of the fused accumulation, made on first use."""
        if self._fused is None:
            self._fused = FusedScratch(BLOCK)
        return self._fused


def linear_combine(
    inputs: Sequence[np.ndarray],
    weights: Sequence[float],
    out: np.ndarray,
    out_dtype: str,
    divisor: float | None = None,
    *,
    scratch: Scratch | None = None,
    accumulation: str = "rounded",
) -> np.ndarray:
    """Weighted sum of 1-D chunks into `out`, the arithmetic of `lazymerge.kernels.torch.linear_combine`.

    Args:
        inputs: 1-D arrays of equal length: float32, float16, or uint16 holding bf16 patterns.
        weights: one Python float per input (rounded to an fp32 scalar, as torch does).
        out: 1-D destination of the same length, viewed as for `inputs` (`out_dtype` says which).
        out_dtype: "F32", "F16" or "BF16".
        divisor: when given, the sum is divided by it.
        scratch: work arrays reused across calls (a fresh set when None).
        accumulation: "rounded" (product and sum rounded apart) or "fused" (`acc = fma(xi, wi,
            acc)` from +0, mergekit's `addcmul_`); see `lazymerge.methods.ACCUMULATIONS`.

    Returns:
        `out`.
    """
    if len(inputs) != len(weights) or not inputs:
        raise ValueError("need one weight per input and at least one input")
    if accumulation not in ("rounded", "fused"):
        raise ValueError(f"accumulation must be 'rounded' or 'fused', got {accumulation!r}")
    fused = accumulation == "fused"
    sc = scratch or Scratch()
    ws = [np.float32(w) for w in weights]
    div = np.float32(divisor) if divisor is not None else None
    n = len(out)
    # Overflow to inf and NaNs are results like any other here, not errors to warn about.
    with np.errstate(all="ignore"):
        for start in range(0, n, BLOCK):
            stop = min(start + BLOCK, n)
            m = stop - start
            a, t = sc.acc[:m], sc.tmp[:m]
            _weighted(inputs[0][start:stop], ws[0], a)
            if fused:
                # fma(x0, w0, +0): the one rounding of the exact product, but +0 where it is -0.
                np.add(a, _ZERO, out=a)
            for x, w in zip(inputs[1:], ws[1:], strict=True):
                if fused:
                    if x.dtype != np.float32:
                        widen(x[start:stop], t)
                    fma_into(a, t if x.dtype != np.float32 else x[start:stop], w, sc.fused)
                    continue
                _weighted(x[start:stop], w, t)
                np.add(a, t, out=a)
            if div is not None:
                np.divide(a, div, out=a)
            y = out[start:stop]
            if out_dtype == "F32":
                np.copyto(y, a)
            else:
                rounding = bf16_bits if out_dtype == "BF16" else f16_bits
                bits = rounding(a, t.view(np.uint32), sc.x[:m], sc.c[:m], sc.mask[:m])
                np.copyto(y.view(np.uint16), bits, casting="unsafe")  # every pattern fits in 16 bits
    return out


def _weighted(x: np.ndarray, w: np.float32, dst: np.ndarray) -> None:
    """dst = fp32(x) * w: fp32 inputs multiplied straight from the buffer, others widened first."""
    if x.dtype == np.float32:
        np.multiply(x, w, out=dst)
    elif x.dtype == np.float16 and abs(w) < _FOLD_LIMIT and not _f16_scaled_down(x.view(np.uint16), dst):
        # dst holds x * 2**-112 exactly, and w * 2**112 is exact too: their product is x * w
        # rounded once, the same fp32 as widening then multiplying, one pass fewer.
        np.multiply(dst, w * _TWO_112, out=dst)
    else:
        widen(x, dst)
        np.multiply(dst, w, out=dst)


def widen(x: np.ndarray, dst: np.ndarray) -> None:
    """dst = fp32(x), exactly: float32 copied, float16 and bf16 (uint16 patterns) by bit arithmetic.

    numpy's own float16 cast is scalar code (about 5 ns an element here, slower than the disk);
    these are a few vectorised passes each.
    """
    if x.dtype == np.uint16:
        u = dst.view(np.uint32)
        np.copyto(u, x)
        np.left_shift(u, 16, out=u)
    elif x.dtype == np.float16:
        _widen_f16(x.view(np.uint16), dst)
    else:
        np.copyto(dst, x)


def _f16_scaled_down(h: np.ndarray, dst: np.ndarray) -> bool:
    """dst = the halves `h` times 2**-112, exactly; True when some are inf or NaN (wrong in dst).

    Sign-extending the 16-bit pattern and shifting it by 13 puts the exponent and mantissa at
    their fp32 places with the sign in bits 31..28; clearing bits 30..28 leaves an fp32 2**112
    times too small (exponent bias 127 instead of 15), exact for normal and subnormal halves
    alike. Exponent 31 (inf, NaN) lands on 2**-96 and above (the largest finite half on less).
    """
    v = dst.view(np.int32)
    np.copyto(v, h.view(np.int16))
    np.left_shift(v, 13, out=v)
    np.bitwise_and(v, -0x70000001, out=v)  # 0x8FFFFFFF as an int32
    return bool(len(dst)) and bool(dst.max() >= _SPECIAL_SCALED or dst.min() <= -_SPECIAL_SCALED)


def _widen_f16(h: np.ndarray, dst: np.ndarray) -> None:
    special = _f16_scaled_down(h, dst)
    np.multiply(dst, _TWO_112, out=dst)  # exact: a power of two, no overflow
    if special:
        special = np.flatnonzero(np.abs(dst) >= 65536.0)
        m = h[special].astype(np.uint32)
        dst.view(np.uint32)[special] = ((m & 0x8000) << 16) | 0x7F800000 | ((m & 0x3FF) << 13)


def f16_bits(a: np.ndarray, dst: np.ndarray, x: np.ndarray, c: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The fp16 patterns of fp32 `a` rounded to nearest even, into uint32 `dst` (same length).

    The fp32 adder does the rounding: with M = 2**(e + 13), e the exponent of |a| (at least -14,
    fp16's smallest normal exponent), |a| + M lands in M's binade, whose spacing 2**(e - 10) is
    fp16's at |a| (2**-24 throughout the subnormal range), so the add rounds to nearest even at
    exactly fp16's precision (ties, subnormals, a carry into the next binade, 65520 up to 65536
    included), and subtracting M back is exact. That fp16 value times 2**-112 is an fp32 whose
    pattern shifted right by 13 is the fp16 pattern (the exponent biases differ by 112; fp16
    subnormals land on fp32 subnormals, exactly). |a| is first clamped to 65536, so that huge
    values become inf instead of overflowing M. No branch and no masked copy, where the Triton
    kernel's integer arithmetic (`_f32_to_f16_bits`) needs both on numpy: 2.17 against 2.42 ns an
    element for a whole fp16 merge, the same patterns. A NaN keeps its sign and top payload, made
    quiet, as there: every step keeps a NaN's payload and x86 quiets it. `x`, `c` (uint32) and
    `mask` (bool, unused) are scratch.
    """
    u = a.view(np.uint32)
    s = x.view(np.float32)
    np.bitwise_and(u, 0x7FFFFFFF, out=x)  # |a|
    np.minimum(s, _filled(_F16_CLAMP, len(s)), out=s)  # a NaN stays a NaN
    np.bitwise_and(x, 0x7F800000, out=c)
    np.maximum(c, _filled(_F16_MIN_NORMAL_BITS, len(c)), out=c)
    np.add(c, _TIMES_2_13, out=c)  # M; from a NaN's exponent it wraps to a finite number, harmless
    m = c.view(np.float32)
    np.add(s, m, out=s)
    np.subtract(s, m, out=s)
    np.multiply(s, _TWO_MINUS_112, out=s)
    np.right_shift(x, 13, out=dst)
    np.bitwise_and(dst, 0x7FFF, out=dst)  # only a NaN has bits above (its exponent's top)
    np.right_shift(u, 16, out=c)
    np.bitwise_and(c, 0x8000, out=c)
    np.bitwise_or(dst, c, out=dst)
    return dst


_FILLED: dict[tuple[object, object], np.ndarray] = {}


def _filled(value: np.generic, n: int) -> np.ndarray:
    """`n` copies of `value`, made once: numpy's minimum and maximum take 0.3 ns an element against
    a scalar (a broadcast loop) and 0.1 against an array (measured, numpy 2.4, this machine)."""
    key = (value.dtype, value.item())
    have = _FILLED.get(key)
    if have is None or len(have) < n:
        _FILLED[key] = have = np.full(max(n, BLOCK), value)  # racing threads make equal arrays
    return have[:n]


def bf16_bits(a: np.ndarray, dst: np.ndarray, x: np.ndarray, c: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The bf16 patterns of fp32 `a` rounded to nearest even, into uint32 `dst` (same length).

    The Triton kernel's `_f32_to_bf16_bits`: adding 0x7FFF plus the lowest kept bit carries into
    bit 16 exactly when the dropped half is above the tie, or at the tie with an odd kept half;
    a carry out of the mantissa bumps the exponent, which is how the largest values become inf.
    A NaN keeps its sign and top payload, made quiet (the carry could turn a NaN with a low-only
    payload into inf). `x`, `c` (uint32) and `mask` (bool) are scratch of the same length.
    """
    u = a.view(np.uint32)
    np.right_shift(u, 16, out=dst)
    np.bitwise_and(dst, 1, out=dst)
    np.add(dst, 0x7FFF, out=dst)
    np.add(dst, u, out=dst)
    np.right_shift(dst, 16, out=dst)
    np.bitwise_and(u, 0x7FFFFFFF, out=x)
    if len(x) and x.max() > 0x7F800000:
        np.greater(x, 0x7F800000, out=mask)
        np.right_shift(u, 16, out=c)
        np.bitwise_or(c, 0x40, out=c)
        np.copyto(dst, c, where=mask)
    return dst


def _typed(buf: np.ndarray, count: int, dtype: str, what: str) -> np.ndarray:
    """The first `count` elements of a uint8 buffer, viewed as `dtype` (no copy)."""
    if dtype not in _VIEWS:
        raise ValueError(f"{what}: dtype {dtype} is not mergeable (F32, F16, BF16)")
    nbytes = count * DTYPE_SIZES[dtype]
    if buf.dtype != np.uint8 or buf.ndim != 1 or len(buf) < nbytes:
        raise ValueError(f"{what}: need a 1-D uint8 buffer of at least {nbytes} bytes, got {buf.dtype} {buf.shape}")
    return buf[:nbytes].view(_VIEWS[dtype])
