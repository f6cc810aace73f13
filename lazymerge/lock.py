"""One writer per output folder: an OS file lock that dies with its process.

The lock is `filelock`'s (flock on Linux and macOS, LockFileEx on Windows), which the operating
system releases when the holder exits, even on `kill -9`: a stale lock from a dead process is
recognised without guessing from pids. The holder's pid is kept in a second file, `LOCK_NAME`,
only for the error message: the lock file itself cannot carry it (Windows locks its first byte
against reads, and older filelock versions truncate it on every attempt to take it). While a run
holds a folder, SIGTERM unwinds it as Ctrl-C does (`KeyboardInterrupt`), so the lock and the
`.partial` files are cleaned up (the default action of SIGTERM ends the process on the spot).
Neither file is ever opened through a symlink.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from lazymerge._platform import NOFOLLOW, open_flags
from lazymerge.errors import OutputError

__all__ = ["LOCK_NAME", "LOCK_NAMES", "OutputLock", "lock_holder"]

LOCK_NAME = ".lazymerge.lock"  # the holder's pid, while a run holds the folder
_OS_SUFFIX = ".os"  # `<lock name>.os`: the file the OS lock is taken on
LOCK_NAMES = (LOCK_NAME, LOCK_NAME + _OS_SUFFIX)  # both files a run (or a killed run) leaves in the folder
# How long a run waits for the lock before calling the folder busy: long enough to ride over
# another process's `lock_holder` probe, which holds the lock for an instant.
_WAIT_SECONDS = 0.5


def lock_holder(directory: Path, name: str = LOCK_NAME) -> str | None:
    """The pid (as text) of a live run holding `directory`'s lock (`name`: a part's own lock), or
    None; takes the lock for an instant at most, creates nothing. Files left by a dead process
    are not held: its OS lock died with it."""
    from filelock import FileLock, Timeout

    path = directory / (name + _OS_SUFFIX)
    if not path.is_file() or path.is_symlink():
        return None
    probe = FileLock(str(path), thread_local=False)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return _recorded_pid(directory / name)
    except OSError:
        return None
    probe.release()
    return None


def _recorded_pid(path: Path) -> str:
    try:
        fd = os.open(path, open_flags(os.O_RDONLY | NOFOLLOW))
    except OSError:
        return "another process"
    try:
        return os.read(fd, 64).decode(errors="replace").strip() or "another process"
    except OSError:
        return "another process"
    finally:
        os.close(fd)


def _busy(directory: Path, holder: str) -> OutputError:
    return OutputError(
        f"{directory} is being written by another lazymerge run (pid {holder})",
        hint="wait for it to finish, or choose another --output",
    )


class OutputLock:
    """Context manager holding the output folder's lock for the duration of a run.

    `name`: the lock's pid file (the OS lock is on `<name>.os`); each part of a split merge
    (`lazymerge.part_folder`) holds its own, so that the parts share the folder."""

    def __init__(self, directory: Path, name: str = LOCK_NAME) -> None:
        self.path = directory / name
        self._flock_path = directory / (name + _OS_SUFFIX)
        self._lock = None
        self._previous_sigterm: object = None

    def __enter__(self) -> OutputLock:
        from filelock import FileLock, Timeout

        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {directory}: {exc.strerror}") from exc
        for path in (self.path, self._flock_path):
            if path.is_symlink():  # older filelock versions follow a symlink, and truncate its target
                raise OutputError(
                    f"cannot create {path}: it is a symlink", hint="remove it, or choose another --output"
                )
        while True:
            lock = FileLock(str(self._flock_path), thread_local=False)
            try:
                lock.acquire(timeout=_WAIT_SECONDS)
            except Timeout:
                raise _busy(directory, _recorded_pid(self.path)) from None
            except OSError as exc:
                raise OutputError(f"cannot create {self._flock_path}: {exc.strerror}") from exc
            # A finishing run unlinks the file before it lets go of it: a lock won on that
            # unlinked file would not exclude the next run, which creates a new one. Retry then.
            if _holds_the_file_in_place(lock, self._flock_path):
                break
            lock.release()
        self._lock = lock
        try:
            self._record_pid()
        except BaseException:
            self._release()
            raise
        self._previous_sigterm = _sigterm_as_interrupt()
        return self

    def _record_pid(self) -> None:
        # The lock is ours (any previous holder is dead): record our pid for the next reader,
        # in a file made anew (a dead run's is unlinked, never written through).
        self.path.unlink(missing_ok=True)
        try:
            fd = os.open(self.path, open_flags(os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW), 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create {self.path}: {exc.strerror}") from exc
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        self._release()

    def _release(self) -> None:
        if self._lock is None:
            return
        self.path.unlink(missing_ok=True)
        try:
            # Unlinked while still held (see __enter__).
            self._flock_path.unlink(missing_ok=True)
            unlinked = True
        except OSError:
            unlinked = False  # Windows refuses to delete an open file: after the release, then
        self._lock.release()
        self._lock = None
        if not unlinked:
            try:
                self._flock_path.unlink(missing_ok=True)
            except OSError:
                pass  # another run holds it already


def _holds_the_file_in_place(lock: object, path: Path) -> bool:
    """Whether the file `lock` holds is still the one at `path` (not unlinked meanwhile)."""
    fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)  # filelock >= 3.12 keeps it there
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    if not isinstance(fd, int):
        return True  # cannot tell; filelock's newer versions check this themselves
    try:
        return os.path.samestat(os.fstat(fd), now)
    except OSError:
        return True


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt("terminated (SIGTERM)")


def _sigterm_as_interrupt() -> object:
    """Make SIGTERM raise KeyboardInterrupt; returns the handler to restore, or None when left
    alone: signals reach only the main thread, and a handler the program set is its own."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, _interrupt):
        return None
    signal.signal(signal.SIGTERM, _interrupt)
    return previous
