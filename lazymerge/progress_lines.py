"""Progress for logs nobody watches: plain lines, written and flushed as the run goes.

A rich progress bar is a live display: redrawn in place in a terminal, but drawn only once, when
it stops, anywhere else, so a Slurm log or `lazymerge ... 2> log` showed nothing until the run
ended. There, each event worth a line gets one, at once: the start, the first bytes merged, each
shard closed, a status line every `interval` seconds (bytes written, the input read rate, ETA),
the end. `progress_display` picks the bar or the lines for the console at hand.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from rich.console import Console

from lazymerge.consoles import watched
from lazymerge.report import progress_bar
from lazymerge.text import printable
from lazymerge.units import Throughput, duration_text, human, rate_text

if TYPE_CHECKING:
    from lazymerge.events import ProgressEvent
    from lazymerge.plan import MergePlan

__all__ = ["DEFAULT_INTERVAL", "ProgressLines", "progress_display"]

DEFAULT_INTERVAL = 10.0  # seconds between status lines: a few hundred lines for an hour's merge


class ProgressLines:
    """The executor's progress callback for a log: one line per event worth one, and a status line
    every `interval` seconds (0: none) while nothing else was written, from a timer thread, so a
    stalled download or a long start-up still shows in the log.

    Use as a context manager (the timer runs inside it). `upload(done, total)` reports the bytes
    pushed to the Hub (from the pusher's thread)."""

    def __init__(
        self,
        write: Callable[[str], None],
        plans: Sequence[MergePlan],
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.write = write
        self.interval = interval
        self.clock = clock
        self.total = sum(s.size for p in plans for s in p.shards)
        self.shards = sum(len(p.shards) for p in plans)
        self.meter = Throughput(clock=clock)
        self.written = self.read = self.closed = 0
        self.current = ""  # the shard being written
        self.merging = False  # the first bytes were merged
        self.uploaded: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_line = clock()
        self._timer: threading.Thread | None = None

    def __enter__(self) -> ProgressLines:
        with self._lock:
            self._line(f"starting: {self.shards} shard(s), {human(self.total)} to write (loading the merge backend)")
        if self.interval > 0:
            self._timer = threading.Thread(target=self._tick, name="lazymerge-progress-lines", daemon=True)
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join()

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            self.written, self.read = event.bytes_written, event.bytes_read
            if event.kind == "skip":  # a shard kept by --resume: no bytes moved, not part of the rate
                self.closed += 1
                self._line(f"kept {self._where(event)} from the earlier run ({self._count()})")
                return
            self.meter.add(event.bytes_read, event.bytes_written)
            self.current = event.shard if event.kind == "chunk" else ""
            if not self.merging and event.kind in ("chunk", "shard"):
                self.merging = True
                self._line(f"merging {printable(event.shard)}: first bytes after {self._elapsed()}")
            if event.kind == "shard":
                self.closed += 1
                self._line(f"closed {self._where(event)} ({self._count()}); {self._status()}")
            elif event.kind == "done":
                self._line(f"done: {human(event.bytes_written)} written, {human(event.bytes_read)} read")

    def upload(self, done: int, total: int) -> None:
        with self._lock:
            finished = done >= total and (self.uploaded is None or self.uploaded[0] < total)
            self.uploaded = (done, total)
            if finished:
                self._line(f"uploaded {human(done)} to the Hub; committing")

    def _tick(self) -> None:
        while True:
            with self._lock:
                wait = self._last_line + self.interval - self.clock()
            if self._stop.wait(max(wait, 0.01)):
                return
            with self._lock:
                if self.clock() - self._last_line >= self.interval:
                    self._line(self._status() if self.merging else "starting... (no bytes merged yet)")

    # -- the text (called with the lock held) --------------------------------------------------

    def _line(self, text: str) -> None:
        self._last_line = self.clock()
        self.write(f"lazymerge [{self._elapsed()}] {text}")

    def _elapsed(self) -> str:
        return duration_text(self.meter.elapsed())

    def _count(self) -> str:
        return f"{self.closed} of {self.shards} shards"

    def _where(self, event: ProgressEvent) -> str:
        return printable(str(event.path) if event.path is not None else event.shard)

    def _status(self) -> str:
        percent = 100 * self.written / self.total if self.total else 100.0
        text = (
            f"{percent:.0f}% written {human(self.written)} of {human(self.total)}, "
            f"{rate_text(self.meter.read_rate())}, ETA {duration_text(self.meter.eta(self.total - self.written))}"
        )
        if self.closed < self.shards and self.current:
            text += f"; writing {printable(self.current)}"
        if self.uploaded is not None:
            text += f"; uploaded {human(self.uploaded[0])} of {human(self.uploaded[1])}"
        return text


@contextlib.contextmanager
def progress_display(
    console: Console, plans: Sequence[MergePlan], upload: bool = False, interval: float = DEFAULT_INTERVAL
) -> Iterator[Callable]:
    """The executor's callback that shows the run's progress on `console`: a rich bar where
    someone watches (a terminal, a notebook), else `ProgressLines`. With `upload`, the callback
    has an `upload(done, total)` attribute for the Hub pusher."""
    if watched(console):
        with progress_bar(console, plans, upload=upload) as callback:
            yield callback
        return

    def write(line: str) -> None:
        console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)

    with ProgressLines(write, plans, interval) as lines:
        yield lines
