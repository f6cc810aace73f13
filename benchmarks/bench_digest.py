"""Shard checksum cost (not a test): CPU seconds per GB of the block hashes `lazymerge.io.digest`
can use, on this machine, from memory (no disk), one thread and the hash pool.

    python benchmarks/bench_digest.py [--gb 2] [--repeat 5]

Prints, per scheme, the median GB/s on one thread and through `hash_pool()` (all cores), and the
CPU seconds a 13.5 GB output (one LLaMA-2-7B fp16 model) costs at that rate. The schemes are
those `file_digest(..., algorithm=...)` accepts: the current XXH3-128 blocks and the earlier
sha256 blocks, so the figure compares exactly what the writer runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazymerge.io import digest

OUTPUT_7B = 13.5e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0, help="bytes hashed per measurement (in memory)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n_blocks = max(1, int(args.gb * 1e9) // digest.BLOCK_BYTES)
    block = memoryview(os.urandom(digest.BLOCK_BYTES))
    total = n_blocks * digest.BLOCK_BYTES
    pool = digest.hash_pool()
    print(
        f"{os.cpu_count()} cores, {total / 1e9:.2f} GB per measurement ({n_blocks} blocks of 16 MiB), median of {args.repeat}"
    )
    print(f"{'scheme':42s} {'1 thread GB/s':>14s} {'pool GB/s':>10s} {'CPU s per 13.5 GB':>18s}")
    for name in sorted(digest.BLOCK_HASHES):
        block_hash = digest.BLOCK_HASHES[name]
        single, pooled = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            for _ in range(n_blocks):
                block_hash(block)
            single.append(total / (time.perf_counter() - t) / 1e9)
            t = time.perf_counter()
            list(pool.map(block_hash, [block] * n_blocks))
            pooled.append(total / (time.perf_counter() - t) / 1e9)
        one, many = statistics.median(single), statistics.median(pooled)
        marker = " (current)" if name == digest.ALGORITHM else ""
        print(f"{name + marker:42s} {one:14.2f} {many:10.2f} {OUTPUT_7B / 1e9 / one:18.1f}")
    pool.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
