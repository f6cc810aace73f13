"""A Hub repo as a checkpoint: planned from its headers, weight files fetched or streamed on demand.

`HubCheckpoint.planned` is the one constructor: from the tensor tables of the pinned commit's
weight files (read by ranged requests online, io/hub.py; kept from an earlier online open, offline,
io/hub_offline.py) it builds the checkpoint (the index checked against the headers) and owns from
then on its download pool and, with `low_disk`, its private folder.

Without `low_disk`, a weight file is downloaded through huggingface_hub when the executor first
reads it (`local_file`) and the next file in plan order is prefetched. With `low_disk`, weight files
are never downloaded: reads are streamed with HTTP range requests straight into the executor's
buffers (`range_source` -> io/hub_stream.py). A downloaded file is checked against the plan (its
size and tensor table): a file that changed on the Hub since planning is refused, never merged.

The private folder is removed by `close`, when the checkpoint is collected, or at interpreter exit
(io/hub_folders.py). Downloads run on daemon threads; `cancel` or `close` stops every wait for
them at once, so Ctrl-C never waits on a stalled download.
"""

from __future__ import annotations

import os
import shutil
import threading
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import ClassVar

from lazymerge.constants import CARRIED_FILES, TOKENIZER_FILES
from lazymerge.errors import HubError, LazyMergeError
from lazymerge.io.checkpoint import Checkpoint, TensorRef, build_checkpoint
from lazymerge.io.hub_errors import hub_errors
from lazymerge.io.hub_folders import PrivateFolder
from lazymerge.io.hub_http import DaemonPool, DownloadCancelled, bound_client, hub_timeout, wait_for
from lazymerge.io.hub_ranged import Tables, auth_headers, local_tensors
from lazymerge.io.range_source import RangeSource

__all__ = ["SIDE_FILES", "STREAM_THREADS", "HubCheckpoint"]

STREAM_THREADS = 8  # low_disk: ranged requests in flight per input model
# README.md: read for the input's licence (recipes/card.py), never carried.
SIDE_FILES = ("config.json", *TOKENIZER_FILES, *CARRIED_FILES, "README.md")


class HubCheckpoint(Checkpoint):
    """A checkpoint whose files live on the Hub; weight files are downloaded when first read."""

    remote: ClassVar[bool] = True

    repo_id: str
    revision: str | None
    commit: str

    @classmethod
    def planned(
        cls,
        label: str,
        root: Path,
        files: list[str],
        tables: Tables,
        sizes: dict[str, int],
        weight_map: dict[str, str] | None,
        *,
        repo_id: str,
        revision: str | None,
        commit: str,
        token: str | bool | None,
        low_disk: bool = False,
        download_dir: str | os.PathLike[str] | None = None,
        etags: dict[str, str] | None = None,
    ) -> HubCheckpoint:
        """The checkpoint of `repo_id` at `commit` from its weight files' tensor tables.

        Args:
            label: the name errors use. root: where its files are (or will be) on disk.
            files, tables, sizes, weight_map: the weight files, `tables[i]` being `files[i]`'s
                (tensors, metadata), their sizes, and the index (None for a single file).
            repo_id, revision, commit: the repo, the revision asked for, the commit it resolved to.
            token: the Hub token. low_disk: stream weight files (no byte on disk); side files go
                to a private folder (under `download_dir` when given).
            etags: per file, the LFS sha256 or git blob id a streamed range must come from.

        Raises:
            CheckpointError: the index and the headers disagree (before any download or folder).
        """
        ckpt = build_checkpoint(cls, label, root, files, tables, {f: sizes[f] for f in files}, weight_map)
        ckpt._setup(repo_id, revision, commit, token, low_disk, download_dir, files, tables, etags or {})
        return ckpt

    def _setup(
        self,
        repo_id: str,
        revision: str | None,
        commit: str,
        token: str | bool | None,
        low_disk: bool,
        download_dir: str | os.PathLike[str] | None,
        files: list[str],
        tables: Tables,
        etags: dict[str, str],
    ) -> None:
        """Make the download pool and (low_disk) the private folder, owned from here on by `close`."""
        from lazymerge.io.hub_pieces import ReadAhead
        from lazymerge.io.hub_stream import StreamStats

        self.repo_id, self.revision, self.commit = repo_id, revision, commit
        self._etags = {f: e for f, e in etags.items() if f in files and e}
        self.stream_stats = StreamStats()  # low_disk: bytes, requests and retries of the streams
        self._read_ahead = ReadAhead()  # low_disk: one window for all the open files of this model
        self.token, self.low_disk = token, low_disk
        # Checked again after a download.
        self._planned = {f: _table(refs) for f, (refs, _) in zip(files, tables, strict=True)}
        self._side_paths: dict[str, Path] = {}
        self._reads: frozenset[str] = frozenset(self.files)  # until the run says which it reads
        self._futures: dict[str, Future[Path]] = {}
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self.downloads = 0  # weight files fetched (a released file read again is fetched again)
        # Daemon threads: a stalled download never holds up Ctrl-C or the end of the process.
        # low_disk streams several ranges at once; otherwise two whole-file downloads.
        self._pool = DaemonPool(STREAM_THREADS if low_disk else 2, "lazymerge-download")
        self._folder = PrivateFolder(download_dir) if low_disk else None
        self._download_dir = self._folder.path if self._folder is not None else None
        self._finalizer = weakref.finalize(self, _cleanup, self._pool, self._folder, self._cancelled)
        self.root = self._download_dir or self.root

    def side_file(self, name: str) -> Path | None:
        return self._side_paths.get(name)

    def local_file(self, name: str) -> Path:
        future = self._start(name)
        with hub_errors(self.repo_id, self.revision, token=self.token):
            path = wait_for(future, self._cancelled, f"{self.label}/{name}")
        if not self.low_disk:  # overlap the next download with reading this file
            later = self.files[self.files.index(name) + 1 :] if name in self.files else []
            nxt = next((f for f in later if f not in self._futures and f in self._reads), None)
            if nxt is not None:
                self._start(nxt)
        return path

    def range_source(self, name: str, reads: list[tuple[int, int]] | None = None) -> RangeSource:
        """low_disk: the file streamed with ranged requests (nothing on disk); else the downloaded file."""
        if not self.low_disk:
            return super().range_source(name, reads)
        from huggingface_hub import hf_hub_url

        from lazymerge.io.hub_stream import HttpRangeSource

        bound_client()
        return HttpRangeSource(
            hf_hub_url(self.repo_id, name, revision=self.commit), self.file_sizes[name], self._etags.get(name),
            auth_headers(self.token), f"{self.label}/{name}", reads or [], self._pool, self._cancelled,
            self.stream_stats, lambda: hub_errors(self.repo_id, self.revision, token=self.token), self._read_ahead,
        )  # fmt: skip

    @property
    def deletes_released_files(self) -> bool:
        # low_disk reads its inputs in plan order (one write lane), so each stream moves forward.
        return self.low_disk

    def expect_reads(self, names: set[str]) -> None:
        # A shard no tensor of the plan reads (a dropped lm_head) is never downloaded.
        self._reads = frozenset(names)

    def release_file(self, name: str) -> None:
        if not self.low_disk:
            return
        with self._lock:
            future = self._futures.pop(name, None)
        if future is not None and future.done() and future.exception() is None:
            Path(future.result()).unlink(missing_ok=True)

    def cancel(self) -> None:
        """Stop waiting for downloads: every `local_file` call, waiting or later, gives up at once."""
        self._cancelled.set()

    def close(self) -> None:
        """Stop downloads and delete the private download folder (low_disk)."""
        self._finalizer()

    def _start(self, name: str) -> Future[Path]:
        with self._lock:
            future = self._futures.get(name)
            if future is None:
                future = self._futures[name] = self._pool.submit(self._download, name)
            return future

    def _download(self, name: str) -> Path:
        from huggingface_hub import hf_hub_download

        if self._cancelled.is_set():  # closed: nothing may be written into the private folder any more
            raise DownloadCancelled(f"{self.label}/{name}")
        with self._lock:
            self.downloads += 1
        local_dir = str(self._download_dir) if self._download_dir is not None else None
        bound_client()
        try:
            path = Path(
                hf_hub_download(
                    self.repo_id,
                    name,
                    revision=self.commit,
                    token=self.token,
                    local_dir=local_dir,
                    etag_timeout=hub_timeout(),
                )
            )
        finally:
            if local_dir is not None and not self._finalizer.alive:
                # Closed while this download ran: what it made again of the folder goes too.
                shutil.rmtree(local_dir, ignore_errors=True)
        self._check_unchanged(name, path)
        return path

    def _check_unchanged(self, name: str, path: Path) -> None:
        """The downloaded file must be the one planned: same size, same tensor table."""
        expected, size = self.file_sizes.get(name), path.stat().st_size
        problem = None
        if expected is not None and size != expected:
            problem = f"{size} bytes downloaded, {expected} planned"
        elif name in self._planned:
            try:
                found = _table(local_tensors(path, name, f"{self.label}/{name}"))
            except LazyMergeError as exc:
                problem = f"its header no longer parses ({exc.message})"
            else:
                if found != self._planned[name]:
                    problem = "its header differs from the one planned"
        if problem is None:
            return
        if self.low_disk:
            path.unlink(missing_ok=True)
        raise HubError(
            f"{self.label}/{name} changed on the Hub since planning ({problem}); rerun",
            hint="a rerun plans from the files as they are now",
        )


def _table(refs: list[TensorRef]) -> frozenset[tuple]:
    return frozenset((r.name, r.dtype, tuple(r.shape), r.offset, r.nbytes) for r in refs)


def _cleanup(pool: DaemonPool, folder: PrivateFolder | None, cancelled: threading.Event) -> None:
    # Waits for nothing: a download still running finds `cancelled` set, and a stalled one is
    # left to its daemon thread (it writes only into an open file the folder no longer lists).
    cancelled.set()
    pool.shutdown()
    if folder is not None:
        folder.remove()
