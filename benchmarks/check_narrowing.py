"""Check (not a test: about a minute per dtype): the numpy path's fp32 -> fp16/bf16 store equals
torch's conversion on every one of the 2**32 fp32 bit patterns.

`lazymerge.kernels.numpy_cpu.f16_bits` and `bf16_bits` round to nearest even without torch; the
test suite checks special and random patterns (`tests/test_numpy_backend.py`), this checks them
all. A NaN must give the Triton kernel's narrowing (sign and top payload kept, quiet bit set),
which is what torch gives too except for the payload bits it drops.

    python benchmarks/check_narrowing.py            # F16 and BF16
    python benchmarks/check_narrowing.py --dtype F16

Prints the mismatches per dtype (0 expected) and exits 1 when there is any.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lazymerge.kernels import numpy_cpu

STEP = 1 << 24  # patterns per slice: 64 MiB of fp32


def mismatches(dtype: str) -> int:
    rounding = numpy_cpu.f16_bits if dtype == "F16" else numpy_cpu.bf16_bits
    target = torch.float16 if dtype == "F16" else torch.bfloat16
    low = np.arange(STEP, dtype=np.uint32)
    dst, x, c = (np.empty(STEP, np.uint32) for _ in range(3))
    mask = np.empty(STEP, np.bool_)
    bad = 0
    with np.errstate(all="ignore"):
        for high in range(1 << 32 - 24):
            bits = low | np.uint32(high << 24)
            a = bits.view(np.float32)
            got = rounding(a, dst, x, c, mask).astype(np.uint16)
            want = torch.from_numpy(a.copy()).to(target).view(torch.int16).numpy().view(np.uint16)
            nan = np.isnan(a)
            if dtype == "F16":
                narrowed = ((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)
            else:
                narrowed = (bits >> 16) | 0x40
            want = np.where(nan, narrowed.astype(np.uint16), want)
            bad += int(np.count_nonzero(got != want))
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=["F16", "BF16"], action="append")
    args = ap.parse_args(argv)
    failed = False
    for dtype in args.dtype or ["F16", "BF16"]:
        began = time.perf_counter()
        bad = mismatches(dtype)
        failed |= bad > 0
        print(f"{dtype}: {bad} of 2**32 fp32 patterns differ from torch ({time.perf_counter() - began:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
