"""Fused Triton kernel for the task-vector methods that are elementwise: task_arithmetic,
dare_linear and dare_ties, the methods whose declaration names it (`lazymerge.methods.registry`)
(CUDA, or Triton's CPU interpreter with TRITON_INTERPRET=1).

It computes `lazymerge.methods.task_arithmetic.generalized_task_arithmetic` bit for bit, one
element per lane, in the reference's operation order (each step rounded to fp32 on its own):

    d_i = x_i - base                      per non-base model i, in model order
    d_i = d_i * keep_i                    DARE: keep_i is 1.0 or 0.0 (0 * inf is NaN, as in torch)
    d_i = d_i / density_i                 DARE rescale, when 0 < density < 1
    d_i = d_i * w_i
    consensus (dare_ties):  m_i = sign(d_i) == (sum_i d_i >= 0 ? +1 : -1)
                            mixed = 0 + d_1*m_1 + ...; divisor = 0 + w_1*m_1 + ... (0 -> 1)
    otherwise:              mixed = 0 + d_1 + ...;      divisor = sum of weights (|.| < 1e-8 -> 1)
    normalize: mixed / divisor;  lambda != 1: mixed * lambda;  out = base + mixed

(torch's sum over models starts from +0.0 and adds in order; so does this kernel.) DARE's keep
decision is the same counter-based draw as `lazymerge.methods.dare.keep_mask`: splitmix64 of
(element index * golden ratio + key(seed, tensor, model)), kept iff its top 53 bits are below
density * 2**53, so masks agree between CPU and GPU whatever the chunking.

Multiplies, adds and divides go through the `_mul_f32` / `_add_f32` / `_div_f32` helpers of
`lazymerge.kernels.triton` (explicitly rounded PTX on a GPU: no FMA contraction).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lazymerge import methods
from lazymerge.kernels import triton as lt
from lazymerge.methods.registry import TASK_VECTOR_GPU

__all__ = ["GPU_METHODS", "MAX_MODELS", "task_vector_combine"]

# The methods declared with this kernel (derived: the registry is the one table).
GPU_METHODS = tuple(n for n in methods.names() if methods.get(n).gpu == TASK_VECTOR_GPU)
# Non-base models one launch handles (the base is an extra input): the kernel is unrolled.
MAX_MODELS = 7
assert TASK_VECTOR_GPU.max_inputs == MAX_MODELS + 1
_BLOCK = 1024  # smaller than the linear kernel's: up to 8 live fp32 deltas per lane
_NUM_WARPS = 4

if lt.triton is not None:
    import triton
    import triton.language as tl

    from lazymerge.kernels.triton import _add_f32, _div_f32, _mul_f32, _store_rounded, _widen

    @triton.jit
    def _keep(key, limit, idx):
        # splitmix64 (lazymerge.methods.dare._mix) on the element counter; uint64 wraps.
        z = idx * 0x9E3779B97F4A7C15 + key
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        z = z ^ (z >> 31)
        return tl.where((z >> 11) < limit, 1.0, 0.0).to(tl.float32)

    @triton.jit
    def _delta(x_ptr, b, offs, mask, idx, w, key, limit, density, DARE: tl.constexpr, RESCALE: tl.constexpr,
               USE_ASM: tl.constexpr):  # fmt: skip
        d = _add_f32(_widen(tl.load(x_ptr + offs, mask=mask, other=0.0)), -b, USE_ASM)
        if DARE:
            key = key.to(tl.int64).to(tl.uint64, bitcast=True)  # int32 when it fits: sign-extend first
            d = _mul_f32(d, _keep(key, limit.to(tl.int64).to(tl.uint64), idx), USE_ASM)
            if RESCALE:
                d = _div_f32(d, density.to(tl.float32, bitcast=True), USE_ASM)
        return _mul_f32(d, w.to(tl.float32, bitcast=True), USE_ASM)

    @triton.jit
    def _agree(d, positive):
        # sign(d) == majority: strictly positive (or negative) deltas only; 0 and NaN never agree.
        return tl.where(positive, d > 0, d < 0).to(tl.float32)

    # Scalars are never specialised (Triton would turn a 1 into a constant and type small ints
    # as int32); the kernel widens them itself.
    @triton.jit(
        do_not_specialize=[f"{p}{j}" for p in "wklr" for j in range(1, 8)] + ["element_start", "lam", "divisor"]
    )
    def _task_vector_kernel(
        out_ptr, base_ptr, x1, x2, x3, x4, x5, x6, x7,
        w1, w2, w3, w4, w5, w6, w7,
        k1, k2, k3, k4, k5, k6, k7,
        l1, l2, l3, l4, l5, l6, l7,
        r1, r2, r3, r4, r5, r6, r7,
        element_start, lam, divisor, n,
        N: tl.constexpr, DARE: tl.constexpr, RESCALE: tl.constexpr, CONSENSUS: tl.constexpr,
        NORMALIZE: tl.constexpr, HAS_LAMBDA: tl.constexpr, USE_ASM: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # Per model j: x_j input, w_j weight, k_j DARE key, l_j keep limit, r_j density (fp32
        # bits; RESCALE is a bit mask of the models whose kept deltas are divided by it).
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        idx = (offs + element_start.to(tl.int64)).to(tl.uint64)
        b = _widen(tl.load(base_ptr + offs, mask=mask, other=0.0))
        zero = tl.zeros_like(b)
        d1 = _delta(x1, b, offs, mask, idx, w1, k1, l1, r1, DARE, (RESCALE & 1) != 0, USE_ASM)
        d2 = zero
        d3 = zero
        d4 = zero
        d5 = zero
        d6 = zero
        d7 = zero
        if N > 1:
            d2 = _delta(x2, b, offs, mask, idx, w2, k2, l2, r2, DARE, (RESCALE & 2) != 0, USE_ASM)
        if N > 2:
            d3 = _delta(x3, b, offs, mask, idx, w3, k3, l3, r3, DARE, (RESCALE & 4) != 0, USE_ASM)
        if N > 3:
            d4 = _delta(x4, b, offs, mask, idx, w4, k4, l4, r4, DARE, (RESCALE & 8) != 0, USE_ASM)
        if N > 4:
            d5 = _delta(x5, b, offs, mask, idx, w5, k5, l5, r5, DARE, (RESCALE & 16) != 0, USE_ASM)
        if N > 5:
            d6 = _delta(x6, b, offs, mask, idx, w6, k6, l6, r6, DARE, (RESCALE & 32) != 0, USE_ASM)
        if N > 6:
            d7 = _delta(x7, b, offs, mask, idx, w7, k7, l7, r7, DARE, (RESCALE & 64) != 0, USE_ASM)
        # Plain sum of the weighted deltas, from +0.0 in model order (torch's sum over dim 0).
        total = _add_f32(zero, d1, USE_ASM)
        if N > 1:
            total = _add_f32(total, d2, USE_ASM)
        if N > 2:
            total = _add_f32(total, d3, USE_ASM)
        if N > 3:
            total = _add_f32(total, d4, USE_ASM)
        if N > 4:
            total = _add_f32(total, d5, USE_ASM)
        if N > 5:
            total = _add_f32(total, d6, USE_ASM)
        if N > 6:
            total = _add_f32(total, d7, USE_ASM)
        if CONSENSUS:
            positive = total >= 0  # NaN -> negative majority, as `(sum >= 0) * 2 - 1` gives
            m = _agree(d1, positive)
            mixed = _add_f32(zero, _mul_f32(d1, m, USE_ASM), USE_ASM)
            div = _add_f32(zero, _mul_f32(w1.to(tl.float32, bitcast=True), m, USE_ASM), USE_ASM)
            if N > 1:
                m = _agree(d2, positive)
                mixed = _add_f32(mixed, _mul_f32(d2, m, USE_ASM), USE_ASM)
                div = _add_f32(div, _mul_f32(w2.to(tl.float32, bitcast=True), m, USE_ASM), USE_ASM)
            if N > 2:
                m = _agree(d3, positive)
                mixed = _add_f32(mixed, _mul_f32(d3, m, USE_ASM), USE_ASM)
                div = _add_f32(div, _mul_f32(w3.to(tl.float32, bitcast=True), m, USE_ASM), USE_ASM)
            if N > 3:
                m = _agree(d4, positive)
                mixed = _add_f32(mixed, _mul_f32(d4, m, USE_ASM), USE_ASM)
                div = _add_f32(div, _mul_f32(w4.to(tl.float32, bitcast=True), m, USE_ASM), USE_ASM)
            if N > 4:
                m = _agree(d5, positive)
                mixed = _add_f32(mixed, _mul_f32(d5, m, USE_ASM), USE_ASM)
                div = _add_f32(div, _mul_f32(w5.to(tl.float32, bitcast=True), m, USE_ASM), USE_ASM)
            if N > 5:
                m = _agree(d6, positive)
                mixed = _add_f32(mixed, _mul_f32(d6, m, USE_ASM), USE_ASM)
                div = _add_f32(div, _mul_f32(w6.to(tl.float32, bitcast=True), m, USE_ASM), USE_ASM)
            if N > 6:
                m = _agree(d7, positive)
                mixed = _add_f32(mixed, _mul_f32(d7, m, USE_ASM), USE_ASM)
                div = _add_f32(div, _mul_f32(w7.to(tl.float32, bitcast=True), m, USE_ASM), USE_ASM)
            div = tl.where(div == 0, 1.0, div)
        else:
            mixed = total
            div = zero + divisor.to(tl.float32, bitcast=True)
        if NORMALIZE:
            mixed = _div_f32(mixed, div, USE_ASM)
        if HAS_LAMBDA:
            mixed = _mul_f32(mixed, lam.to(tl.float32, bitcast=True), USE_ASM)
        _store_rounded(out_ptr, offs, mask, _add_f32(b, mixed, USE_ASM), USE_ASM)


def task_vector_combine(
    method: str, inputs: Sequence[torch.Tensor], params: Mapping[str, Any], out: torch.Tensor, element_start: int
) -> torch.Tensor:
    """One chunk of `method` (see GPU_METHODS) into `out`; the same bytes as the CPU backend.

    `inputs` are the base model's chunk then the other models', on the Triton device, each in
    its own dtype; `params` are the planner's per-tensor parameters; `element_start` is the
    chunk's first element in the tensor (DARE's counter).
    """
    ok, why = lt.available()
    if not ok:
        raise RuntimeError(f"Triton path unavailable: {why}")
    if method not in GPU_METHODS:
        raise ValueError(f"no GPU kernel for merge method {method!r}")
    options = methods.get(method).options
    n = out.numel()
    lt._check(out, n, "out")
    for i, x in enumerate(inputs):
        lt._check(x, n, f"inputs[{i}]")
    lt._check_device(out, inputs)
    others = len(inputs) - 1
    if not 1 <= others <= MAX_MODELS:
        raise ValueError(f"the GPU kernel merges 1..{MAX_MODELS} models onto a base, got {others}")
    if n == 0:
        return out
    weights = [float(w) for w in params["weights"]]
    dare = options["sparsify"] == "dare"
    consensus = bool(options["consensus"])
    keys, limits, densities, rescale = [0] * others, [0] * others, [0] * others, 0
    if dare:
        from lazymerge.methods.dare import stream_key

        seed, name = params.get("seed", 0), params["tensor"]
        for i, d in enumerate(params["densities"]):
            key = stream_key(seed, name, i + 1)
            keys[i] = key - (1 << 64) if key >= 1 << 63 else key  # passed as int64, bitcast back
            # keep_mask keeps everything at density >= 1 and nothing at <= 0; the limit matches.
            limits[i] = 0 if d <= 0 else min(int(d * (1 << 53)), 1 << 53) if d < 1 else 1 << 53
            if params.get("rescale", True) and 0 < d < 1:
                rescale |= 1 << i
                densities[i] = lt._f32_bits([d])[0]
    lam = float(params.get("lambda", 1.0))
    # The plain-sum divisor exactly as the reference computes it: fp32 sum from 0, tiny -> 1.
    w = torch.tensor(weights, dtype=torch.float32).unsqueeze(-1)
    divisor = w.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    pad = MAX_MODELS - others
    xs = list(inputs[1:]) + [inputs[1]] * pad  # unused slots are never read
    with lt._quiet_interpreter():
        _task_vector_kernel[(math.ceil(n / _BLOCK),)](
            out,
            inputs[0],
            *xs,
            *(lt._f32_bits(weights) + [0] * pad),
            *(keys + [0] * pad),
            *(limits + [0] * pad),
            *(densities + [0] * pad),
            element_start,
            lt._f32_bits([lam])[0],
            int(divisor.view(torch.int32).item()),
            n,
            N=others,
            DARE=dare,
            RESCALE=rescale,
            CONSENSUS=consensus,
            NORMALIZE=bool(params.get("normalize", False)),
            HAS_LAMBDA=lam != 1,
            USE_ASM=not lt._INTERPRETED,
            BLOCK=_BLOCK,
            num_warps=_NUM_WARPS,
            **lt._launch_options(),
        )
    return out
