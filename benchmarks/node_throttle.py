"""A simulated node's own disk for bench_cluster.py: this process's reads and writes held to a rate.

`install()` wraps the positional-I/O calls lazymerge's reader and writers make (`os.preadv`,
`os.pread`, `os.pwrite`, `os.copy_file_range`) with two token buckets (read, write) shared by the
process's threads. Rates come from LAZYMERGE_BENCH_NODE_MBPS="READ,WRITE" (MB/s, decimal). Each
worker process of the benchmark (a `--part` process, or a Ray worker via `worker_process_setup_hook`)
installs its own: N workers act as N nodes, each with its own disk of that speed. A simulation: the
bytes still come from this machine's page cache and go to its one disk, so the aggregate stays
bounded by this machine (its cores and its real disk), which is what the benchmark reports beside it.
"""

from __future__ import annotations

import os
import threading
import time

ENV = "LAZYMERGE_BENCH_NODE_MBPS"
_BURST = 16 << 20  # one bucket's depth: a few chunks, so the rate holds over any second


class _Bucket:
    """A token bucket: `rate` bytes/s, at most `_BURST` banked (an idle disk saves no speed for
    later: the seconds a worker spends importing torch buy it nothing)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.last = time.perf_counter()
        self.tokens = float(_BURST)

    def take(self, n: int) -> None:
        if n <= 0 or self.rate <= 0:
            return
        with self.lock:
            now = time.perf_counter()
            self.tokens = min(float(_BURST), self.tokens + (now - self.last) * self.rate) - n
            self.last = now
            debt = -self.tokens
        if debt > 0:
            time.sleep(debt / self.rate)


def install() -> None:
    """Throttle this process's I/O (no-op when the variable is unset)."""
    text = os.environ.get(ENV, "")
    if not text or getattr(os, "_lazymerge_throttled", False):
        return
    read_mbps, write_mbps = (float(x) for x in text.split(","))
    reads, writes = _Bucket(read_mbps * 1e6), _Bucket(write_mbps * 1e6)
    preadv, pread, pwrite, copy_range = os.preadv, os.pread, os.pwrite, os.copy_file_range

    def t_preadv(fd, buffers, offset, *a):  # type: ignore[no-untyped-def]
        n = preadv(fd, buffers, offset, *a)
        reads.take(n)
        return n

    def t_pread(fd, length, offset):  # type: ignore[no-untyped-def]
        data = pread(fd, length, offset)
        reads.take(len(data))
        return data

    def t_pwrite(fd, data, offset):  # type: ignore[no-untyped-def]
        n = pwrite(fd, data, offset)
        writes.take(n)
        return n

    def t_copy(src, dst, count, *a, **kw):  # type: ignore[no-untyped-def]
        n = copy_range(src, dst, count, *a, **kw)
        reads.take(n)
        writes.take(n)
        return n

    os.preadv, os.pread, os.pwrite, os.copy_file_range = t_preadv, t_pread, t_pwrite, t_copy
    os._lazymerge_throttled = True  # type: ignore[attr-defined]
