"""Private download folders (`--low-disk`) that a killed run cannot leave behind for good.

A run that is killed (kill -9, a power cut) cannot remove its `lazymerge-download-*` folder, so
each folder comes with an owner lock beside it, `<folder>.lock`, taken before the folder is made
and released only after it is removed. The next run that makes a private folder in the same
place removes every such folder whose lock it can take: its owner is gone. `filelock` (a
dependency of huggingface_hub) locks on Linux, macOS and Windows alike, and the OS drops the
lock of a dead process, so no process id needs checking.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["PREFIX", "PrivateFolder", "remove_stale_folders"]

PREFIX = "lazymerge-download-"
_LOCK_SUFFIX = ".lock"


class PrivateFolder:
    """A fresh private folder under `parent` (default: the temp folder), held until `remove`."""

    def __init__(self, parent: str | os.PathLike[str] | None = None) -> None:
        from filelock import FileLock

        base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        remove_stale_folders(base)
        fd, lock_path = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", suffix=_LOCK_SUFFIX, dir=base)
        os.close(fd)
        self._lock = FileLock(lock_path, thread_local=False)
        self._lock.acquire(timeout=0)  # ours alone: the name was just made
        self.path = Path(lock_path[: -len(_LOCK_SUFFIX)])
        try:
            self.path.mkdir()
        except BaseException:
            self._lock.release()
            Path(lock_path).unlink(missing_ok=True)
            raise

    def remove(self) -> None:
        """Delete the folder, then give up the lock (and its file). Safe to call twice."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock.is_locked:
            self._lock.release()
        Path(self._lock.lock_file).unlink(missing_ok=True)


def remove_stale_folders(base: Path) -> list[Path]:
    """Remove the private folders under `base` whose owner is gone; returns them."""
    from filelock import FileLock, Timeout

    removed = []
    try:
        candidates = [p for p in base.glob(f"{PREFIX}*") if p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    for folder in candidates:
        lock = FileLock(f"{folder}{_LOCK_SUFFIX}", thread_local=False)
        try:
            lock.acquire(timeout=0)
        except (Timeout, OSError):
            continue  # a live run holds it (or we may not lock it): not ours to touch
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            lock.release()
            Path(lock.lock_file).unlink(missing_ok=True)
    return removed
