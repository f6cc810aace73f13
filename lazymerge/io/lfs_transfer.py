"""One shard's LFS upload, pipelined with the next one's.

An LFS upload is three requests: the batch request (where to put this sha256), the PUT of the
bytes (one request, or parts for a multipart object), and the verify request. Made one after the
other, the upload direction idles for two round trips and the server's latency between every two
shards; the merge produces output exactly as fast as a balanced link uploads it (DogeRM writes
half what it reads), so that idle time is never caught up and adds to the wall (1B pair at 20 ms:
12 shards, ~0.7 s).

`HubPusher` runs two of these at once. The bodies take turns on a `Wire`: a shard's batch
request goes out while the shard before it still sends its body, its body starts the moment the
previous body's last byte is handed to the socket, and the previous verify is answered meanwhile.
Each body still goes up alone, at the link's full rate and in order, so the upload the merge may
be waiting for (`delete_after_upload`) is never slowed by the next one.

huggingface_hub does every request (`post_lfs_batch_info`, `lfs_upload`: single or multipart
PUT, retries, verify); this module only orders them. A shard file given as a buffered reader
always took this LFS path (Xet wants a path), so the protocol on the wire is unchanged.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from lazymerge.errors import HubError
from lazymerge.io.hub_errors import scrub

__all__ = ["ShardReader", "Wire", "lfs_batch", "upload_lfs"]


class ShardReader(io.BufferedReader):
    """A shard file that reports the bytes the upload reads from it (the progress line), and
    when the last of them has been read (the body is then all in the socket: the wire is free)."""

    def __init__(self, path: Path, size: int) -> None:
        super().__init__(io.FileIO(path, "rb"), buffer_size=1 << 20)
        self.size = size
        self.on_read: Callable[[int], None] | None = None
        self.on_end: Callable[[], None] | None = None

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if data and self.on_read is not None:
            self.on_read(len(data))
        # By position, not by bytes read: a retried request seeks back and reads again. (A 5xx
        # answered after a whole body is retried alongside the next body: the wire was handed on.)
        if self.on_end is not None and (not data or self.tell() >= self.size):
            self.on_end()  # idempotent (Wire.done)
        return data


class Wire:
    """The upload direction: one shard body on it at a time, in the order the shards closed.

    Each shard takes a ticket when it is queued (`ticket`). Its body goes on the wire when every
    earlier ticket is done, and its own ticket is done at the body's last byte (the reader's
    `on_end`), or when the caller calls `done`: the server held the shard, or its upload failed
    (the caller records the failure first, so that the next shard, woken, sees it and stops).
    The shard the merge may be waiting for (the oldest) is thus never overtaken by the next one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._issued = 0
        self._next = 0  # the ticket whose body may go now
        self._done: set[int] = set()

    def ticket(self) -> int:
        with self._cond:
            self._issued += 1
            return self._issued - 1

    @contextmanager
    def turn(self, ticket: int, reader: ShardReader, cancelled: Callable[[], bool]) -> Iterator[None]:
        """Wait for the wire, hold it while the body goes out. Raises HubError, sending nothing,
        once `cancelled()` (an earlier shard failed, or the run stops). On an error inside, the
        wire stays held until the caller's `done(ticket)`."""
        with self._cond:
            while self._next != ticket and not cancelled():
                self._cond.wait(0.05)
        if cancelled():  # also when woken by the failed shard's `done`: its error is recorded
            raise HubError("upload stopped: an earlier shard's upload failed or the run was stopped")
        reader.on_end = lambda: self.done(ticket)
        yield

    def done(self, ticket: int) -> None:
        """This ticket needs the wire no more (idempotent)."""
        with self._cond:
            if ticket < self._next:  # handed on already (at its last byte)
                return
            self._done.add(ticket)
            while self._next in self._done:
                self._done.discard(self._next)
                self._next += 1
            self._cond.notify_all()


def lfs_batch(api: Any, repo_id: str, revision: str, upload_info: Any, token: str | bool | None) -> dict:
    """The LFS batch endpoint's answer for one object: with "actions" when it is to be sent,
    without when the server already holds it, with "error" when the server refuses it."""
    from huggingface_hub.lfs import post_lfs_batch_info
    from huggingface_hub.utils import build_hf_headers

    objects, errors, _ = post_lfs_batch_info(
        [upload_info], token=None, repo_type="model", repo_id=repo_id, revision=quote(revision, safe=""),
        endpoint=api.endpoint, headers=build_hf_headers(token=token), transfers=["basic", "multipart"],
    )  # fmt: skip
    if errors:
        return errors[0] if "error" in errors[0] else {"error": errors[0]}
    if not objects:
        return {"error": {"message": "the LFS batch endpoint answered without the object asked for"}}
    return objects[0]


def upload_lfs(
    api: Any,
    repo_id: str,
    revision: str,
    op: Any,
    token: str | bool | None,
    turn: Callable[[], AbstractContextManager[None]],
) -> None:
    """Send one shard (`op.path_or_fileobj` is its `ShardReader`) unless the server already holds it, its
    body inside `turn()` (a `Wire.turn`). The caller wraps this in `hub_errors`, and tells a sent
    shard from a reused one by the reader's byte count (the same test for every upload path)."""
    from huggingface_hub.lfs import lfs_upload
    from huggingface_hub.utils import build_hf_headers

    action = lfs_batch(api, repo_id, revision, op.upload_info, token)
    if "error" in action:
        error = action["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        said = scrub(str(message), token)[:200]  # the server's words: one line, no token, bounded
        raise HubError(f"{repo_id}: the Hub refused the upload of {op.path_in_repo}: {said}")
    if action.get("actions") is None:  # the server already holds these bytes
        return
    with turn():
        lfs_upload(operation=op, lfs_batch_action=action, headers=build_hf_headers(token=token), endpoint=api.endpoint)
