"""Sizes, rates and durations as people read them, and the one rate every display shows.

Every display of a run (the progress bar, the plain progress lines of a batch log, the closing
summary) shows the same rate: input bytes read per second, labelled "read" (`rate_text`). The
bar once showed output MB/s and the summary input GB/s, both unlabelled; a DogeRM merge reads
two models to write one, so the two differed by 2x and neither said which it was.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

__all__ = ["Throughput", "duration_text", "human", "rate_text"]


def human(n: float) -> str:
    """Bytes as a short decimal size: 13.48 GB, 512.0 MB, 812 B."""
    for unit, factor in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{int(n)} B"


def rate_text(bytes_per_second: float | None) -> str:
    """The input read rate, labelled: "1.52 GB/s read" ("? B/s read" while unknown)."""
    if bytes_per_second is None:
        return "? B/s read"
    return f"{human(bytes_per_second)}/s read"


def duration_text(seconds: float | None) -> str:
    """A duration as a clock reads: 0:00:42, 1:02:03 ("?" while unknown)."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Throughput:
    """Bytes read and written per second over the last `window` seconds, and the time left.

    Fed from the executor's progress events (any thread; the caller serialises). Averaged over a
    window rather than since the start, so that the seconds spent importing torch or waiting for a
    download do not drag the rate down for the rest of the run."""

    def __init__(self, window: float = 20.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self.started = clock()
        self._samples: deque[tuple[float, int, int]] = deque()

    def add(self, read: int, written: int) -> None:
        """Record the totals so far (bytes read from the inputs, bytes written to the outputs)."""
        now = self.clock()
        samples = self._samples
        if len(samples) >= 2 and now - samples[-2][0] < 0.05:  # many chunks a second: keep the deque short
            samples[-1] = (now, read, written)
        else:
            samples.append((now, read, written))
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()

    def _delta(self) -> tuple[float, int, int] | None:
        if len(self._samples) < 2:
            return None
        (t0, r0, w0), (t1, r1, w1) = self._samples[0], self._samples[-1]
        # Up to now, not to the last event: a stalled run's rate falls instead of freezing.
        seconds = max(self.clock(), t1) - t0
        return (seconds, r1 - r0, w1 - w0) if seconds > 0 else None

    def read_rate(self) -> float | None:
        """Input bytes read per second over the window, or None before two samples."""
        delta = self._delta()
        return delta[1] / delta[0] if delta else None

    def eta(self, remaining: int) -> float | None:
        """Seconds until `remaining` more bytes are written at the window's write rate."""
        if remaining <= 0:
            return 0.0
        delta = self._delta()
        if not delta or delta[2] <= 0:
            return None
        return remaining / (delta[2] / delta[0])

    def elapsed(self) -> float:
        return self.clock() - self.started
