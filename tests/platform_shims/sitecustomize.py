"""Make this Linux Python look like macOS's or Windows's to lazymerge (tests/test_portability.py).

Put this folder first on PYTHONPATH and set LAZYMERGE_TEST_PLATFORM to `macos` or `windows`;
Python imports `sitecustomize` at start-up, before any of the program's code. What is simulated:

- macOS: the Linux-only calls are gone from `os` (posix_fadvise, posix_fallocate,
  copy_file_range, O_DIRECT, sched_getaffinity, preadv/pwritev; sync_file_range and mallopt are
  never looked up, lazymerge being told it runs on "darwin"), and `ru_maxrss` is in bytes.
- Windows: all of that, plus no pread/pwrite/O_NOFOLLOW/sched_*, `fcntl` and `resource`
  unimportable, no `mmap.PROT_*`/`MADV_*`/`madvise` (`mmap.mmap` refuses `prot=`/`flags=`),
  `os.O_BINARY` exists and a lazymerge `os.open` without it fails (Windows would open the file in
  text mode), and a file that this process holds open or mapped cannot be renamed, replaced or
  deleted (checked with /proc/self/fd and /proc/self/maps), as on Windows.

What is not: case-insensitive file names, Windows paths (drive letters, `\\`, reserved names,
260-character limits), LockFileEx and mandatory byte-range locks (filelock takes its Unix path
here: it is imported before `fcntl` is hidden), other processes' handles, the spawn start method,
and third-party code that branches on `sys.platform` (still "linux": torch imports `mmap.MAP_*`,
which are therefore kept).
"""

from __future__ import annotations

import os
import sys

_FLAVOUR = os.environ.get("LAZYMERGE_TEST_PLATFORM", "")

_MACOS_OS = (
    "posix_fadvise",
    "posix_fallocate",
    "copy_file_range",
    "O_DIRECT",
    "sched_getaffinity",
    "preadv",
    "pwritev",
    "sync_file_range",
    *(name for name in dir(os) if name.startswith("POSIX_FADV_")),
)
_WINDOWS_OS = (
    *_MACOS_OS,
    "pread",
    "pwrite",
    "O_NOFOLLOW",
    "fchmod",
    "getuid",
    "geteuid",
    *(name for name in dir(os) if name.startswith("sched_")),
)
_O_BINARY = 0x8000  # its value on Windows


def _remove(module: object, names: tuple[str, ...]) -> None:
    for name in names:
        if hasattr(module, name):
            delattr(module, name)
    if module is os and hasattr(os, "process_cpu_count"):
        # 3.13's os.process_cpu_count calls sched_getaffinity on Linux; elsewhere it is cpu_count.
        os.process_cpu_count = os.cpu_count


def _tell_lazymerge(system: str) -> None:
    """Set lazymerge._platform.SYSTEM when that module is first imported (not importing it now:
    the program's own import order stays as it is)."""
    import importlib.abc
    import importlib.machinery

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "lazymerge._platform":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_set(module):
                exec_module(module)
                module.SYSTEM = system

            spec.loader.exec_module = exec_then_set
            return spec

    sys.meta_path.insert(0, Finder())


def _macos() -> None:
    _remove(os, _MACOS_OS)
    import resource

    getrusage = resource.getrusage

    def getrusage_in_bytes(who: int) -> resource.struct_rusage:
        usage = list(getrusage(who))
        usage[2] *= 1024  # ru_maxrss: macOS reports bytes, Linux KiB
        return resource.struct_rusage(usage)

    resource.getrusage = getrusage_in_bytes
    _tell_lazymerge("darwin")


def _windows() -> None:
    import filelock  # noqa: F401  # takes its flock path now, as it takes LockFileEx on Windows

    _remove(os, _WINDOWS_OS)
    sys.modules["fcntl"] = None  # type: ignore[assignment]  # `import fcntl` raises ImportError
    sys.modules["resource"] = None  # type: ignore[assignment]
    os.O_BINARY = _O_BINARY
    _hide_mmap_linux_parts()
    _guard_open_for_binary_mode()
    _refuse_renaming_open_files()
    _tell_lazymerge("win32")


def _hide_mmap_linux_parts() -> None:
    import mmap

    # MAP_* stay: torch picks its branch by sys.platform, still "linux" here, and imports them.
    _remove(mmap, tuple(n for n in dir(mmap) if n.startswith(("PROT_", "MADV_"))))
    real = mmap.mmap

    class WindowsMmap(real):
        def __new__(cls, fileno, length, *args, **kwargs):
            if "prot" in kwargs or "flags" in kwargs or args:
                raise TypeError("mmap on Windows takes tagname and access, not flags or prot")
            return super().__new__(cls, fileno, length, **kwargs)

        def madvise(self, *args):
            raise AttributeError("'mmap.mmap' object has no attribute 'madvise'")

    mmap.mmap = WindowsMmap


def _guard_open_for_binary_mode() -> None:
    real_open = os.open

    def open_(path, flags, mode=0o777, *, dir_fd=None):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("lazymerge") and not flags & _O_BINARY:
            raise OSError(22, f"{caller} opened {path} without O_BINARY: text mode on Windows")
        return real_open(path, flags & ~_O_BINARY, mode, dir_fd=dir_fd)

    os.open = open_


def _open_inodes() -> set[int]:
    """The inode of every file this process has open or mapped (inodes only: /proc/self/maps
    names the device under an overlay file system, stat the overlay's)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            inodes.add(os.stat(f"/proc/self/fd/{fd}").st_ino)
        except OSError:
            continue
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[4] != "0":
                inodes.add(int(fields[4]))
    return inodes


def _refuse_renaming_open_files() -> None:
    def in_use(path, dir_fd=None) -> bool:
        try:
            st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
        except (OSError, TypeError, ValueError):
            return False
        return st.st_ino in _open_inodes()

    def refuse(path) -> PermissionError:
        return PermissionError(
            13, "The process cannot access the file because it is being used by another process", str(path)
        )

    def guard_two(real):
        def call(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            for path, dir_fd in ((src, src_dir_fd), (dst, dst_dir_fd)):
                if in_use(path, dir_fd):
                    raise refuse(path)
            return real(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

        return call

    def guard_one(real):
        def call(path, *, dir_fd=None):
            if in_use(path, dir_fd):
                raise refuse(path)
            return real(path, dir_fd=dir_fd)

        return call

    os.replace = guard_two(os.replace)
    os.rename = guard_two(os.rename)
    os.unlink = guard_one(os.unlink)
    os.remove = guard_one(os.remove)


if _FLAVOUR == "macos":
    _macos()
elif _FLAVOUR == "windows":
    _windows()
elif _FLAVOUR:
    raise SystemExit(f"LAZYMERGE_TEST_PLATFORM={_FLAVOUR!r}: expected macos or windows")
