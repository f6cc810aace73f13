"""A Hub weight file streamed into the merge with HTTP range requests: no input byte on disk.

`HttpRangeSource` is the remote `RangeSource` (`lazymerge.io.range_source`). It is told, in
order, every range the run will read from its file (`planned_reads`), groups them into pieces of
about `PIECE_BYTES` (neighbouring small tensors share one request, a large one is cut), and
keeps pieces fetched or in flight ahead of the reader on a small pool of threads: several
requests at once per input, so one slow connection or a long round trip does not bound the rate.

Memory, the bound the peak RSS counts on (io/hub_pieces.py): the files of one input model share
one `ReadAhead` window of `AHEAD` pieces (AHEAD x PIECE_BYTES = 24 MiB per input, 48 MiB for a
DogeRM pair), however many of its files are open at once (a chunk that spans two shards opens
both; a window per file doubled the buffers there: +48 MB of peak RSS at the 1B pair's last
shard). A freed slot goes to the open file with the fewest pieces ahead. A piece is freed as soon as every read
it serves is done; a read the source was not told of, or one the window has not reached yet, is
fetched when asked, by the reading thread (one piece per reading thread over the window).

A request that fails with a dropped connection, a timeout or a 5xx answer is retried with
backoff, resuming where its bytes stopped (`RETRIES` failures in a row without progress end the
run with a `HubError`); a 4xx answer is not retried. The file must be the one planned: a size
(`Content-Range`) or ETag (the LFS sha256, or git blob id) other than the pinned commit's is an
error, never merged. A redirect to a CDN (LFS files on the Hub) is resolved once and its URL
reused without the Hub token; an expired or refused signed URL is resolved again.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from lazymerge.errors import HeaderError, HubError
from lazymerge.io.hub_http import DaemonPool, DownloadCancelled, hub_timeout, wait_for
from lazymerge.io.hub_pieces import AHEAD, Piece, ReadAhead, plan_pieces
from lazymerge.io.range_source import RangeSource

__all__ = ["AHEAD", "PIECE_BYTES", "RETRIES", "HttpRangeSource", "ReadAhead", "StreamStats"]

PIECE_BYTES = 4 << 20  # one range request: large enough for throughput, small enough to retry cheaply
RETRIES = 6  # failures in a row (without a byte of progress) before a range gives up
_BACKOFF = 0.25  # seconds before the first retry, doubled each time, at most _BACKOFF_MAX
_BACKOFF_MAX = 4.0
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_STALE_URL_STATUS = frozenset({401, 403, 410})  # a signed CDN URL that expired: resolve again


@dataclass
class StreamStats:
    """What a checkpoint's streams did (shared by its files): bytes, requests, retries, peak buffers."""

    bytes_fetched: int = 0
    requests: int = 0
    retries: int = 0
    buffered: int = 0  # bytes held in read-ahead pieces now
    peak_buffered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def hold(self, n: int) -> None:
        with self.lock:
            self.buffered += n
            self.peak_buffered = max(self.peak_buffered, self.buffered)


class HttpRangeSource(RangeSource):
    """One Hub file at a pinned commit, read with ranged GETs (see the module docstring).

    Args:
        url: the file's `resolve/{commit}/{file}` URL.
        size: its size at the pinned commit. etag: its LFS sha256 or git blob id there (None: unchecked).
        headers: the Hub request headers (token included; never sent to another origin).
        name: `label/file`, for errors. reads: (offset, bytes) the run will read, in order.
        pool: the threads that fetch pieces. cancelled: set when the run is interrupted.
        stats: counters shared by a checkpoint's files. errors: a context that turns a
            huggingface_hub / network error into a one-line `HubError` (`hub_errors`).
        window: the read-ahead window shared by a checkpoint's files (None: one of its own).
    """

    def __init__(
        self,
        url: str,
        size: int,
        etag: str | None,
        headers: dict[str, str],
        name: str,
        reads: list[tuple[int, int]],
        pool: DaemonPool,
        cancelled: threading.Event,
        stats: StreamStats | None = None,
        errors: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
        window: ReadAhead | None = None,
    ) -> None:
        self.url, self.size, self.etag, self.headers, self.name = url, size, etag, headers, name
        self.pool, self.cancelled, self.errors = pool, cancelled, errors
        self.stats = stats or StreamStats()
        self._direct: str | None = None  # the CDN URL a redirect gave, reused without the token
        self.window = window or ReadAhead()
        self._lock = self.window.lock
        self._pieces, self._order = plan_pieces(reads, PIECE_BYTES)
        self._starts = [p.start for p in self._pieces]
        self._next = 0  # index of the next piece to start ahead
        self._ahead = 0  # pieces of this file started and not yet freed (counted in the window too)
        self._closed = False
        with self._lock:
            self.window.sources.append(self)
        self.window.pump()

    # ---- reads ------------------------------------------------------------------------------------------
    def read_into(self, offset: int, view: memoryview, consume: bool = True) -> None:
        if offset < 0 or offset + len(view) > self.size:
            raise HeaderError(self.name, "file ends before the tensor data its header promises: truncated?")
        done = 0
        while done < len(view):
            pos = offset + done
            piece = self._piece_at(pos)
            if piece is None:  # not planned (statistics passes): fetched now, in this thread
                nxt = bisect.bisect_right(self._starts, pos)
                stop = self._pieces[nxt].start if nxt < len(self._pieces) else self.size
                n = min(len(view) - done, stop - pos)
                with self.errors():
                    self._fetch(pos, view[done : done + n])
                done += n
                continue
            self._await(piece)
            n = min(len(view) - done, piece.end - pos)
            assert piece.buf is not None
            view[done : done + n] = memoryview(piece.buf)[pos - piece.start : pos - piece.start + n]
            done += n
            if consume:
                self._consumed(piece, n)

    def _piece_at(self, pos: int) -> Piece | None:
        i = bisect.bisect_right(self._starts, pos) - 1
        if i >= 0 and self._pieces[i].start <= pos < self._pieces[i].end:
            return self._pieces[i]
        return None

    def _await(self, piece: Piece) -> None:
        with self._lock:
            mine = not piece.started
            if mine:  # beyond the read-ahead window (or freed and read again): fetched here
                piece.started = True
                self._count_ahead(1)
        if mine:
            self._load(piece)
        else:
            wait_for(_EventFuture(piece.event), self.cancelled, self.name)
        if piece.error is not None:
            raise piece.error
        if piece.buf is None:  # freed, then read again beyond plan: fetch again
            with self._lock:
                piece.started, piece.event = False, threading.Event()
                self._count_ahead(-1)
            self._await(piece)

    def _consumed(self, piece: Piece, n: int) -> None:
        with self._lock:
            piece.left -= n
            if piece.left > 0 or piece.buf is None:
                return
            freed, piece.buf = len(piece.buf), None
            self._count_ahead(-1)
        self.stats.hold(-freed)
        self.window.pump()

    # ---- the window (called with the window's lock held) ---------------------------------------------------
    def _count_ahead(self, n: int) -> None:
        self._ahead += n
        self.window.ahead += n

    def _has_next(self) -> bool:
        while self._next < len(self._order) and self._order[self._next].started:
            self._next += 1
        return not self._closed and self._next < len(self._order)

    def _start_next(self) -> Piece:
        piece = self._order[self._next]
        piece.started = True
        self._count_ahead(1)
        self._next += 1
        return piece

    def _load(self, piece: Piece) -> None:
        try:
            buf = bytearray(piece.end - piece.start)
            self.stats.hold(len(buf))
            try:
                with self.errors():
                    self._fetch(piece.start, memoryview(buf))
            except BaseException:
                self.stats.hold(-len(buf))
                raise
            with self._lock:
                closed = self._closed
                if not closed:
                    piece.buf = buf
            if closed:  # closed while in flight: its slot went back to the window with the close
                self.stats.hold(-len(buf))
        except BaseException as exc:
            piece.error = exc
        finally:
            piece.event.set()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            held = sum(len(p.buf) for p in self._pieces if p.buf is not None)
            for p in self._pieces:
                p.buf = None
            self._count_ahead(-self._ahead)  # fetched, in flight or not: the slots go back
            self.window.sources.remove(self)
        self.stats.hold(-held)
        self.window.pump()

    # ---- one range, retried -------------------------------------------------------------------------------
    def _fetch(self, start: int, view: memoryview) -> None:
        """Fill `view` with bytes [start, start + len(view)), resuming after a dropped connection."""
        got, failures = 0, 0
        while got < len(view):
            if self.cancelled.is_set():
                raise DownloadCancelled(self.name)
            before = got
            try:
                got += self._request(start + got, view[got:])
                if got < len(view):
                    raise _Dropped(f"connection closed after {got} of {len(view)} bytes")
            except _Retry as exc:
                failures = 0 if got > before else failures + 1
                if failures > RETRIES:
                    if exc.cause is not None:  # a timeout or dropped connection: hub_errors words it
                        raise exc.cause from None
                    raise HubError(
                        f"{self.name}: the Hub kept failing to send bytes {start}-{start + len(view) - 1} ({exc})",
                        hint="check the network and rerun (add --resume to keep finished shards)",
                    ) from None
                with self.stats.lock:
                    self.stats.retries += 1
                if self.cancelled.wait(min(_BACKOFF_MAX, _BACKOFF * 2 ** max(0, failures - 1))):
                    raise DownloadCancelled(self.name) from None

    def _request(self, start: int, view: memoryview) -> int:
        """One GET of bytes [start, start + len(view)); returns how many arrived (may be fewer)."""
        import httpx2 as httpx
        from huggingface_hub.utils import get_session, hf_raise_for_status

        direct = self._direct
        url = direct or self.url
        headers = dict(self.headers) if direct is None or _origin(direct) == _origin(self.url) else {}
        headers["Range"] = f"bytes={start}-{start + len(view) - 1}"
        with self.stats.lock:
            self.stats.requests += 1
        got = 0
        try:
            with get_session().stream(
                "GET", url, headers=headers, timeout=hub_timeout(), follow_redirects=True
            ) as response:
                if direct is not None and response.status_code in _STALE_URL_STATUS:
                    self._direct = None
                    raise _Retry(f"HTTP {response.status_code} from the CDN")
                if response.status_code in _RETRY_STATUS:
                    raise _Retry(f"HTTP {response.status_code}")
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                self._check_same_file(response)
                if direct is None and response.history:  # reuse the CDN URL, skipping a round trip
                    self._direct = str(response.url)
                skip = start if response.status_code == 200 else 0  # the server ignored the range
                for data in response.iter_bytes():
                    if skip:
                        cut = min(skip, len(data))
                        data, skip = data[cut:], skip - cut
                    n = min(len(data), len(view) - got)
                    view[got : got + n] = data[:n]
                    got += n
                    if got == len(view):
                        break
        except (httpx.TransportError, httpx.StreamError) as exc:
            self._count(got)
            if got:
                return got
            raise _Retry(type(exc).__name__, exc) from None
        self._count(got)
        return got

    def _count(self, n: int) -> None:
        with self.stats.lock:
            self.stats.bytes_fetched += n

    def _check_same_file(self, response) -> None:
        """The answer must come from the planned file: same total size, same ETag."""
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        if response.status_code == 206 and total.isdigit() and int(total) != self.size:
            self._changed(f"{total} bytes on the Hub, {self.size} planned")
        if self.etag is None:
            return
        tag = None
        for r in [*response.history, response]:  # the Hub's own answer names the file; a CDN's may not
            tag = tag or r.headers.get("X-Linked-Etag")
        if tag is None and not response.history:
            tag = response.headers.get("ETag")
        if tag is not None and _bare(tag) != self.etag:
            self._changed(f"ETag {_bare(tag)[:16]}..., planned {self.etag[:16]}...")

    def _changed(self, problem: str) -> None:
        raise HubError(
            f"{self.name} changed on the Hub since planning ({problem}); rerun",
            hint="a rerun plans from the files as they are now",
        )


class _Retry(Exception):
    """A failure worth another try (dropped connection, timeout, 5xx); `cause`: the network error."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class _Dropped(_Retry):
    pass


class _EventFuture:
    """The piece of a Future that `wait_for` uses, over an Event."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> None:
        if not self._event.wait(timeout):
            raise TimeoutError


def _bare(tag: str) -> str:
    tag = tag.strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    return tag.strip('"')


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc
