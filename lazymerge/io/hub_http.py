"""Hub requests that cannot hang, and threads for them that never hold up Ctrl-C or exit.

Every request lazymerge makes to the Hub has a connect and read timeout, `hub_timeout()` seconds
(LAZYMERGE_HUB_TIMEOUT, default 10): a server that accepts the connection and then never
answers gives a one-line `HubError` instead of a hang. huggingface_hub's shared client has no
timeout of its own, so `bound_client` gives it ours for the calls that take none (commits,
uploads, file lists, downloads); calls that take a timeout are given it explicitly. A stalled
download is still resumed 5 times by huggingface_hub before it fails: about 6 timeouts in all.

Downloads and parallel header reads run on `DaemonPool` threads instead of a
`ThreadPoolExecutor`: the interpreter joins an executor's threads at exit and when its `with`
block ends, so one stalled request held Ctrl-C for as long as huggingface_hub kept retrying
(about a minute). A daemon thread stuck on a dead connection is simply left behind.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # not the built-in TimeoutError before 3.11
from typing import Any, TypeVar

from lazymerge.settings import hub_download_timeout_set, hub_timeout

__all__ = ["DaemonPool", "DownloadCancelled", "bound_client", "hub_timeout", "run_pooled", "wait_for"]

T = TypeVar("T")
_STOP = object()
_POLL = 0.1  # seconds between checks of a cancel flag while waiting on a download
_applied: tuple[Any, Any] | None = None  # (client, timeout) we set: ours to update when the setting changes


def bound_client() -> None:
    """Give huggingface_hub's shared HTTP client our connect/read timeout where it has none.

    The client is created on first use and again after `close_session()`, so this is called
    before each batch of Hub requests; a timeout the user configured is left alone. Weight
    downloads read with huggingface_hub's HF_HUB_DOWNLOAD_TIMEOUT: it becomes ours unless set."""
    from huggingface_hub.utils import get_session

    global _applied
    from huggingface_hub import constants

    client = get_session()
    limits = client.timeout
    if (limits.connect is None and limits.read is None) or (client, limits) == _applied:
        client.timeout = hub_timeout()
        _applied = (client, client.timeout)
    if not hub_download_timeout_set():  # hf_hub_download's reads: ours too, unless set
        constants.HF_HUB_DOWNLOAD_TIMEOUT = hub_timeout()  # type: ignore[assignment]


class DaemonPool:
    """A fixed number of daemon worker threads running submitted calls, in order.

    Unlike `ThreadPoolExecutor`, neither `shutdown` nor interpreter exit waits for a call in
    progress: a request stalled on the network cannot delay Ctrl-C or the end of the process."""

    def __init__(self, workers: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(max(1, workers))
        ]
        self._closed = False
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        if self._closed:
            future.cancel()
            return future
        self._jobs.put((future, fn, args))
        return future

    def map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """fn over items on the pool's threads; the first error is raised (the other calls are
        cancelled if not started). Ctrl-C in the caller is not held up by calls in progress."""
        futures = [self.submit(fn, item) for item in reversed(items)]
        results = []
        try:
            while futures:  # popped, never named: the error's traceback holds this frame
                results.append(futures.pop().result())
            return results
        finally:
            for future in futures:
                future.cancel()

    def shutdown(self) -> None:
        """Cancel the calls not started yet and let the threads end; waits for nothing."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(_STOP)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:
                    future.set_exception(exc)
            # A parked thread holds nothing: an error in the future holds the caller's frames in its
            # traceback, and with them the checkpoints (and private folders) they opened.
            job = future = fn = args = None


def wait_for(future: Future[T], cancelled: threading.Event, what: str) -> T:
    """The future's result; raises `DownloadCancelled` as soon as `cancelled` is set.

    A worker thread waiting on a stalled download otherwise keeps the run from ending."""
    while not future.done():
        if cancelled.is_set():
            raise DownloadCancelled(what)
        try:
            return future.result(timeout=_POLL)
        except (TimeoutError, FutureTimeout):  # a Future's, or an _EventFuture's (the built-in)
            continue
    return future.result()


class DownloadCancelled(Exception):
    """A wait for a download was given up because the run was interrupted or closed."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}: download cancelled")


def run_pooled(fn: Callable[[Any], T], items: list[Any], workers: int, name: str) -> list[T]:
    """`DaemonPool(workers).map(fn, items)` with a pool of its own (no thread when one item)."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    pool = DaemonPool(min(workers, len(items)), name)
    try:
        return pool.map(fn, items)
    finally:
        pool.shutdown()
