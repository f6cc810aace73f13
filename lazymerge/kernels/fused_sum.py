"""An exact fp32 fused multiply-add on numpy arrays: `acc = fma(x, w, acc)`, one rounding.

mergekit's `linear` accumulates with `result.addcmul_(x, w)`, which torch's AVX2 and AVX-512 CPU
kernels compile to a fused multiply-add (measured on torch 2.13: every element, vector body and
scalar tail; its non-vector build, `ATEN_CPU_CAPABILITY=default`, rounds twice instead). numpy
has no fma, so it is emulated in float64, exactly:

- the product of two fp32 values has at most 48 significant bits and lies in [2**-298, 2**256]:
  exact in float64 (53 bits, no overflow, no subnormals);
- `s = p + acc` in float64 is the exact sum `x = p + acc` rounded once. Rounding `s` to fp32
  gives fp32's rounding of `x` except when `s` is exactly halfway between two fp32 values and
  `s != x` (a double rounding): no fp32 halfway point lies strictly between `x` and `s`, since
  it would be a float64 nearer to `x` than `s`. Halfway points have at most 25 significant
  bits, so their low 28 float64 mantissa bits are zero (subnormal fp32 results included);
- only where those bits are zero the error `e = x - s` is computed exactly (Knuth's TwoSum) and
  `s` is replaced by `x` rounded to odd (round toward zero, then set the last bit when inexact).
  Rounding to odd in 53 bits, then to nearest in 24, is the correct rounding of `x` (Boldo and
  Melquiond 2008). That test also catches every exact fp32 value, and with round weights (0.5,
  0.25) most sums of 16-bit inputs are exactly that: when more than 1/32 of a block is caught,
  the candidates are narrowed to what can be a halfway point: in fp32's normal range the 29
  float64 mantissa bits fp32 drops are exactly `1 000...0`; below it (subnormal fp32 results),
  every nonzero value is kept. A sum that is 0 is exact (with gradual underflow `a + b == 0`
  only when `a == -b`), so zeros never need the fix.

Inf and NaN follow IEEE (an inf product stays inf, inf - inf is NaN); a NaN only has to be a NaN,
as for every kernel (`lazymerge.kernels.triton`). Torch-free.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FusedScratch", "fma_into"]

_LOW_BITS = np.int64(0x0FFFFFFF)  # the float64 mantissa bits below every fp32 halfway point
_DROPPED = np.int64(0x1FFFFFFF)  # the float64 mantissa bits fp32 drops (normal range)
_HALFWAY = np.int64(0x10000000)  # ... as they are at a halfway point
_MAGNITUDE = np.int64(0x7FFFFFFFFFFFFFFF)
_FP32_NORMAL = np.float64(2.0**-126).view(np.int64)  # below it, a sum rounds to an fp32 subnormal


class FusedScratch:
    """Work arrays of `fma_into` (float64, int64 and bool), `n` elements each, reused across calls."""

    def __init__(self, n: int) -> None:
        self.s = np.empty(n, dtype=np.float64)
        self.low = np.empty(n, dtype=np.int64)
        self.mask = np.empty(n, dtype=np.bool_)
        self.other = np.empty(n, dtype=np.bool_)


def fma_into(acc: np.ndarray, x: np.ndarray, w: np.float32, scratch: FusedScratch | None = None) -> np.ndarray:
    """`acc = fma(x, w, acc)` elementwise on fp32 arrays, rounded once to nearest even.

    Args:
        acc: float32 accumulator, updated in place.
        x: float32 array of the same length.
        w: the fp32 weight.
        scratch: float64 work arrays of at least `len(acc)` elements (fresh ones when None).

    Returns:
        `acc`.
    """
    n = len(acc)
    sc = scratch or FusedScratch(n)
    s, low, mask, other = sc.s[:n], sc.low[:n], sc.mask[:n], sc.other[:n]
    w64 = np.float64(w)
    # Same-type passes (widen, then operate in place): numpy's mixed-type loops cast through a
    # buffer and cost about twice as much. `low` holds the widened accumulator until it is used.
    a64 = low.view(np.float64)
    with np.errstate(all="ignore"):  # inf and NaN are results like any other here
        np.copyto(s, x)
        np.multiply(s, w64, out=s)  # exact
        np.copyto(a64, acc)
        np.add(s, a64, out=s)  # the exact sum, rounded once in float64
        np.bitwise_and(s.view(np.int64), _LOW_BITS, out=low)
        np.equal(low, 0, out=mask)
        if np.count_nonzero(mask) > n >> 5:  # round weights: mostly exact fp32 values, narrow down
            bits = s.view(np.int64)
            np.bitwise_and(bits, _DROPPED, out=low)
            np.equal(low, _HALFWAY, out=mask)  # halfway points of the normal range
            np.bitwise_and(bits, _MAGNITUDE, out=low)
            np.less(low, _FP32_NORMAL, out=other)  # the subnormal range...
            np.logical_and(other, low, out=other)  # ... less the zeros
            np.logical_or(mask, other, out=mask)
        idx = np.flatnonzero(mask)
        if len(idx):
            p = x[idx].astype(np.float64) * w64
            s[idx] = _round_to_odd(p, acc[idx].astype(np.float64), s[idx])
        np.copyto(acc, s, casting="same_kind")  # float64 -> fp32: round to nearest even
    return acc


def _round_to_odd(p: np.ndarray, a: np.ndarray, s: np.ndarray) -> np.ndarray:
    """`p + a` rounded to odd in float64, given `s`, the same sum rounded to nearest."""
    bb = s - a
    e = (a - (s - bb)) + (p - bb)  # TwoSum: p + a == s + e exactly (finite s)
    bits = s.view(np.int64)  # s is a fresh array (fancy indexing): safe to change in place
    # Inexact and even: round-to-odd is the odd neighbour on e's side (one step in the
    # sign-magnitude pattern: away from zero when e has s's sign, towards it otherwise). An odd
    # s already is that neighbour. A non-finite e comes from an inf or NaN s, left as it is.
    fix = np.isfinite(e) & (e != 0) & ((bits & 1) == 0)
    if fix.any():
        away = (e > 0) == (s > 0)
        bits[fix] += np.where(away[fix], 1, -1)
    return s
