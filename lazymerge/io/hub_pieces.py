"""A streamed Hub file's planned reads as range-request pieces, and the window that bounds them.

`plan_pieces` turns the (offset, bytes) reads a run will make of one file into pieces of about
`piece_bytes` (neighbouring small tensors share one request, a large one is cut), each counting
the planned bytes it serves (freed when all are read), ordered by their first read. `ReadAhead`
is the read-ahead window of one input model, shared by all its open files: at most `pieces`
(AHEAD) pieces fetched or in flight ahead of the readers, the bound the peak RSS counts on
(io/hub_stream.py fetches them).
"""

from __future__ import annotations

import bisect
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lazymerge.io.hub_stream import HttpRangeSource

__all__ = ["AHEAD", "Piece", "ReadAhead", "plan_pieces"]

AHEAD = 6  # pieces fetched or in flight ahead of the readers, per input model (all its open files)


class ReadAhead:
    """The read-ahead window of one input model, shared by its open files (see the module
    docstring): at most `pieces` (default AHEAD) pieces fetched or in flight ahead of the readers."""

    def __init__(self, pieces: int | None = None) -> None:
        self.pieces = AHEAD if pieces is None else pieces
        self.lock = threading.Lock()  # also each source's lock: one window, one lock
        self.ahead = 0
        self.sources: list[HttpRangeSource] = []

    def pump(self) -> None:
        """Start pieces until the window is full: each free slot to the open file with the fewest
        pieces ahead that has planned pieces left."""
        while True:
            with self.lock:
                if self.ahead >= self.pieces:
                    return
                # The sources' window protocol (hub_stream, under this lock): _has_next, _ahead, _start_next.
                waiting = [s for s in self.sources if s._has_next()]
                if not waiting:
                    return
                source = min(waiting, key=lambda s: s._ahead)
                piece = source._start_next()
            source.pool.submit(source._load, piece)


class Piece:
    """A range of a streamed file fetched by one request, and the planned bytes it serves."""

    __slots__ = ("buf", "end", "error", "event", "left", "start", "started")

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.left = 0  # planned bytes still to be read from it; freed at 0
        self.buf: bytearray | None = None
        self.started = False
        self.event = threading.Event()
        self.error: BaseException | None = None


def plan_pieces(reads: list[tuple[int, int]], piece_bytes: int) -> tuple[list[Piece], list[Piece]]:
    """Pieces covering every planned read (by offset, and in the order to fetch them): neighbours
    joined, large reads cut, each counting the planned bytes it serves (freed when all are read)."""
    spans: list[list[int]] = []
    for offset, n in sorted(set(reads)):
        if n <= 0:
            continue
        if spans and offset <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], offset + n)
        else:
            spans.append([offset, offset + n])
    pieces: list[Piece] = []
    for a, b in spans:
        for s in range(a, b, piece_bytes):
            pieces.append(Piece(s, min(b, s + piece_bytes)))
    # Join small neighbouring pieces (a run of norms) into one request up to piece_bytes.
    joined: list[Piece] = []
    for p in pieces:
        last = joined[-1] if joined else None
        if last is not None and last.end == p.start and p.end - last.start <= piece_bytes:
            last.end = p.end
        else:
            joined.append(p)
    starts = [p.start for p in joined]
    for offset, n in reads:  # every planned read counts against the pieces it covers
        pos, end = offset, offset + n
        while pos < end:
            piece = joined[bisect.bisect_right(starts, pos) - 1]
            k = min(end, piece.end) - pos
            piece.left += k
            pos += k
    # The run reads pieces in its own order (plan order, or the write lanes'), not the file's:
    # they are started in the order of their first read.
    first: dict[int, int] = {}
    for rank, (offset, _) in enumerate(reads):
        first.setdefault(bisect.bisect_right(starts, offset) - 1, rank)
    order = sorted(range(len(joined)), key=lambda i: (first.get(i, len(reads)), i))
    return joined, [joined[i] for i in order]
