"""Fused Triton chunk kernels (CUDA, or Triton's CPU interpreter with TRITON_INTERPRET=1).

They follow the arithmetic contract of `lazymerge.kernels.torch` bit for bit: inputs widened
to fp32, `acc = x0*w0; acc = acc + xi*wi` in input order, optional `acc / divisor`, every
operation rounded to fp32 on its own, then one round-to-nearest-even store.

Two things keep the GPU and the interpreter on that contract:
- Rounding. Triton's float-to-float casts are not the same everywhere (the interpreter
  truncates fp32 -> bf16), so the narrowing store is integer bit arithmetic on the fp32
  pattern: identical on every backend by construction. The one exception is fp16 on a GPU,
  which uses PTX `cvt.rn.f16.f32` (IEEE RNE, the same results, far fewer instructions).
- Contraction. On a GPU LLVM/ptxas may fuse `x*w + acc` into one FMA (a single rounding),
  and Triton's fp32 `/` is not the IEEE-rounded division. On CUDA every multiply, add and
  divide is therefore an inline PTX `mul.rn.f32` / `add.rn.f32` / `div.rn.f32`: instructions
  with an explicit rounding modifier are never contracted, and none of them flush subnormals
  (no `.ftz`), as torch on CPU does not. The interpreter has no inline assembly; there each
  operation is a numpy fp32 operation, already separately rounded.

A method declared `accumulation="fused"` (mergekit's `linear`) accumulates `acc = fma(xi, wi,
acc)` from +0 instead, one rounding each, as mergekit's `addcmul_` does on AVX2/AVX-512 CPUs:
`fma.rn.f32` on CUDA (explicit rounding, no flush), `tl.fma` under the interpreter, which
computes a true single-rounding fma (`_interpreter.fma_fp32`; checked against libm's `fmaf` in
the tests). The first term is `x0*w0 + 0.0` (an fma from +0 turns a -0 product into +0).

NaN results stay NaN, but their sign and payload are not part of the contract: torch itself
disagrees across machines (0xFFFF for bf16 NaN on AVX2 CPUs, 0x7FC0 in its scalar code, 0x7FFF
on CUDA; x86 and NVIDIA make different default NaNs for `inf*0`). Here a NaN is narrowed like
the IEEE hardware conversions do: sign and top payload bits kept, quiet bit set.

The module imports without Triton installed; `available()` says whether the path can run.
The interpreter mode is fixed when this module is imported (that is when `triton.jit` looks at
TRITON_INTERPRET), so set the variable before importing it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch

try:  # Triton is optional: CI installs it, users on CPU-only machines may not have it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["MAX_INPUTS", "available", "linear_combine"]

# Inputs one kernel launch combines; longer lists are folded through an fp32 accumulator.
MAX_INPUTS = 8
# Elements per program: large enough for wide vectorised loads on the GPU and to amortise the
# interpreter's per-op Python overhead, small enough to keep a good number of programs.
_BLOCK = 4096
_NUM_WARPS = 8
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_IMPORT_ERROR: str | None = None
_INTERPRETED = False

if triton is None:
    _IMPORT_ERROR = "triton is not installed"
else:

    @triton.jit
    def _mul_f32(a, b, USE_ASM: tl.constexpr):
        # `mul.rn` carries an explicit rounding mode, so ptxas never fuses it with an add.
        if USE_ASM:
            return tl.inline_asm_elementwise(
                "mul.rn.f32 $0, $1, $2;",
                "=f,f,f",
                [a, b],
                dtype=tl.float32,
                is_pure=True,
                pack=1,
            )
        else:
            return a * b

    @triton.jit
    def _add_f32(a, b, USE_ASM: tl.constexpr):
        if USE_ASM:
            return tl.inline_asm_elementwise(
                "add.rn.f32 $0, $1, $2;",
                "=f,f,f",
                [a, b],
                dtype=tl.float32,
                is_pure=True,
                pack=1,
            )
        else:
            return a + b

    @triton.jit
    def _fma_f32(a, b, c, USE_ASM: tl.constexpr):
        # One rounding of a*b + c: what mergekit's `addcmul_` computes on a vector CPU.
        if USE_ASM:
            return tl.inline_asm_elementwise(
                "fma.rn.f32 $0, $1, $2, $3;",
                "=f,f,f,f",
                [a, b, c],
                dtype=tl.float32,
                is_pure=True,
                pack=1,
            )
        else:
            return tl.fma(a, b, c)

    @triton.jit
    def _div_f32(a, b, USE_ASM: tl.constexpr):
        # Triton's `/` on fp32 lowers to an approximate division on NVIDIA; `div.rn` is IEEE.
        if USE_ASM:
            return tl.inline_asm_elementwise(
                "div.rn.f32 $0, $1, $2;",
                "=f,f,f",
                [a, b],
                dtype=tl.float32,
                is_pure=True,
                pack=1,
            )
        else:
            return a / b

    @triton.jit
    def _widen(x):
        # bf16 is the top half of an fp32 pattern: widening by a shift is exact on every
        # backend and does not depend on how the interpreter emulates bf16.
        if x.dtype == tl.bfloat16:
            return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            return x.to(tl.float32)

    @triton.jit
    def _f32_to_bf16_bits(x):
        """Round fp32 to bf16 (nearest, ties to even); returns the uint16 patterns."""
        u = x.to(tl.uint32, bitcast=True)
        # Adding 0x7FFF plus the lsb of the kept half carries into bit 16 exactly when the
        # dropped half is above the tie, or at the tie with an odd kept half. A carry out of
        # the mantissa bumps the exponent, which is also how large values become inf.
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        # A NaN keeps its sign and top payload, made quiet (the carry above could turn a NaN
        # with a low-only payload into inf or the wrong sign).
        is_nan = (u & 0x7FFFFFFF) > 0x7F800000
        rounded = tl.where(is_nan, (u >> 16) | 0x40, rounded)
        return rounded.to(tl.uint16)

    @triton.jit
    def _f32_to_f16_bits(x):
        """Round fp32 to fp16 (nearest, ties to even, subnormals, overflow to inf)."""
        u = x.to(tl.uint32, bitcast=True)
        sign = (u >> 16) & 0x8000
        a = u & 0x7FFFFFFF
        # Normal fp16 range (|x| >= 2**-14): rebias the exponent (127 -> 15) and round the
        # mantissa from 23 to 10 bits as for bf16; a carry steps into the next binade.
        # The unsigned wrap of the subtraction below that range is never selected.
        r = a - 0x38000000
        normal = (r + 0xFFF + ((r >> 13) & 1)) >> 13
        # Subnormal fp16 (|x| < 2**-14): the result is |x| / 2**-24 rounded to an integer,
        # i.e. the significand (implicit bit made explicit) shifted right by 126 - exponent.
        # From a shift of 25 on everything rounds to zero; clamping keeps the shift defined
        # (the unsigned wrap for large exponents also lands on the clamp, and is not chosen).
        e = a >> 23
        m = (a & 0x7FFFFF) | 0x800000
        s = tl.minimum(126 - e, 25)
        q = m >> s
        rem = m - (q << s)
        half = 1 << (s - 1)  # uint32: the int constant is promoted to s's unsigned type
        round_up = (rem > half) | ((rem == half) & ((q & 1) == 1))
        sub = q + round_up.to(tl.uint32)
        h = tl.where(a < 0x38800000, sub, normal)
        # 65520 is the tie between 65504 (odd mantissa) and 65536: it and all above are inf.
        h = tl.where(a >= 0x477FF000, 0x7C00, h)
        h = tl.where(a > 0x7F800000, 0x7E00 | ((a >> 13) & 0x3FF), h)
        return (h | sign).to(tl.uint16)

    @triton.jit
    def _f32_to_f16(x, USE_ASM: tl.constexpr):
        # On the GPU the hardware conversion with an explicit `.rn` is IEEE round-to-nearest-
        # even (subnormals and overflow included): the same result as the bit arithmetic at a
        # fraction of its ~30 integer ops, which made the fp16 store compute-bound (the fp16
        # DogeRM kernel ran at 75% of copy bandwidth on an H200, bf16 at 97%). The interpreter keeps the integer
        # path, identical on every backend by construction.
        if USE_ASM:
            h = tl.inline_asm_elementwise(
                "cvt.rn.f16.f32 $0, $1;",
                "=h,f",
                [x],
                dtype=tl.float16,
                is_pure=True,
                pack=1,
            )
            # The hardware makes every NaN the canonical 0x7FFF; keep the documented narrowing
            # (sign and top payload bits, quiet bit set) that the integer path gives.
            u = x.to(tl.uint32, bitcast=True)
            a = u & 0x7FFFFFFF
            nan = (((u >> 16) & 0x8000) | 0x7E00 | ((a >> 13) & 0x3FF)).to(tl.uint16)
            return tl.where(a > 0x7F800000, nan.to(tl.float16, bitcast=True), h)
        else:
            return _f32_to_f16_bits(x).to(tl.float16, bitcast=True)

    @triton.jit
    def _store_rounded(out_ptr, offs, mask, acc, USE_ASM: tl.constexpr):
        # The output dtype is a compile-time property of the pointer: one branch survives.
        if out_ptr.dtype.element_ty == tl.bfloat16:
            tl.store(out_ptr + offs, _f32_to_bf16_bits(acc).to(tl.bfloat16, bitcast=True), mask=mask)
        elif out_ptr.dtype.element_ty == tl.float16:
            tl.store(out_ptr + offs, _f32_to_f16(acc, USE_ASM), mask=mask)
        else:
            tl.store(out_ptr + offs, acc, mask=mask)

    @triton.jit
    def _term(x_ptr, w_bits, offs, mask, USE_ASM: tl.constexpr):
        # Weights arrive as int32 fp32 patterns: a Python float argument would be typed fp64
        # by the interpreter when it is an fp32 subnormal, and a bit pattern is exact anyway.
        x = _widen(tl.load(x_ptr + offs, mask=mask, other=0.0))
        return _mul_f32(x, w_bits.to(tl.float32, bitcast=True), USE_ASM)

    @triton.jit
    def _first(
        x_ptr, w_bits, offs, mask, FUSED: tl.constexpr, CARRY: tl.constexpr, USE_ASM: tl.constexpr, BLOCK: tl.constexpr
    ):
        if CARRY:
            # The fp32 running sum of an earlier launch, taken as it is (fused mode only: an
            # fma from +0 would turn a -0 sum into +0).
            return tl.load(x_ptr + offs, mask=mask, other=0.0)
        elif FUSED:
            # mergekit's first `addcmul_` onto zeros: a -0 product becomes +0.
            return _accumulate(tl.zeros((BLOCK,), tl.float32), x_ptr, w_bits, offs, mask, FUSED, USE_ASM)
        else:
            return _term(x_ptr, w_bits, offs, mask, USE_ASM)

    @triton.jit
    def _accumulate(acc, x_ptr, w_bits, offs, mask, FUSED: tl.constexpr, USE_ASM: tl.constexpr):
        if FUSED:
            x = _widen(tl.load(x_ptr + offs, mask=mask, other=0.0))
            return _fma_f32(x, w_bits.to(tl.float32, bitcast=True), acc, USE_ASM)
        else:
            return _add_f32(acc, _term(x_ptr, w_bits, offs, mask, USE_ASM), USE_ASM)

    @triton.jit(do_not_specialize=["w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7", "divisor"])
    def _linear_combine_kernel(
        out_ptr,
        x0,
        x1,
        x2,
        x3,
        x4,
        x5,
        x6,
        x7,
        w0,
        w1,
        w2,
        w3,
        w4,
        w5,
        w6,
        w7,
        divisor,
        n,
        N_IN: tl.constexpr,
        HAS_DIVISOR: tl.constexpr,
        FUSED: tl.constexpr,
        CARRY: tl.constexpr,
        USE_ASM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program per BLOCK-element slice; int64 offsets so huge chunks cannot wrap.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        # Unused pointer slots are never read: N_IN is a compile-time constant.
        acc = _first(x0, w0, offs, mask, FUSED, CARRY, USE_ASM, BLOCK)
        if N_IN > 1:
            acc = _accumulate(acc, x1, w1, offs, mask, FUSED, USE_ASM)
        if N_IN > 2:
            acc = _accumulate(acc, x2, w2, offs, mask, FUSED, USE_ASM)
        if N_IN > 3:
            acc = _accumulate(acc, x3, w3, offs, mask, FUSED, USE_ASM)
        if N_IN > 4:
            acc = _accumulate(acc, x4, w4, offs, mask, FUSED, USE_ASM)
        if N_IN > 5:
            acc = _accumulate(acc, x5, w5, offs, mask, FUSED, USE_ASM)
        if N_IN > 6:
            acc = _accumulate(acc, x6, w6, offs, mask, FUSED, USE_ASM)
        if N_IN > 7:
            acc = _accumulate(acc, x7, w7, offs, mask, FUSED, USE_ASM)
        if HAS_DIVISOR:
            acc = _div_f32(acc, divisor.to(tl.float32, bitcast=True), USE_ASM)
        _store_rounded(out_ptr, offs, mask, acc, USE_ASM)

    @triton.jit
    def _round_kernel(out_ptr, src_ptr, n, USE_ASM: tl.constexpr, BLOCK: tl.constexpr):
        # Only the narrowing store, for testing the rounding helpers on raw bit patterns.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        _store_rounded(out_ptr, offs, mask, tl.load(src_ptr + offs, mask=mask, other=0.0), USE_ASM)

    # `triton.jit` returned an interpreter object iff TRITON_INTERPRET was set at import.
    _INTERPRETED = type(_linear_combine_kernel).__name__ == "InterpretedFunction"


def available() -> tuple[bool, str]:
    """Whether the Triton path can run in this process, and on what (or why not)."""
    if _IMPORT_ERROR is not None:
        return False, _IMPORT_ERROR
    if _INTERPRETED:
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1), CPU tensors"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 before import to use the interpreter)"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def linear_combine(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    out: torch.Tensor,
    divisor: float | None = None,
    *,
    acc: torch.Tensor | None = None,
    tmp: torch.Tensor | None = None,
    accumulation: str = "rounded",
) -> torch.Tensor:
    """Weighted sum of chunks into `out`; same contract and result as the torch kernel.

    Args:
        inputs: contiguous tensors of `out.numel()` elements, each F32, F16 or BF16, on the
            device Triton runs on (CUDA, or CPU under the interpreter).
        weights: one Python float per input (rounded to fp32 as the torch kernel does).
        out: contiguous destination, F32, F16 or BF16.
        divisor: when given, the sum is divided by it.
        acc: optional fp32 scratch of at least `out.numel()` elements, only used when there are
            more than MAX_INPUTS inputs (the running sum is carried through it in fp32).
        tmp: accepted for signature compatibility; not needed by the fused kernel.
        accumulation: "rounded" (product and sum rounded apart) or "fused" (`acc = fma(xi, wi,
            acc)` from +0, mergekit's `addcmul_`); see `lazymerge.methods.ACCUMULATIONS`.

    Returns:
        `out`.
    """
    del tmp  # the fused kernel keeps products in registers
    ok, why = available()
    if not ok:
        raise RuntimeError(f"Triton path unavailable: {why}")
    if len(inputs) != len(weights) or not inputs:
        raise ValueError("need one weight per input and at least one input")
    if accumulation not in ("rounded", "fused"):
        raise ValueError(f"accumulation must be 'rounded' or 'fused', got {accumulation!r}")
    fused = accumulation == "fused"
    n = out.numel()
    _check(out, n, "out")
    for i, x in enumerate(inputs):
        _check(x, n, f"inputs[{i}]")
    _check_device(out, inputs)
    if n == 0:
        return out

    w_bits = _f32_bits(weights)
    d_bits = _f32_bits([divisor])[0] if divisor is not None else 0
    xs = list(inputs)
    if len(xs) > MAX_INPUTS:
        # acc*1.0 is exact for every fp32 value, so folding the running sum back in as input 0
        # with weight 1.0 continues the same in-order fp32 recurrence.
        carry = _scratch(acc, n, out.device)
        one = _f32_bits([1.0])[0]
        _launch(carry, xs[:MAX_INPUTS], w_bits[:MAX_INPUTS], None, fused)
        start = MAX_INPUTS
        while len(xs) - start > MAX_INPUTS - 1:
            stop = start + MAX_INPUTS - 1
            _launch(carry, [carry, *xs[start:stop]], [one, *w_bits[start:stop]], None, fused, carry=fused)
            start = stop
        xs, w_bits = [carry, *xs[start:]], [one, *w_bits[start:]]
        _launch(out, xs, w_bits, d_bits if divisor is not None else None, fused, carry=fused)
        return out
    _launch(out, xs, w_bits, d_bits if divisor is not None else None, fused)
    return out


def _launch(
    out: torch.Tensor,
    xs: list[torch.Tensor],
    w_bits: list[int],
    d_bits: int | None,
    fused: bool = False,
    *,
    carry: bool = False,
) -> None:
    """One launch over `xs`; with `carry`, input 0 is the fp32 running sum of an earlier one."""
    n = out.numel()
    k = len(xs)
    # Unused slots repeat input 0 (same dtype, so no extra kernel variants); never read.
    ptrs = xs + [xs[0]] * (MAX_INPUTS - k)
    ws = w_bits + [0] * (MAX_INPUTS - k)
    grid = (math.ceil(n / _BLOCK),)
    with _quiet_interpreter():
        _linear_combine_kernel[grid](
            out,
            *ptrs,
            *ws,
            d_bits if d_bits is not None else 0,
            n,
            N_IN=k,
            HAS_DIVISOR=d_bits is not None,
            FUSED=fused,
            CARRY=carry,
            USE_ASM=not _INTERPRETED,
            BLOCK=_BLOCK,
            num_warps=_NUM_WARPS,
            # Belt and braces: the PTX ops cannot fuse, and nothing else should either.
            **_launch_options(),
        )


def _launch_options() -> dict[str, Any]:
    return {} if _INTERPRETED else {"enable_fp_fusion": False}


def _quiet_interpreter() -> contextlib.AbstractContextManager[Any]:
    # The interpreter runs the ops in numpy, which warns on inf/NaN results; those are
    # ordinary IEEE results here (as they are for torch), not errors.
    if not _INTERPRETED:
        return contextlib.nullcontext()
    import numpy  # the interpreter itself depends on numpy

    return numpy.errstate(all="ignore")


def _round_store(src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Narrow fp32 `src` into `out` with the kernels' rounding only (a test hook)."""
    ok, why = available()
    if not ok:
        raise RuntimeError(f"Triton path unavailable: {why}")
    if src.dtype != torch.float32:
        raise ValueError("src must be float32")
    n = out.numel()
    _check(out, n, "out")
    _check(src, n, "src")
    if n:
        with _quiet_interpreter():
            _round_kernel[(math.ceil(n / _BLOCK),)](
                out, src, n, USE_ASM=not _INTERPRETED, BLOCK=_BLOCK, num_warps=_NUM_WARPS
            )
    return out


def _f32_bits(values: Sequence[float]) -> list[int]:
    # torch's double -> fp32 conversion is the one the reference kernel uses (RNE, overflow to
    # inf); the int32 view carries the exact pattern into the kernel.
    return torch.tensor([float(v) for v in values], dtype=torch.float32).view(torch.int32).tolist()


def _check(t: torch.Tensor, n: int, name: str) -> None:
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} is not float32, float16 or bfloat16")
    if t.numel() != n:
        raise ValueError(f"{name}: {t.numel()} elements, expected {n}")
    if not t.is_contiguous():
        # The kernel indexes flat memory; a strided view would be read wrongly.
        raise ValueError(f"{name}: must be contiguous")


def _check_device(out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> None:
    want = "cpu" if _INTERPRETED else "cuda"
    for t in (out, *inputs):
        if t.device.type != want or t.device != out.device:
            raise ValueError(f"tensors must all be on one {want} device for this Triton mode, got {t.device}")


def _scratch(buf: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if buf is None:
        return torch.empty(n, dtype=torch.float32, device=device)
    if buf.dtype != torch.float32 or buf.numel() < n or buf.device != device or not buf.is_contiguous():
        raise ValueError("acc must be a contiguous float32 buffer of at least n elements on the device")
    return buf.view(-1)[:n]
