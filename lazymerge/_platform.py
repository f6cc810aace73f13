"""Every platform-specific call of lazymerge, each with a portable fallback.

Linux gives a streaming merger page-cache advice, preallocation, in-kernel copies, vectored
positional reads, O_DIRECT and writeback hints; macOS lacks most of them, Windows lacks `pread`
and `pwrite` too, and `fcntl`/`resource` do not exist there. As CPython's `shutil` does for
`copy_file_range`/`sendfile`, callers never test for a call themselves: they use the functions
here, which take the fast call where it exists and otherwise do the same thing more slowly, or
skip a mere hint. The bytes written are the same on every path; only speed and the page cache
differ. Availability is looked up at call time (`getattr(os, ...)`), so a test can remove an
attribute with monkeypatch and reach the fallback in-process.

Windows specifics: every file is opened in binary mode (`O_BINARY`; without it `os.write`
turns `\\n` into `\\r\\n`), and a file with an open handle or map cannot be renamed or deleted, so
callers close maps and handles before `os.replace` (tests/test_portability.py checks this with a
simulated Windows).
"""

from __future__ import annotations

import errno
import io
import math
import mmap
import os
import sys
import threading
from pathlib import Path

__all__ = [
    "NOFOLLOW",
    "advise_sequential",
    "can_drop_mapped_pages",
    "cgroup_memory_headroom",
    "copy_file_range",
    "drop_cached",
    "drop_mapped_pages",
    "map_readonly",
    "memory_available",
    "open_direct",
    "open_flags",
    "peak_rss_bytes",
    "pread",
    "pread_into",
    "preallocate",
    "pwrite",
    "start_writeback",
    "tune_allocator",
    "usable_cpu_count",
]

# Which system's conventions apply (ru_maxrss units, libc names). A module attribute so the
# simulated platforms of tests/test_portability.py can set it without faking `sys.platform`.
SYSTEM = sys.platform

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # Windows has no symlink-following open flag to refuse


def open_flags(flags: int) -> int:
    """`flags` for `os.open`, plus binary mode where the platform has a text mode (Windows)."""
    return flags | getattr(os, "O_BINARY", 0)


# -- page cache and preallocation ------------------------------------------------------------------


def advise_sequential(fd: int) -> None:
    """Tell the kernel `fd` is read front to back (larger readahead); a hint, skipped where absent."""
    _fadvise(fd, 0, 0, "POSIX_FADV_SEQUENTIAL")


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Let the kernel drop these consumed pages from the page cache; a hint, skipped where absent."""
    _fadvise(fd, offset, length, "POSIX_FADV_DONTNEED")


def _fadvise(fd: int, offset: int, length: int, advice: str) -> None:
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is not None:
        fadvise(fd, offset, length, getattr(os, advice))


def preallocate(fd: int, size: int) -> None:
    """Make the file `size` bytes long with its blocks reserved where the file system can.

    Raises OSError(ENOSPC/EDQUOT) when the disk is too small. Without `posix_fallocate` (macOS,
    Windows) or where the file system refuses it, the file is extended sparse (`ftruncate`),
    and a full disk shows up at the write that meets it instead."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        try:
            fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    os.ftruncate(fd, size)


# -- positional reads and writes ---------------------------------------------------------------------

_fd_locks: dict[int, threading.Lock] = {}
_fd_locks_guard = threading.Lock()


def _seek_lock(fd: int) -> threading.Lock:
    # Without pread/pwrite a positional access is seek + read/write, two calls that threads
    # sharing the descriptor must not interleave. Keyed by number: a reused number gets the same
    # lock, which only serialises what needs no serialising.
    with _fd_locks_guard:
        lock = _fd_locks.get(fd)
        if lock is None:
            lock = _fd_locks[fd] = threading.Lock()
        return lock


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read up to len(view) bytes at `offset` into `view`; the count read (0 at end of file)."""
    preadv = getattr(os, "preadv", None)
    if preadv is not None:
        return preadv(fd, [view], offset)
    pread_ = getattr(os, "pread", None)
    if pread_ is not None:  # macOS builds without preadv: one extra copy
        data = pread_(fd, len(view), offset)
        view[: len(data)] = data
        return len(data)
    with _seek_lock(fd):  # Windows
        os.lseek(fd, offset, os.SEEK_SET)
        with io.FileIO(fd, "rb", closefd=False) as f:
            return f.readinto(view) or 0


def pread(fd: int, n: int, offset: int) -> bytes:
    """Up to `n` bytes at `offset` (fewer at end of file)."""
    pread_ = getattr(os, "pread", None)
    if pread_ is not None:
        return pread_(fd, n, offset)
    buf = bytearray(n)
    got = pread_into(fd, memoryview(buf), offset)
    del buf[got:]
    return bytes(buf)


def pwrite(fd: int, data: memoryview | bytes, offset: int) -> int:
    """Write `data` (or its start) at `offset`; the count written."""
    pwrite_ = getattr(os, "pwrite", None)
    if pwrite_ is not None:
        return pwrite_(fd, data, offset)
    with _seek_lock(fd):
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


def copy_file_range(src_fd: int, dst_fd: int, count: int, src_offset: int, dst_offset: int) -> int:
    """Copy up to `count` bytes between files inside the kernel (Linux); the count copied.

    Raises OSError(ENOSYS) where the call does not exist, as Linux does where the kernel lacks
    it, so callers fall back to reads and writes on the same errors."""
    copy = getattr(os, "copy_file_range", None)
    if copy is None:
        raise OSError(errno.ENOSYS, "copy_file_range is not available on this platform")
    return copy(src_fd, dst_fd, count, src_offset, dst_offset)


# -- O_DIRECT and writeback ----------------------------------------------------------------------------


def open_direct(path: Path) -> int | None:
    """An existing file opened for writing past the page cache (O_DIRECT), or None where the
    platform or file system has no such mode; callers then write through the page cache."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    try:
        return os.open(path, open_flags(os.O_WRONLY | direct | NOFOLLOW))
    except OSError:
        return None


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: object = None  # not looked up yet; False: not available


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing these dirty pages to disk now, without waiting (Linux `sync_file_range`);
    elsewhere a no-op: the kernel writes them back on its own schedule."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = _load_libc_function("sync_file_range") or False
        if _sync_file_range:
            import ctypes

            _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    if _sync_file_range:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _load_libc_function(name: str):
    # Only glibc has these (sync_file_range, mallopt with glibc's parameter numbers).
    if not SYSTEM.startswith("linux"):
        return None
    try:
        import ctypes

        return getattr(ctypes.CDLL("libc.so.6", use_errno=True), name)
    except (OSError, AttributeError, ImportError):
        return None


def tune_allocator() -> None:
    """Keep multi-MB buffers in their own mappings, returned to the OS when freed (glibc).

    glibc raises its mmap threshold each time a large block is freed, after which buffers of
    that size come from the heap and stay in RSS once freed (about 100 MB here). Other
    allocators (macOS, Windows, musl) are left alone."""
    mallopt = _load_libc_function("mallopt")
    if mallopt is not None:
        mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


# -- memory maps -----------------------------------------------------------------------------------


def map_readonly(fd: int, size: int) -> mmap.mmap:
    """A read-only map of the first `size` bytes of `fd` (`access=`, which Windows has too).

    On Windows the file cannot be renamed or deleted until the map is closed."""
    return mmap.mmap(fd, size, access=mmap.ACCESS_READ)


def can_drop_mapped_pages() -> bool:
    """Whether `drop_mapped_pages` frees resident pages here; without it (Windows) a reader
    that must not grow its resident set reads into a buffer instead of mapping."""
    return hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")


def drop_mapped_pages(mapped: mmap.mmap, start: int, length: int) -> None:
    """Drop [start, start + length) of this map from the process's resident set (the page cache
    keeps them); a no-op where `madvise` is absent."""
    if can_drop_mapped_pages():
        aligned = start - start % mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, aligned, length + start - aligned)


# -- process facts ---------------------------------------------------------------------------------


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size in bytes, or None where it cannot be measured."""
    try:
        import resource
    except ImportError:
        return _windows_peak_working_set()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if SYSTEM == "darwin" else int(peak) * 1024  # macOS: bytes; Linux, BSD: KiB


def _windows_peak_working_set() -> int | None:
    try:
        import ctypes
        from ctypes import wintypes

        class Counters(ctypes.Structure):
            _fields_ = [  # PROCESS_MEMORY_COUNTERS, psapi.h
                ("cb", wintypes.DWORD),
                ("PageFaultCount", wintypes.DWORD),
                ("PeakWorkingSetSize", ctypes.c_size_t),
                ("WorkingSetSize", ctypes.c_size_t),
                ("QuotaPeakPagedPoolUsage", ctypes.c_size_t),
                ("QuotaPagedPoolUsage", ctypes.c_size_t),
                ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
                ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
                ("PagefileUsage", ctypes.c_size_t),
                ("PeakPagefileUsage", ctypes.c_size_t),
            ]

        counters = Counters()
        counters.cb = ctypes.sizeof(counters)
        windll = ctypes.windll  # type: ignore[attr-defined]  # AttributeError off Windows
        process = windll.kernel32.GetCurrentProcess()
        if not windll.psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb):
            return None
        return int(counters.PeakWorkingSetSize)
    except (ImportError, AttributeError, OSError, ValueError):
        return None


def usable_cpu_count(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity (taskset, Slurm) and its cgroup's CPU quota
    (docker --cpus, Kubernetes limits), not the host's core count."""
    process_cpu_count = getattr(os, "process_cpu_count", None)  # 3.13+: affinity-aware
    if process_cpu_count is not None:
        n = process_cpu_count() or 1
    elif (affinity := getattr(os, "sched_getaffinity", None)) is not None:
        n = len(affinity(0)) or 1
    else:
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return n


def _cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs allowed by the tightest CPU quota on the process's cgroup or any of its ancestors
    (quota / period), or None when unlimited or unknown."""
    if not SYSTEM.startswith("linux"):
        return None
    group = ""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):  # cgroup v2: the unified hierarchy
                group = line[3:].strip().strip("/")
    except OSError:
        pass
    parts = group.split("/") if group else []
    quotas = []
    for depth in range(len(parts), -1, -1):  # a Slurm step's quota may sit on its job's group
        try:
            quota, period = (root.joinpath(*parts[:depth]) / "cpu.max").read_text().split()[:2]
            if quota != "max":
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):
            continue
    if quotas:
        return min(quotas)
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


# -- memory available (the start-up prefetch's budget) --------------------------------------------


def memory_available() -> int:
    """Bytes of memory available without swapping (Linux MemAvailable); 0 where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cgroup_memory_headroom() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2 or v1), or None without a limit (or
    off Linux)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit, usage = base / "memory.max", base / "memory.current"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit, usage = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        else:
            continue
        try:
            cap = limit.read_text().strip()
            if cap == "max" or int(cap) >= 1 << 60:  # v1 says "no limit" with a huge number
                continue
            return max(0, int(cap) - int(usage.read_text()))
        except (OSError, ValueError):
            continue
    return None
