"""One writer per output folder: an advisory lock file that dies with its process.

`fcntl.flock` is released by the kernel when the holder exits, even on `kill -9`, so a stale lock
from a dead process is recognised without guessing from pids; the pid inside is only for the
error message. While a run holds a folder, SIGTERM unwinds it as Ctrl-C does (`KeyboardInterrupt`),
so the lock and the `.partial` files are cleaned up (the default action of SIGTERM ends the
process on the spot). The lock file is never opened through a symlink.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from pathlib import Path

from lazymerge.errors import OutputError

__all__ = ["LOCK_NAME", "OutputLock", "lock_holder"]

LOCK_NAME = ".lazymerge.lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def lock_holder(directory: Path, name: str = LOCK_NAME) -> str | None:
    """The pid (as text) of a live run holding `directory`'s lock (`name`: a part's own lock), or
    None; takes no lock, creates nothing. A lock file left by a dead process is not held: flock
    died with its holder."""
    try:
        fd = os.open(directory / name, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops the shared lock, if we got it
    return None


def _busy(directory: Path, holder: str) -> OutputError:
    return OutputError(
        f"{directory} is being written by another lazymerge run (pid {holder})",
        hint="wait for it to finish, or choose another --output",
    )


class OutputLock:
    """Context manager holding the output folder's lock for the duration of a run.

    `name`: the lock file; each part of a split merge (`lazymerge.part_folder`) holds its own,
    so that the parts share the folder."""

    def __init__(self, directory: Path, name: str = LOCK_NAME) -> None:
        self.path = directory / name
        self.fd = -1
        self._previous_sigterm: object = None

    def __enter__(self) -> OutputLock:
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot create {self.path}: {exc.strerror}") from exc
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(self.fd)
                self.fd = -1
                raise _busy(self.path.parent, holder) from None
            # A finishing run unlinks the file before it closes it: a lock won on that unlinked
            # file would not exclude the next run, which creates a new one. Retry on the new file.
            try:
                same = os.path.samestat(os.fstat(self.fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(self.fd)
            self.fd = -1
        # The lock is ours (any previous holder is dead): record our pid for the next reader.
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        self._previous_sigterm = _sigterm_as_interrupt()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        if self.fd >= 0:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = -1


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
